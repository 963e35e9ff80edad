"""Ctrl-C that Python would drop. A KeyboardInterrupt raised while a finalizer runs (a weakref
callback or a __del__: the simulated card frees storages in them, torch's caches clean up in
them) is printed as "Exception ignored in ..." and lost, and the command went on to its end
(CI: 1 run in 20 priced its whole lever table after Ctrl-C and exited 1, not 130).

The command line's SIGINT handler (`heard`) notes each Ctrl-C as it raises it; `check`, called
by the simulated card at each operator, raises one again if it is still noted (once: no one
here catches a KeyboardInterrupt and goes on, the commands stop).
"""

from __future__ import annotations

from typing import Any

_pending = False


def heard(number: int, frame: Any) -> None:
    """SIGINT's handler under the command line: Python's, that also notes the interrupt."""
    global _pending
    _pending = True
    raise KeyboardInterrupt


def lost() -> None:
    """A KeyboardInterrupt caught where it would be dropped (a finalizer): raise it at `check`."""
    global _pending
    _pending = True


def check() -> None:
    """Raise a Ctrl-C still noted: it was dropped in a finalizer, or is being raised already."""
    global _pending
    if _pending:
        _pending = False
        raise KeyboardInterrupt

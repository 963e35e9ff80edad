"""Joining torchrun's rendezvous without waiting forever: stale WORLD_SIZE/MASTER_ADDR variables (a
pod a job scheduler launched) left `init_process_group` waiting for ranks that never come, deaf to
Ctrl-C for as long as the agreement's 30-minute timeout.

The store is built here, with its own timeout (`rendezvous_timeout_s`, 5 minutes by default,
BATCHFIT_RENDEZVOUS_TIMEOUT or --rendezvous-timeout), in a thread the main thread polls, so that
Ctrl-C ends the wait at once; the process group is then initialised on that store.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
from typing import Any

import torch.distributed as dist

from batchfit.config import RENDEZVOUS_ENV as ENV

log = logging.getLogger(__name__)

_READ = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class RendezvousTimeout(RuntimeError):
    """The other ranks did not join within the rendezvous timeout."""


def init_default_group(backend: str, timeout: datetime.timedelta, rendezvous_s: float) -> None:
    """`dist.init_process_group(backend)` from torchrun's variables, the wait for the other ranks
    bounded by `rendezvous_s` and interruptible (KeyboardInterrupt within a tenth of a second)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))
    read = ", ".join(f"{name}={os.environ.get(name, '(unset)')}" for name in _READ)
    log.warning("waiting for %d ranks at %s:%d (rank %d; up to %.0f s)", world, host, port, rank, rendezvous_s)
    made: dict[str, Any] = {}

    def build() -> None:
        try:
            made["store"] = dist.TCPStore(
                host, port, world, is_master=rank == 0, timeout=datetime.timedelta(seconds=rendezvous_s)
            )
        except Exception as error:  # a timeout, a refused connection: reported in the main thread
            made["error"] = error

    thread = threading.Thread(target=build, name="batchfit-rendezvous", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.1)  # the main thread stays in Python: Ctrl-C raises here
    if "store" not in made:
        error = made.get("error")
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0] if error else "no store"
        raise RendezvousTimeout(
            f"the other ranks did not join within {rendezvous_s:g} s: waiting for {world} ranks at {host}:{port} "
            f"from the environment ({read}); stale variables from a job scheduler? unset them, or wait longer "
            f"with --rendezvous-timeout / {ENV} ({detail})"
        )
    dist.init_process_group(backend=backend, store=made["store"], rank=rank, world_size=world, timeout=timeout)

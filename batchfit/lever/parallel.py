"""The lever table on two cores: a second process prices rows from the end of the table while
this one prices the first row and then rows from the start; the rows come back in table order.

Each row is single-threaded fake-tensor dispatch, and the rows past the first are independent
given it, so a second core halves the table. The helper is forked, so it inherits the model, the
sample and the callables as they are (nothing is pickled but rows and errors). A process that
has run a backward pass on the simulated card cannot fork one that runs another (autograd's
device threads: the child's first backward raises), so the command forks its helper before its
check runs; a helper that finds backward unusable says so and the table is priced here, as it is
with one core or without fork.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from batchfit.lever.records import Lever
from batchfit.session import collecting_new_objects_only

_FRONT, _BACK = 0, 1

# A helper silent for this long while this process waits on its rows is taken as stalled (a
# lock a fork left held, a kernel that hangs): it is stopped and its rows are priced here. The
# bound is generous (a row can take minutes on a large model): the floor, or so many times the
# slowest row this process priced, whichever is longer.
STALL_FLOOR_S = 120.0
STALL_ROWS = 4


@dataclass(frozen=True)
class Unit:
    """One row past the first: how to price it, and whether it reads the first row."""

    make: Callable[[], Lever]
    reads_baseline: bool = False


class Table:
    """What a helper needs of the table: its units for `groups`, and the first row once priced."""

    baseline: Lever

    def units(self, groups: tuple[str, ...]) -> list[Unit]:
        raise NotImplementedError


def cores() -> int:
    """The cores this process may run on (a container's or taskset's share, not the machine's)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class Claims:
    """The units claimed so far, shared by the two processes: the next from the start, and the
    last one the helper took from the end (a page of shared memory and a lock, made before fork)."""

    def __init__(self) -> None:
        self.lock = multiprocessing.get_context("fork").Lock()
        self.counters = memoryview(mmap.mmap(-1, 8)).cast("i")
        self.count = 0

    def reset(self, count: int) -> None:
        self.count = count
        with self.lock:
            self.counters[_FRONT], self.counters[_BACK] = 0, count

    def take(self, end: int) -> int | None:
        """The next unclaimed unit from the start (`end` _FRONT) or the end (_BACK); None when none is left."""
        with self.lock:
            front, back = self.counters[_FRONT], self.counters[_BACK]
            if front >= back:
                return None
            if end == _FRONT:
                self.counters[_FRONT] = front + 1
                return front
            self.counters[_BACK] = back - 1
            return back - 1

    def back(self) -> range:
        """The units the end's side has claimed, of the `count` reset to."""
        with self.lock:
            return range(max(self.counters[_BACK], self.counters[_FRONT]), self.count)


class Helper:
    """A forked process pricing rows of `table` from the end of the table."""

    def __init__(self, table: Table) -> None:
        context = multiprocessing.get_context("fork")
        self.claims = Claims()
        self.conn, theirs = context.Pipe()
        self.process = context.Process(target=_serve, args=(table, theirs, self.claims, os.getpid()), daemon=True)
        self.process.start()
        theirs.close()
        self.started = False
        self.groups: tuple[str, ...] = ()

    def go(self, groups: tuple[str, ...], count: int) -> None:
        """Start pricing: `count` units of `groups` (the helper makes the same list)."""
        if self.started:
            return
        self.claims.reset(count)
        self.groups = groups
        self.started = self.send(("go", groups))

    def send(self, message: Any) -> bool:
        try:
            self.conn.send(message)
        except (BrokenPipeError, OSError):
            return False  # it has gone: its rows are priced here
        return True

    def close(self) -> None:
        """Stop the helper, whatever it is doing: it never outlives the table or the command."""
        with contextlib.suppress(OSError):
            self.conn.close()
        if self.process.is_alive():
            self.process.kill()
        self.process.join()


def fork_helper(table: Table) -> Helper | None:
    """A helper for `table`, or None where one would not help or could not run safely: one
    core, no fork, a daemonic process (which may not have children), CUDA initialised here (a
    forked child cannot use it), or other Python threads (one could hold a lock the child needs)."""
    if cores() < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return None
    if multiprocessing.current_process().daemon or torch.cuda.is_initialized() or threading.active_count() > 1:
        return None
    with warnings.catch_warnings():
        # Python 3.12 warns at any fork of a process with threads (torch's own pools among them).
        warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)
        try:
            return Helper(table)
        except OSError:  # no fork now (a process limit, memory): one process prices the table
            return None


@contextlib.contextmanager
def helping(table: Table, start: tuple[str, ...] = ()) -> Iterator[Helper | None]:
    """A helper for `table`, forked now (before this process runs a backward pass, which would
    keep the helper from running one), stopped on the way out whatever happens; `start`: the
    groups it begins on now, the table being wanted whatever comes before."""
    helper = fork_helper(table)
    try:
        if start and helper is not None:
            helper.go(start, len(table.units(start)))
        yield helper
    finally:
        if helper is not None:
            helper.close()


Outcome = tuple[Lever | None, BaseException | None, list[Any]]
"""A unit's row, or the error it raised; and the warnings the helper caught in it."""


def price(
    table: Table,
    groups: tuple[str, ...],
    first: Callable[[], Lever],
    heard: Callable[[Lever], None],
    helper: Helper | None,
) -> list[Lever]:
    """The first row, then the units of `groups`, in table order, each heard as soon as every
    row before it is: the helper's from the end, this process's from the start. An error in
    either is raised where one process would have raised it (after the rows before it)."""
    units = table.units(groups)
    count = len(units)
    if helper is not None:
        helper.go(groups, count)
        if not helper.started or helper.groups != groups:  # gone, or started ahead on other groups
            helper = None
    slowest = time.monotonic()
    table.baseline = first()
    slowest = time.monotonic() - slowest
    rows = [table.baseline]
    heard(table.baseline)
    if helper is not None:
        helper.send(("baseline", table.baseline))  # if it has gone, its rows are in the pipe or priced here
    done: dict[int, Outcome] = {}

    def emit() -> None:
        while len(rows) - 1 in done:
            row, error, caught = done.pop(len(rows) - 1)
            _warn(caught)
            if error is not None:
                raise error
            assert row is not None
            rows.append(row)
            heard(row)

    def waiting() -> list[int]:
        return [k for k in (helper.claims.back() if helper else ()) if k >= len(rows) - 1 and k not in done]

    ahead = iter(range(count))
    while (k := helper.claims.take(_FRONT) if helper else next(ahead, None)) is not None:
        started = time.monotonic()
        done[k] = _here(units[k])
        slowest = max(slowest, time.monotonic() - started)
        if helper is not None:
            _collect(helper, done, block=False)
        emit()
    while helper is not None and waiting():
        if not _collect(helper, done, block=True, timeout=max(STALL_FLOOR_S, STALL_ROWS * slowest)):
            helper.close()  # gone, or stalled: stopped, so that nothing more comes from it
            for k in waiting():  # what it had not sent is priced here
                done[k] = _here(units[k])
    emit()
    return rows


def _here(unit: Unit) -> Outcome:
    """A unit priced in this process (Ctrl-C is not an outcome: it stops the table)."""
    try:
        return unit.make(), None, []
    except Exception as error:
        return None, error, []


def _collect(helper: Helper, done: dict[int, Outcome], *, block: bool, timeout: float | None = None) -> bool:
    """The helper's finished rows into `done` (with `block`, the next one, waited for `timeout`
    seconds at most); False once it is gone (it died, found it cannot run a backward pass, or
    sent nothing within `timeout`)."""
    try:
        if block and not helper.conn.poll(timeout):
            return False
        while block or helper.conn.poll():
            kind, *body = helper.conn.recv()
            if kind == "unable":
                return False
            k, *outcome = body
            done[k] = tuple(outcome)  # type: ignore[assignment]
            if block:
                return True
    except (EOFError, OSError):
        return False
    return True


def _warn(caught: list[tuple[Any, ...]]) -> None:
    """Warnings the helper caught, issued here as if raised here (the same filters, once each)."""
    for message, category, filename, lineno, module in caught:
        registry = getattr(sys.modules.get(module), "__dict__", {}).setdefault("__warningregistry__", {})
        warnings.warn_explicit(message, category, filename, lineno, module=module, registry=registry)


def _serve(table: Table, conn: Any, claims: Claims, parent: int) -> None:
    """The helper: prices units from the end until the two ends meet, sends each row or error."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's, which stops this one
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: never outlive the parent
    if os.getppid() != parent:
        os._exit(0)
    try:
        try:
            torch.ones(1, requires_grad=True).sum().backward()
        except RuntimeError:
            # The parent had run a backward on the simulated card before it forked this one
            # (autograd's device threads): none can run here; the parent prices every row.
            conn.send(("unable",))
            os._exit(0)
        _, groups = conn.recv()
        units = table.units(groups)
        with collecting_new_objects_only():
            while (k := claims.take(_BACK)) is not None:
                if units[k].reads_baseline and not hasattr(table, "baseline"):
                    _, table.baseline = conn.recv()
                outcome = _make(units[k])
                conn.send(("row", k, *outcome))
                if outcome[1] is not None:
                    break  # one process never reaches the rows after an error either
    except (EOFError, OSError):
        pass
    os._exit(0)


def _make(unit: Unit) -> Outcome:
    """A unit's row or its error (one that crosses to the parent), and the warnings it raised."""
    row, error = None, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the parent's filters decide, once each
        try:
            row = unit.make()
        except BaseException as raised:
            error = _portable(raised)
    seen = {(str(w.message), w.category, w.filename, w.lineno): _module(w.filename) for w in caught}
    return row, error, [(*key, module) for key, module in seen.items() if _pickles(key[1])]


def _pickles(category: type) -> bool:
    """Whether a warning's class can cross to the parent (one defined in a function cannot)."""
    try:
        pickle.dumps(category)
    except Exception:
        return False
    return True


def _module(filename: str) -> str:
    """The module a warning came from, by its file (for its once-only registry)."""
    for name, module in list(sys.modules.items()):
        if getattr(module, "__file__", None) == filename:
            return name
    return "__main__"


def _portable(error: BaseException) -> BaseException:
    """`error` as it can cross to the parent, its traceback (this process's frames) as a note."""
    error.add_note("in the lever table's second process:\n" + "".join(traceback.format_tb(error.__traceback__)))
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error

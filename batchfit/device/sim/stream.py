"""A simulated trial's allocator stream: recorded at two batch sizes, replayed at others.

On the simulated card a trial's memory is decided by the stream of requests and frees its
operators send the allocator model (allocator.py), never by tensor values. For most models that
stream has the same shape at every batch size and each request is affine in B (a + b·B bytes):
two trials' streams then give another size's, and replaying it through the allocator model gives
that trial's peaks or its out-of-memory error exactly as running it would, in a hundredth of the
fake-tensor dispatch's time (the lever table prices many variants at several sizes each).

A replay is used only where the trials say it is exact: two that ran with the same shape of
stream from the same allocator state, every request's bytes on an integer line through them, at
least one more trial reproduced by that line (one that fitted, peak for peak; one that ran out
of memory, request for request up to the one that failed), and a trial at a larger size than
the one replayed. A model whose stream changes with B (a kernel picked by size, a B × B tensor)
is caught by the third trial where the change shows before it failed; then it is run, not
replayed.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from batchfit.device.sim.allocator import AllocatorOutOfMemory, Block, CachingAllocator
from batchfit.result import Trial

Event = tuple[str, int]
"""('m', bytes) a request served (the block's handle: the event's index), ('o', bytes) a request
that ran out of memory, ('f', handle) a free, ('e', 0) empty_cache, ('r', 0) peaks reset,
('p', 0) peaks read (the trial's measurement)."""


@dataclass
class Stream:
    """One recorded trial: the allocator as the trial found it, and the calls it made.

    `held`: requests made right after the peaks' reset and never freed (the card's workspaces,
    made in a session's first trial and kept); the trials after it find them made already."""

    trial: Trial
    start: CachingAllocator
    events: tuple[Event, ...]
    held: tuple[int, ...]
    replayable: bool
    """False when the trial freed a block it did not allocate (its stream alone cannot say how)."""
    settled: tuple[object, ...] = field(init=False)
    """The allocator's `state` once the held requests are made: what the trials after it find."""

    def __post_init__(self) -> None:
        allocator = self.start.copy()
        for size in self.held:
            with contextlib.suppress(AllocatorOutOfMemory):
                allocator.malloc(size)
        self.settled = state(allocator)

    @functools.cached_property
    def shape(self) -> tuple[Event, ...]:
        """The stream with the requests' sizes left out."""
        return tuple((kind, 0) if kind in "mo" else (kind, value) for kind, value in self.events)


def state(allocator: CachingAllocator) -> tuple[object, ...]:
    """What of the allocator decides where the next requests go and what they cost: the counters
    and the free blocks in address order (a new segment always lies above them)."""
    free = sorted(allocator._free.values(), key=lambda b: b.address)
    blocks = tuple((b.size, b.small, b.prev is not None, b.next is not None) for b in free)
    return allocator.capacity, allocator.allocated, allocator.reserved, allocator.inactive_split, blocks


def record(allocator: CachingAllocator, run: Callable[[int], Trial], batch_size: int) -> Stream:
    """`run(batch_size)` with `allocator`'s calls recorded."""
    start = allocator.copy()
    with logged(allocator) as log:
        trial = run(batch_size)
    return _stream(trial, start, log)


@contextlib.contextmanager
def logged(allocator: CachingAllocator) -> Iterator[list[tuple[str, int]]]:
    """The allocator's raw calls made inside, complete at the end: its own log where none is kept,
    else the part of the outer one (a trial's) made here (a step's)."""
    if allocator.log is None:
        log: list[tuple[str, int]] = []
        allocator.log = log
        try:
            yield log
        finally:
            allocator.log = None
        return
    outer, begin = allocator.log, len(allocator.log)
    part: list[tuple[str, int]] = []
    try:
        yield part
    finally:
        part.extend(outer[begin:])


def _stream(trial: Trial, start: CachingAllocator, log: list[tuple[str, int]]) -> Stream:
    """The raw log as a recorded trial."""
    events, live, replayable = parse(log)
    return _without_held(trial, start, events, set(live.values()), replayable)


def parse(log: list[tuple[str, int]]) -> tuple[list[Event], dict[int, int], bool]:
    """The raw log as events, each block named by the index of the request that made it; the
    blocks still live at its end (the block's id -> its request's index); and whether every free
    was of a block the log made (a free of another reads ('f', -1))."""
    events: list[Event] = []
    live: dict[int, int] = {}
    replayable, asked = True, None
    for kind, value in log:
        if asked is not None and kind != "b":
            events.append(("o", asked))  # a request with no block after it: out of memory
            asked = None
        if kind == "m":
            asked = value
        elif kind == "b":
            live[value] = len(events)
            events.append(("m", asked or 0))
            asked = None
        elif kind == "f":
            handle = live.pop(value, None)
            replayable = replayable and handle is not None
            events.append(("f", -1 if handle is None else handle))
        else:
            events.append((kind, 0))
    if asked is not None:
        events.append(("o", asked))
    return events, live, replayable


def without(events: list[Event] | tuple[Event, ...], kept: set[int] | frozenset[int]) -> tuple[Event, ...]:
    """`events` less the requests at the indices in `kept` (never freed), each free's block renamed
    by its request's new index."""
    if not kept:
        return tuple(events)
    names: dict[int, int] = {}
    out: list[Event] = []
    for index, (kind, value) in enumerate(events):
        if kind == "m":
            if index in kept:
                continue
            names[index] = len(out)
        out.append((kind, names.get(value, value) if kind == "f" else value))
    return tuple(out)


def _without_held(trial: Trial, start: CachingAllocator, events: list[Event], kept: set[int], ok: bool) -> Stream:
    """Take the requests made right after the first reset and never freed out of the events."""
    first = next((i for i, (kind, _) in enumerate(events) if kind == "r"), len(events))
    end = first + 1
    while end < len(events) and events[end][0] == "m" and end in kept:
        end += 1
    held = range(first + 1, end)
    return Stream(trial, start, without(events, set(held)), tuple(events[i][1] for i in held), ok)


class Replay:
    """The trials of one model on one card: recorded ones, and the sizes they let be replayed."""

    def __init__(self) -> None:
        self.ran: list[Stream] = []
        self.checked: set[int] = set()
        """Trials (their place in `ran`) the pair's line reproduced."""
        self.refused = False
        """A trial disagreed with the line through two others: this model is run, not replayed."""

    def run(self, batch_size: int, allocator: CachingAllocator, real: Callable[[int], Trial]) -> Trial:
        """The trial at `batch_size`: replayed where the recorded ones show that exact, else run."""
        replayed = self.replay(batch_size, allocator)
        if replayed is not None:
            return replayed
        self.ran.append(record(allocator, real, batch_size))
        return self.ran[-1].trial

    def replay(self, batch_size: int, allocator: CachingAllocator) -> Trial | None:
        """The trial at `batch_size` from the recorded ones, or None where that is not shown exact;
        `allocator`: the card's, which must be as the recorded trials left it."""
        pair = None if self.refused else self._pair()
        if pair is None:
            return None
        a, b = pair
        if state(allocator) != b.settled:
            return None
        others = [(i, s) for i, s in enumerate(self.ran) if s is not a and s is not b and s.settled == b.settled]
        for i, other in others:
            if i not in self.checked:
                if _replayed(a, b, other.trial.batch_size, like=other) != other.trial:
                    self.refused = True
                    return None
                self.checked.add(i)
        largest = max(s.trial.batch_size for s in (a, b, *(s for _, s in others)))
        if not others or batch_size >= largest:
            return None  # a line checked at no third size, or past every size that ran
        return _replayed(a, b, batch_size)

    def _pair(self) -> tuple[Stream, Stream] | None:
        """Two trials that ran every step, at different sizes, with the same shape of stream from
        the same allocator state: the first two such."""
        done = [s for s in self.ran if s.trial.ok and s.replayable]
        for i, a in enumerate(done):
            for b in done[i + 1 :]:
                same = a.shape == b.shape and a.settled == b.settled
                if same and a.trial.batch_size != b.trial.batch_size:
                    return a, b
        return None


def _sizes(a: Stream, b: Stream, batch_size: int) -> list[int] | None:
    """Each request's bytes at `batch_size` on the line through `a` and `b`; None if one is on no
    integer line (not affine in B) or comes to nothing."""
    span = b.trial.batch_size - a.trial.batch_size
    sizes = []
    for (kind, x), (_, y) in zip(a.events, b.events, strict=True):
        if kind == "m":
            per_sample, rest = divmod(y - x, span)
            size = x + per_sample * (batch_size - a.trial.batch_size)
            if rest or size <= 0:
                return None
            sizes.append(size)
    return sizes


def _replayed(a: Stream, b: Stream, batch_size: int, like: Stream | None = None) -> Trial | None:
    """The line's stream at `batch_size` through the allocator model. With `like` (a recorded
    trial at that size): through a copy of its own starting allocator, its held requests made
    after the reset, and None unless every request and free is its trial's, up to the trial's end
    or the request it ran out of memory at."""
    sizes = _sizes(a, b, batch_size)
    if sizes is None:
        return None
    allocator = (like or b).start.copy()
    if like is None:
        for size in b.held:
            allocator.malloc(size)
    expected = iter(like.events) if like is not None else None
    blocks: dict[int, Block] = {}
    requests = iter(sizes)
    retries = allocator.num_alloc_retries
    for handle, (kind, value) in enumerate(b.events):
        seen = next(expected, None) if expected is not None else None
        size = next(requests) if kind == "m" else value
        if seen is not None and seen != (kind, size) and not (kind == "m" and seen == ("o", size)):
            return None
        if expected is not None and seen is None:
            return None
        if kind == "m":
            try:
                blocks[handle] = allocator.malloc(size)
            except AllocatorOutOfMemory:
                if seen is not None and seen[0] != "o":
                    return None
                return Trial(batch_size, False, alloc_retries=allocator.num_alloc_retries - retries)
            if seen is not None and seen[0] == "o":
                return None  # that trial ran out of memory here, the line's did not
        elif kind == "f":
            allocator.free(blocks.pop(value))
        elif kind == "e":
            allocator.empty_cache()
        elif kind == "r":
            allocator.reset_peaks()
            retries = allocator.num_alloc_retries
            for held in like.held if like is not None else ():
                allocator.malloc(held)
        elif kind == "p":
            peaks = allocator.peaks()
            return Trial(
                batch_size,
                True,
                peaks.allocated,
                peaks.reserved,
                alloc_retries=peaks.alloc_retries - retries,
                largest_alloc=peaks.largest_request,
                peak_inactive_split=peaks.inactive_split,
            )
    return None

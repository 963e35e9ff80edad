"""A simulated trial's second step: the first step's allocator stream again, without its dispatch.

A trial runs two steps because the first makes the optimizer state (lazily, in `step()`) and
peaks without it. On the simulated card a step's memory is decided by the stream of requests
and frees its operators send the allocator model, never by tensor values; the second step's
stream is the first's without the requests the first made and kept (the state, updated in place
after). Sending that through the allocator model gives the second step's peaks, or its
out-of-memory error, exactly as running it would, at none of the fake-tensor dispatch's cost:
about half of every fitted trial on the simulated card.

Used only where shown exact, per held model: its first trial that runs two steps runs both, and
the second's stream must be the first's less what the first kept, request for request and free
for free, and keep nothing itself; a step that freed a block it did not make (a collection, a
cache) cannot be repeated from its stream. Otherwise every trial of that model runs its steps.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator

from batchfit.device.sim.allocator import Block, CachingAllocator
from batchfit.device.sim.stream import logged, parse, without

Events = tuple[tuple[str, int], ...]
"""('m', bytes) a request served (its block named by the event's index), ('f', that index) a free."""


def _events(log: list[tuple[str, int]]) -> tuple[Events, frozenset[int]] | None:
    """A step's raw allocator log as events and the requests it kept (never freed); None where the
    step did anything else (freed a block made before it, ran out of memory, emptied the cache)."""
    events, live, replayable = parse(log)
    if not replayable or any(kind not in "mf" for kind, _ in events):
        return None
    return tuple(events), frozenset(live.values())


class StepReplay:
    """The steps of one held model's trials: recorded, checked once, then repeated from the stream."""

    def __init__(self) -> None:
        self.exact: bool | None = None
        """None until a trial's second step ran and was compared; then whether it was the first's
        stream less what the first kept."""
        self.next: Events | None = None
        """The step that follows the one just recorded, as its stream would be."""
        self.attention: Counter[str] = Counter()
        """The attention calls of the step just recorded (a repeated step makes them again)."""

    @contextlib.contextmanager
    def recording(self, allocator: CachingAllocator, index: int) -> Iterator[None]:
        """Around step `index` of a trial that runs it: its stream, compared where not yet."""
        previous, self.next = self.next if index else None, None
        if self.exact is False:  # this model's steps are all run: nothing to record
            yield
            return
        with logged(allocator) as log:
            yield
        parsed = _events(log)
        if index and self.exact is None:
            self.exact = parsed is not None and not parsed[1] and parsed[0] == previous
        if parsed is not None:
            self.next = without(*parsed)

    def repeat(self, reserve: Callable[[int], Block], release: Callable[[Block], None]) -> bool:
        """The step after the one just recorded, through the allocator, where shown exact; an
        out-of-memory error is raised as the step's own would be, with its blocks handed back."""
        if not self.exact or self.next is None:
            return False
        blocks: dict[int, Block] = {}
        try:
            for index, (kind, value) in enumerate(self.next):
                if kind == "m":
                    blocks[index] = reserve(value)
                else:
                    release(blocks.pop(value))
        finally:
            for block in blocks.values():  # none after a whole step: it keeps nothing
                release(block)
        return True

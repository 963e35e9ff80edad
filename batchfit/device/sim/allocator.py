"""A model of PyTorch's CUDA caching allocator, so the simulated device fails where a card fails.

A card does not run out of memory when allocated bytes reach its capacity: it runs out when a
request finds no cached free block big enough and no room for a new segment, even after the
allocator has handed its whole-free segments back and retried. Far from the cap the cache
keeps 18-21% more than is allocated (ResNet-50 on an H200); near it the cache is flushed and
the excess falls to ~1%; a huge request that no hole fits (GPT-2's logits) fails with
gigabytes free in fragments (docs/design.md). This replays the malloc/free stream of a
simulated step through the same rules as c10/cuda/CUDACachingAllocator.cpp:

- requests round up to 512 B; up to 1 MiB they come from the small pool, in 2 MiB segments;
  below 10 MiB from 20 MiB segments of the large pool; larger ones get a segment of their own,
  rounded up to 2 MiB;
- a request takes the best-fitting cached free block (smallest, then lowest address) and splits
  off the rest when it is >= 512 B (small pool) or > 1 MiB (large pool);
- freed blocks merge with free neighbours of the same segment; segments are never returned
  except by `empty_cache()` or when a new segment does not fit: then every whole-free segment
  is released and the segment is tried once more (an "alloc retry"), and failing that, the
  request is out of memory.

Simplifications: one stream (no cross-stream events), no expandable segments, no
max_split_size / garbage-collection settings, no CUDA graphs pools, and the request sizes are
the tensors' storage sizes (kernels' private workspaces are not seen; see `workspaces`).
"""

from __future__ import annotations

import bisect
import copy
from dataclasses import dataclass, field

from batchfit.memory import MIN_BLOCK, round_size

MIB = 1024**2
# CUDACachingAllocator.cpp constants (kMinBlockSize and the rounding of every request: memory.py).
SMALL_SIZE = 1 * MIB  # kSmallSize: largest request served by the small pool
SMALL_BUFFER = 2 * MIB  # kSmallBuffer: segment size of the small pool
LARGE_BUFFER = 20 * MIB  # kLargeBuffer: segment size for requests under kMinLargeAlloc
MIN_LARGE_ALLOC = 10 * MIB  # kMinLargeAlloc
ROUND_LARGE = 2 * MIB  # kRoundLarge: larger segments round up to this


class AllocatorOutOfMemory(Exception):
    """A request the modelled allocator cannot serve, even after releasing its cache."""

    def __init__(self, size: int, allocated: int, reserved: int, capacity: int) -> None:
        super().__init__(size, allocated, reserved, capacity)
        self.size, self.allocated, self.reserved, self.capacity = size, allocated, reserved, capacity


def segment_size(size: int) -> int:
    """Bytes of a new segment for a rounded request of `size` (get_allocation_size)."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


@dataclass(frozen=True)
class Peaks:
    """What a trial's measurement reads off the allocator, in one call (one event when recorded)."""

    allocated: int
    reserved: int
    inactive_split: int
    largest_request: int
    alloc_retries: int


@dataclass(eq=False)
class Block:
    """A piece of a segment, allocated or free."""

    address: int
    size: int
    small: bool
    free: bool = False
    prev: Block | None = field(default=None, repr=False)
    next: Block | None = field(default=None, repr=False)

    @property
    def split(self) -> bool:
        return self.prev is not None or self.next is not None


class CachingAllocator:
    """Allocated and reserved bytes, peaks, retries and OOMs of a CUDA caching allocator."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.allocated = 0
        self.reserved = 0
        self.inactive_split = 0  # free bytes inside segments that also hold live blocks
        self.peak_allocated = 0
        self.peak_reserved = 0
        self.peak_inactive_split = 0
        self.largest_request = 0  # largest single request since the last reset_peaks()
        self.num_alloc_retries = 0
        self.num_ooms = 0
        self._pools: dict[bool, list[tuple[int, int]]] = {True: [], False: []}  # (size, address), sorted
        self._free: dict[int, Block] = {}  # address -> free block
        self._next_address = 0
        self.log: list[tuple[str, int]] | None = None
        """While a trial is recorded (`stream.record`): each call, as ('m', bytes asked) then ('b', the
        `id` of the block handed out), ('f', that id), ('e', 0), ('r', 0), and ('p', 0) where the
        peaks are read."""

    def malloc(self, nbytes: int) -> Block:
        """Serve a request of `nbytes`; AllocatorOutOfMemory if the device cannot."""
        if self.log is not None:
            self.log.append(("m", nbytes))
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        self.largest_request = max(self.largest_request, size)
        block = self._best_fit(small, size)
        if block is None:
            block = self._new_segment(size, small)
        if block is None and self._release_cached():
            self.num_alloc_retries += 1
            block = self._new_segment(size, small)
        if block is None:
            self.num_ooms += 1
            raise AllocatorOutOfMemory(size, self.allocated, self.reserved, self.capacity)
        remaining = block.size - size
        if (remaining >= MIN_BLOCK) if small else (remaining > SMALL_SIZE):
            rest = Block(block.address + size, remaining, small, free=True, prev=block, next=block.next)
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            self._insert(rest)
        block.free = False
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        if self.log is not None:
            self.log.append(("b", id(block)))
        return block

    def free(self, block: Block) -> None:
        """Return `block` to its pool, merged with free neighbours."""
        if self.log is not None:
            self.log.append(("f", id(block)))
        self.allocated -= block.size
        block.free = True
        for neighbour in (block.prev, block.next):
            if neighbour is not None and neighbour.free:
                self._remove(neighbour)
                if neighbour is block.prev:
                    block.address, block.prev = neighbour.address, neighbour.prev
                    if neighbour.prev is not None:
                        neighbour.prev.next = block
                else:
                    block.next = neighbour.next
                    if neighbour.next is not None:
                        neighbour.next.prev = block
                block.size += neighbour.size
        self._insert(block)

    def empty_cache(self) -> None:
        """torch.cuda.empty_cache(): hand back every segment that is wholly free."""
        if self.log is not None:
            self.log.append(("e", 0))
        self._release_cached()

    def reset_peaks(self) -> None:
        if self.log is not None:
            self.log.append(("r", 0))
        self.peak_allocated = self.allocated
        self.peak_reserved = self.reserved
        self.peak_inactive_split = self.inactive_split
        self.largest_request = 0

    def peaks(self) -> Peaks:
        """What a trial's measurement reads: the peaks since `reset_peaks`, and the retries so far."""
        if self.log is not None:
            self.log.append(("p", 0))
        return Peaks(
            self.peak_allocated,
            self.peak_reserved,
            self.peak_inactive_split,
            self.largest_request,
            self.num_alloc_retries,
        )

    def copy(self) -> CachingAllocator:
        """An independent copy to replay calls on (device/sim/stream.py). Built block by block, not
        by deepcopy, which recurses along a segment's chain: a 2 MiB segment of 512 B blocks holds 4,096."""
        new = copy.copy(self)
        new.log, new._pools = None, {small: list(pool) for small, pool in self._pools.items()}
        twins: dict[int, Block] = {}
        for free in self._free.values():
            head = free
            while head.prev is not None:
                head = head.prev
            if id(head) in twins:
                continue
            previous, block = None, head  # type: Block | None, Block | None
            while block is not None:
                twin = Block(block.address, block.size, block.small, block.free, prev=previous)
                if previous is not None:
                    previous.next = twin
                twins[id(block)] = previous = twin
                block = block.next
        new._free = {address: twins[id(block)] for address, block in self._free.items()}
        return new

    def _best_fit(self, small: bool, size: int) -> Block | None:
        pool = self._pools[small]
        index = bisect.bisect_left(pool, (size, -1))
        if index == len(pool):
            return None
        block = self._free[pool[index][1]]
        self._remove(block)
        return block

    def _new_segment(self, size: int, small: bool) -> Block | None:
        nbytes = segment_size(size)
        if self.reserved + nbytes > self.capacity:
            return None
        self.reserved += nbytes
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        block = Block(self._next_address, nbytes, small)
        self._next_address += nbytes
        return block

    def _release_cached(self) -> bool:
        """Release every wholly free segment (release_cached_blocks); whether any was."""
        whole = [b for b in self._free.values() if not b.split]
        for block in whole:
            self._remove(block)
            self.reserved -= block.size
        return bool(whole)

    def _insert(self, block: Block) -> None:
        block.free = True
        bisect.insort(self._pools[block.small], (block.size, block.address))
        self._free[block.address] = block
        if block.split:
            self.inactive_split += block.size
            self.peak_inactive_split = max(self.peak_inactive_split, self.inactive_split)

    def _remove(self, block: Block) -> None:
        pool = self._pools[block.small]
        del pool[bisect.bisect_left(pool, (block.size, block.address))]
        del self._free[block.address]
        if block.split:
            self.inactive_split -= block.size

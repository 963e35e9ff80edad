"""The caching-allocator model: CUDACachingAllocator's rules, one at a time, and its invariants."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchfit.device.sim.allocator import MIB, AllocatorOutOfMemory, CachingAllocator, segment_size
from batchfit.memory import round_size


def test_sizes_follow_the_cuda_allocator():
    assert round_size(1) == 512 and round_size(513) == 1024
    assert segment_size(1000) == 2 * MIB  # small pool: 2 MiB segments
    assert segment_size(3 * MIB) == 20 * MIB  # under 10 MiB: 20 MiB segments
    assert segment_size(11 * MIB + 1) == 12 * MIB  # a segment of its own, in 2 MiB steps


def test_small_requests_share_a_segment():
    allocator = CachingAllocator(10**9)
    blocks = [allocator.malloc(1000) for _ in range(3)]
    assert allocator.allocated == 3 * 1024 and allocator.reserved == 2 * MIB
    for block in blocks:
        allocator.free(block)
    assert allocator.allocated == 0 and allocator.reserved == 2 * MIB  # cached, not returned
    allocator.empty_cache()
    assert allocator.reserved == 0


def test_best_fit_splits_and_merges():
    allocator = CachingAllocator(10**9)
    allocator.free(allocator.malloc(30 * MIB))
    a = allocator.malloc(12 * MIB)  # reuses the cached 30 MiB block, splitting off 18 MiB
    assert allocator.reserved == 30 * MIB and allocator.inactive_split == 18 * MIB
    b = allocator.malloc(17 * MIB)  # the 18 MiB rest: 1 MiB left is not worth a split (large pool)
    assert allocator.reserved == 30 * MIB and b.size == 18 * MIB and allocator.inactive_split == 0
    allocator.free(a)
    allocator.free(b)  # merges with its free neighbour into the whole segment again
    allocator.empty_cache()
    assert allocator.reserved == 0 and allocator.allocated == 0


def test_a_full_cache_is_released_and_the_request_retried():
    allocator = CachingAllocator(40 * MIB)
    allocator.free(allocator.malloc(30 * MIB))
    allocator.malloc(32 * MIB)  # 30 cached + 32 new > 40: release the cache, retry
    assert allocator.num_alloc_retries == 1 and allocator.reserved == 32 * MIB


def test_fragmentation_fails_with_free_bytes_to_spare():
    """GPT-2's case: a request larger than every hole fails though the free bytes would cover it."""
    allocator = CachingAllocator(70 * MIB)
    allocator.free(allocator.malloc(60 * MIB))
    first, _second = allocator.malloc(20 * MIB), allocator.malloc(20 * MIB)
    allocator.free(first)  # [20 free][20 used][20 free] in one segment: nothing to release
    assert allocator.reserved - allocator.allocated == 40 * MIB
    with pytest.raises(AllocatorOutOfMemory):
        allocator.malloc(30 * MIB)
    assert allocator.num_ooms == 1 and allocator.num_alloc_retries == 0


def test_peaks_reset():
    allocator = CachingAllocator(10**9)
    allocator.free(allocator.malloc(50 * MIB))
    allocator.reset_peaks()
    assert allocator.peak_allocated == 0 and allocator.peak_reserved == 50 * MIB
    assert allocator.largest_request == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 40 * MIB), st.integers(0, 10**6)), max_size=60))
def test_invariants_under_any_malloc_free_sequence(ops):
    allocator = CachingAllocator(200 * MIB)
    live = []
    for is_malloc, size, pick in ops:
        if is_malloc or not live:
            with contextlib.suppress(AllocatorOutOfMemory):
                live.append(allocator.malloc(size))
        else:
            allocator.free(live.pop(pick % len(live)))
        assert allocator.allocated == sum(b.size for b in live)
        cached = sum(b.size for b in allocator._free.values())
        assert allocator.allocated + cached == allocator.reserved <= allocator.capacity
        assert 0 <= allocator.inactive_split <= cached
        assert allocator.peak_reserved >= allocator.reserved
    for block in live:
        allocator.free(block)
    allocator.empty_cache()
    assert allocator.reserved == 0 and allocator.inactive_split == 0


def test_a_copy_of_thousands_of_blocks_in_one_segment_behaves_as_the_original_and_apart_from_it():
    """deepcopy recursed along a segment's chain (RecursionError at 3,000 blocks of 512 B)."""
    import random

    from batchfit.device.sim.stream import state

    original = CachingAllocator(2**34)
    blocks = [original.malloc(512) for _ in range(3000)] + [original.malloc(3 * 2**20) for _ in range(10)]
    for block in blocks[::2]:
        original.free(block)
    twin = original.copy()
    assert state(twin) == state(original)
    sizes = random.Random(0).choices([512, 4096, 2**20, 5 * 2**20, 30 * 2**20], k=400)
    for allocator in (twin, original):
        live = []
        for i, size in enumerate(sizes):
            live.append(allocator.malloc(size))
            if i % 3 == 0:
                allocator.free(live.pop(0))
    assert state(twin) == state(original) and twin.peak_reserved == original.peak_reserved
    original.free(blocks[1])  # the original's own blocks stay its own
    assert state(twin) != state(original)

import gc

import pytest
import torch

from batchfit.tracker import MemoryTracker, allocated_size, reserved_size


def test_sizes_follow_the_cuda_allocator():
    assert allocated_size(1) == 512
    assert allocated_size(513) == 1024
    assert reserved_size(1000) == 1024
    assert reserved_size(3 * 1024**2 + 1) == 3 * 1024**2 + 512  # shares a 20 MiB segment
    assert reserved_size(11 * 1024**2 + 1) == 12 * 1024**2  # a segment of its own, in 2 MiB steps


def test_counts_once_per_storage_and_frees():
    tracker = MemoryTracker(capacity=10**9)
    with tracker:
        a = torch.empty(1024, dtype=torch.float32)  # 4 KiB
        view = a[:10]  # same storage: not counted again
        b = a * 2
    assert tracker.allocated == 8192
    del a, view, b
    gc.collect()
    assert tracker.allocated == 0
    assert tracker.peak_allocated == 8192


def test_raises_a_real_oom_at_capacity():
    tracker = MemoryTracker(capacity=10_000)
    with pytest.raises(torch.OutOfMemoryError, match=r"CUDA out of memory\. Tried to allocate"), tracker:
        torch.empty(20_000, dtype=torch.uint8)
    gc.collect()
    assert tracker.allocated == 0


def test_views_of_untracked_tensors_are_not_allocations():
    dataset = torch.zeros(10_000)  # made before tracking: host memory, not the device's
    tracker = MemoryTracker(capacity=10_000)
    with tracker:
        row = dataset[5:10]
        dataset.add_(1)
        copy = row * 2
    assert tracker.allocated == 512  # only the product is new
    del row, copy

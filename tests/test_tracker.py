import gc

import pytest
import torch

from batchfit.device.sim.tracker import MemoryTracker


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
    assert tracker.allocator.peak_allocated == 8192


def test_raises_a_real_oom_at_capacity():
    tracker = MemoryTracker(capacity=10_000)
    with pytest.raises(torch.OutOfMemoryError, match=r"CUDA out of memory\. Tried to allocate"), tracker:
        torch.empty(20_000, dtype=torch.uint8)
    gc.collect()
    assert tracker.allocated == 0


def test_views_of_untracked_tensors_are_not_allocations():
    dataset = torch.zeros(10_000)  # made before tracking: host memory, not the device's
    tracker = MemoryTracker(capacity=10**9)
    with tracker:
        row = dataset[5:10]
        dataset.add_(1)
        copy = row * 2
    assert tracker.allocated == 512  # only the product is new
    del row, copy


def test_dropout_saves_a_bool_mask_as_cuda_does():
    from batchfit.device.sim.tracker import CudaKernelRouting

    saved: list[torch.dtype] = []
    x = torch.randn(64, 64, requires_grad=True)
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t)
    with hooks, CudaKernelRouting():
        y = torch.nn.functional.dropout(x, 0.1, training=True)
    assert saved == [torch.bool]  # CPU's own dropout would save a float32 noise tensor
    y.sum().backward()
    assert x.grad is not None
    with CudaKernelRouting():
        assert torch.nn.functional.dropout(x, 0.1, training=False) is x

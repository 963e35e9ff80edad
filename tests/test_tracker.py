import contextlib
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


def test_ctrl_c_while_a_storage_is_freed_is_not_lost():
    """Python drops what a weakref finalizer raises ("Exception ignored in"): a Ctrl-C that came
    while the tracker freed a storage was lost, and the command priced its whole table (CI, torch
    2.13: exit 1 for 130). It is raised again once the finalizer has returned."""
    tracker = MemoryTracker(capacity=10**9)
    free = tracker.allocator.free
    interrupted = []

    def interrupted_free(block):
        if not interrupted:
            interrupted.append(block)
            raise KeyboardInterrupt  # as the signal handler raises it, inside the finalizer
        free(block)

    tracker.allocator.free = interrupted_free
    with pytest.raises(KeyboardInterrupt), tracker:
        a = torch.empty(1024)
        del a  # the finalizer runs here; what it raises would be dropped
        torch.empty(8)  # the next operator raises it
    assert len(interrupted) == 1
    with tracker:
        torch.empty(8)  # raised once, not again
    interrupted.clear()
    with pytest.raises(KeyboardInterrupt), tracker:
        b = torch.empty(1024)
        del b  # no operator after it: leaving the tracker raises it


def test_ctrl_c_that_any_finalizer_drops_is_raised_by_the_next_simulated_operator():
    """Under the command line's SIGINT handler, a Ctrl-C handled inside any weakref callback
    (torch's caches have them; CI: WeakValueDictionary's `remove`) is noted, and raised again."""
    import signal
    import weakref

    from batchfit import interrupts

    class Thing:
        pass

    previous = signal.signal(signal.SIGINT, interrupts.heard)
    try:
        thing = Thing()
        ref = weakref.ref(thing, lambda _: signal.raise_signal(signal.SIGINT))
        del thing  # the callback runs, the handler raises inside it, Python drops it
        assert ref() is None
        with pytest.raises(KeyboardInterrupt), MemoryTracker(capacity=10**9):
            torch.empty(8)
        interrupts.check()  # raised once, not again
    finally:
        signal.signal(signal.SIGINT, previous)
        with contextlib.suppress(KeyboardInterrupt):
            interrupts.check()  # nothing noted left for other tests


def test_a_tensors_device_is_fake_tensors_own_answer_and_allocates_nothing():
    """`prim.device` skips the tracker and FakeTensorMode (read from the fake tensor): the same
    device as the dispatch gives, on fake CUDA tensors and on plain ones."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from batchfit.device.sim import tracker as module

    device = torch.ops.prim.device.default
    with FakeTensorMode() as fake:
        weight = fake.from_tensor(torch.empty(4, 4, device="meta"), static_shapes=True)
        cuda = torch.empty(8, device="cuda")
    assert module._device(cuda) == device(cuda) == torch.device("cuda", 0)
    plain = torch.zeros(3)
    tracker = MemoryTracker(capacity=10**9)
    with tracker:
        assert plain.device == torch.device("cpu") and tracker.allocated == 0
    assert module._device(plain) == torch.device("cpu")
    assert module._device(weight) == device(weight)

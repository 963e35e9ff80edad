import torch

from batchfit.oom import is_oom


def test_oom_type_is_recognised():
    assert is_oom(torch.OutOfMemoryError("anything"))
    assert is_oom(torch.cuda.OutOfMemoryError("anything"))


def test_cuda_messages_are_recognised():
    for text in [
        "CUDA out of memory. Tried to allocate 2.00 GiB",
        "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported",
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
        "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
        "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a non-contiguous input.",
        "CUDA driver error: out of memory",  # Lightning's check counts it; so does batchfit
        "HIP out of memory. Tried to allocate 2.00 GiB",
        "HIP error: out of memory",
        "XPU out of memory. Tried to allocate 2.00 GiB",
        "MPS backend out of memory (MPS allocated: 1.00 GB, other allocations: 0 bytes)",
    ]:
        assert is_oom(RuntimeError(text)), text


def test_real_bugs_are_not_oom():
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"))
    assert not is_oom(ValueError("CUDA out of memory"))  # only RuntimeErrors carry the markers
    assert not is_oom(KeyError("out of memory"))
    assert not is_oom(KeyboardInterrupt())
    # Lightning's broad check ("CUDA" and "out of memory") would call these OOM; they are not.
    assert not is_oom(RuntimeError("CUDA error: an illegal memory access was encountered (out of memory?)"))
    assert not is_oom(RuntimeError("CUDA error: misaligned address; checked after out of memory earlier"))


def test_cudnn_attention_running_out_outside_the_allocator_is_oom():
    """Issue 18 case 16: torch's check_cudnn_sdpa_execution; the marker is not on the first line."""
    text = (
        "cuDNN SDPA execution failed with error code 2\n"
        "CUDA ran out of memory outside PyTorch's allocator. If this workload uses many dynamic shapes, cuDNN may "
        "need additional device memory to JIT-compile shape-specialized kernels."
    )
    assert is_oom(RuntimeError(text))
    assert not is_oom(RuntimeError("cuDNN SDPA execution failed with error code 3: bad strides"))


def test_collections_during_trials_scan_only_what_the_trials_made():
    """The full collections after an OOM and at a session's end scan the objects made since the
    session began (gc.freeze), and leave the process's heap as it was found."""
    import gc
    import weakref

    from batchfit.session import collecting_new_objects_only

    class Node:
        pass

    assert gc.get_freeze_count() == 0
    with collecting_new_objects_only():
        assert gc.get_freeze_count() > 0
        cycle = Node()
        cycle.me = cycle
        gone = weakref.ref(cycle)
        del cycle
        gc.collect()
        assert gone() is None  # a trial's garbage cycle still goes
    assert gc.get_freeze_count() == 0


def test_a_heap_the_user_froze_stays_frozen():
    import gc

    import batchfit

    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        batchfit.find_batch_size(torch.nn.Linear(8, 8), torch.randn(8), device="simulated", memory=2**30)
        assert 0 < gc.get_freeze_count() <= frozen  # not thawed (objects that died left it)
    finally:
        gc.unfreeze()

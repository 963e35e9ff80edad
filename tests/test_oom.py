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

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
    ]:
        assert is_oom(RuntimeError(text)), text


def test_real_bugs_are_not_oom():
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"))
    assert not is_oom(ValueError("CUDA out of memory"))  # only RuntimeErrors carry the markers
    assert not is_oom(KeyError("out of memory"))
    assert not is_oom(KeyboardInterrupt())

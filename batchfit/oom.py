"""Telling an out-of-memory error from a real bug, and cleaning up after one.

Peers that count every exception as "too big" hide real bugs in the user's model, so
recognition is narrow: the OOM type first, then the message markers CUDA libraries use.
"""

from __future__ import annotations

import gc

import torch

_OOM_MARKERS = (
    # c10's CUDACachingAllocator, when it is a RuntimeError rather than OutOfMemoryError.
    "CUDA out of memory",
    # The CUDA runtime's cudaErrorMemoryAllocation, raised through C10_CUDA_CHECK.
    "CUDA error: out of memory",
    # cuBLAS failing to allocate its workspace (torch/csrc/cuda/CUDABlas.cpp checks).
    "CUBLAS_STATUS_ALLOC_FAILED",
    # cuDNN failing to allocate its workspace.
    "CUDNN_STATUS_ALLOC_FAILED",
    # cuDNN turns down some huge convolutions rather than allocating; large batches only.
    "CUDNN_STATUS_NOT_SUPPORTED",
    # The CPU allocator (c10/core/impl/alloc_cpu.cpp) when real CPU memory runs out.
    "DefaultCPUAllocator: can't allocate memory",
    # The CUDA driver API (C10_CUDA_DRIVER_CHECK: "CUDA driver error: " + cuGetErrorString):
    # CUDA_ERROR_OUT_OF_MEMORY, e.g. creating a context or module with the card full.
    # Lightning counts it as OOM too (its check: "CUDA" and "out of memory").
    "CUDA driver error: out of memory",
    # ROCm builds hipify the CUDA messages ("HIP out of memory. Tried to allocate ...",
    # "HIP error: out of memory"); usually an OutOfMemoryError, a RuntimeError through C10 checks.
    "HIP out of memory",
    "HIP error: out of memory",
    # Intel GPUs' caching allocator (c10/xpu) and Apple's MPS allocator. accelerate treats both as
    # OOM; probing runs on CUDA, but a user's own loop may use is_oom on them.
    "XPU out of memory",
    "MPS backend out of memory",
    # cuDNN's attention (check_cudnn_sdpa_execution: "cuDNN SDPA execution failed with error code
    # ..."), whose kernels allocate outside the caching allocator; the marker is on a later line.
    "CUDA ran out of memory outside PyTorch's allocator",
)


def is_oom(error: BaseException) -> bool:
    """True when `error` means the batch did not fit in memory."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    if isinstance(error, RuntimeError):
        text = str(error)
        return any(marker in text for marker in _OOM_MARKERS)
    return False


def release(error: BaseException | None = None) -> None:
    """Free what a failed trial left behind.

    The traceback's frames hold the activations; they must go before gc runs, or the
    next trial starts with the last one's memory still allocated (docs/design.md).
    """
    # Frames, not causes: the tracebacks of the error and of every error in its chain go; the
    # chain itself (a user's `raise X from Y`) stays for the report.
    chain, seen = [error], set()
    while chain:
        link = chain.pop()
        if link is None or id(link) in seen:
            continue
        seen.add(id(link))
        link.__traceback__ = None
        chain += [link.__cause__, link.__context__]
    # The autograd engine keeps a backward that raised (its graph, and every tensor the graph saved:
    # a checkpointed block's recomputed activations) until the next backward runs; a trivial one
    # lets it go (LoRA + checkpointing on GPT-2: 124 MiB held into the next trials before).
    torch.ones((), requires_grad=True).backward()
    gc.collect()

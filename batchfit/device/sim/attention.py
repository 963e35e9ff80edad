"""Which kernel CUDA runs for each scaled_dot_product_attention call, and what it keeps.

On a card, SDPA tries its backends in a priority order and takes the first whose checks pass
(aten/src/ATen/native/transformers/cuda/sdp_utils.cpp, `select_sdp_backend`; the shared checks
are in sdp_utils_cpp.h). The checks read the card (`getCurrentDeviceProperties`), so torch's own
`torch.backends.cuda.can_use_*_attention` answer False for any tensor that is not on a CUDA
device: here they are written out, one function per backend, each check citing its source
(docs/design.md lists them; tests/test_attention.py has a call for each). The call then runs
the chosen backend's own aten op, whose fake kernel allocates what the CUDA kernel returns and
autograd saves what the kernel's backward needs: flash, memory-efficient and cuDNN keep a
logsumexp, the math path keeps the (B, H, L, S) softmax.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

FLASH, EFFICIENT, CUDNN, MATH = "flash", "memory-efficient", "cuDNN", "math"
# at::SDPBackend's values (torch._C._get_sdp_priority_order()); 4 is 'overrideable', never CUDA's.
_BACKEND_IDS = {0: MATH, 1: FLASH, 2: EFFICIENT, 3: CUDNN}
_DEFAULT_ORDER = [1, 2, 0, 3, 4]  # at::Context's sdp_priority_order default
HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class CudaBuild:
    """What the rules read besides the call: the card's compute capability and torch's build."""

    capability: tuple[int, int] = (9, 0)
    cudnn: int | None = None  # the runtime cuDNN version, as torch.backends.cudnn.version()
    cuda: tuple[int, int] = (13, 0)  # torch.version.cuda, the CUDA_VERSION torch was built with
    # cudnn-frontend >= 1.24 (kCuDNNFrontendSupportsD256): compiled in, not visible from Python.
    frontend_d256: bool = False

    @classmethod
    def installed(cls, capability: tuple[int, int] | None) -> CudaBuild:
        """The installed torch's build on a card of `capability` (Hopper's when None)."""
        cuda = tuple(int(p) for p in (torch.version.cuda or "13.0").split(".")[:2])
        return cls(capability or (9, 0), torch.backends.cudnn.version(), cuda)  # type: ignore[arg-type]


def _sm(build: CudaBuild, low: tuple[int, int], high: tuple[int, int]) -> bool:
    return low <= build.capability <= high  # check_sm_version<lower, upper>


@dataclass(frozen=True)
class Call:
    """One SDPA call as the dispatcher sees it (after autocast's casts, unbatched given a batch)."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None = None
    dropout: float = 0.0
    causal: bool = False
    gqa: bool = False

    @property
    def requires_grad(self) -> bool:  # input_requires_grad (sdp_utils_cpp.h)
        return torch.is_grad_enabled() and any(t.requires_grad for t in (self.query, self.key, self.value))

    @property
    def qkv(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.query, self.key, self.value


# Checks shared by the backends: sdp_utils_cpp.h (installed with torch, under include/ATen/).
def _dtypes(call: Call, allowed: tuple[torch.dtype, ...]) -> str | None:  # check_tensor_dtype
    if call.query.dtype in allowed and call.key.dtype == call.value.dtype == call.query.dtype:
        return None
    return f"dtype {call.query.dtype} (needs one of {', '.join(str(d) for d in allowed)})"


def _four_dims(call: Call) -> str | None:  # check_tensor_shapes
    return None if all(t.dim() == 4 for t in call.qkv) else "inputs are not 4-dimensional"


def _heads(call: Call, same_kv_heads: bool = True) -> str | None:  # check_batch_size_and_num_heads_dense
    (b, hq), (bk, hk), (bv, hv) = (t.shape[:2] for t in call.qkv)
    if not b == bk == bv:
        return "batch sizes differ"
    if call.gqa:  # check_grouped_query_attention
        if (same_kv_heads and hk != hv) or hq % hk or (not same_kv_heads and hq % hv):
            return f"heads {hq}/{hk}/{hv} are not grouped-query heads"
        return None
    if hq == hk == hv or (hq > 0 and hk == hv == 1):  # supports_mqa: true for all three
        return None
    return f"heads {hq}/{hk}/{hv} differ without enable_gqa"


def _dense(call: Call, ignore_singleton: bool, same_kv_heads: bool = True) -> str | None:
    if call.query.shape[-2] == 0 or call.key.shape[-2] == 0:  # check_nonzero_sequence_lengths_dense
        return "a sequence of length 0"
    # check_last_dim_stride_equals_1_dense: on a CUDA device the mask's last stride counts too.
    unit = all(t.stride(-1) == 1 for t in call.qkv) or (ignore_singleton and call.query.shape[-1] == 1)
    if not unit or (call.mask is not None and call.mask.stride(-1) != 1):
        return "last dimension not contiguous"
    return _heads(call, same_kv_heads)


def _mask_shape(call: Call) -> str | None:  # check_attn_mask_shape
    mask = call.mask
    if mask is None:
        return None
    if mask.requires_grad:
        return "mask requires grad"
    (b, h, lq, _), lk = call.query.shape, call.key.shape[-2]
    fits = mask.shape[-2] in (lq, 1) and mask.shape[-1] in (lk, 1)
    if fits and (mask.dim() == 2 or (mask.dim() == 4 and mask.shape[0] in (b, 1) and mask.shape[1] in (h, 1))):
        return None
    return f"mask of shape {tuple(mask.shape)}"


def _gemm_alignment(call: Call, build: CudaBuild) -> int:  # minimum_gemm_alignment (sdp_utils.cpp)
    half, major = call.query.dtype in HALF, build.capability[0]
    tensor_cores = major >= 8 or (major >= 7 and half)
    return max(4 if major >= 8 else 1, (128 // (16 if half else 32)) if tensor_cores else 1)


# One function per backend: None when it can run the call, else the first check that refuses it.
def flash_refusal(call: Call, build: CudaBuild) -> str | None:
    """can_use_flash_attention (sdp_utils.cpp), its checks in the source's order."""
    q, k, v = call.qkv
    d = q.shape[-1]
    if not torch.backends.cuda.flash_sdp_enabled():
        return "disabled (sdpa_kernel)"
    if reason := _four_dims(call):
        return reason
    if call.mask is not None:  # check_for_attn_mask
        return "an attn_mask"
    if not (d == k.shape[-1] == v.shape[-1] and d <= 256):  # check_head_dim_size_flash
        return f"head dims {d}/{k.shape[-1]}/{v.shape[-1]} (needs equal, <= 256)"
    if not _sm(build, (8, 0), (12, 1)):  # check_flash_attention_hardware_support
        return f"sm {build.capability[0]}.{build.capability[1]} (needs 8.0-12.1)"
    sm86_89 = _sm(build, (8, 6), (8, 9)) or _sm(build, (12, 0), (12, 1))
    if call.requires_grad and sm86_89 and not (d <= 192 or (call.dropout == 0 and d > 224)):
        return f"training head dim {d} on sm 8.6-8.9/12.x"  # check_requires_grad_and_head_dim_gt192...
    if call.causal and q.shape[-2] != k.shape[-2]:  # check_flash_causal_non_square_seqlens
        return "is_causal with seqlen_q != seqlen_k"
    fa3 = build.capability[0] >= 9 and torch._C._get_fa3_sdp_enabled()  # check_dtypes_flash_attention
    allowed = (torch.float8_e4m3fn, *HALF) if fa3 else HALF if build.capability[0] >= 8 else (torch.float16,)
    return _dtypes(call, allowed) or _dense(call, ignore_singleton=True)


def efficient_refusal(call: Call, build: CudaBuild) -> str | None:
    """can_use_mem_efficient_attention (sdp_utils.cpp)."""
    q, k, v = call.qkv
    if not torch.backends.cuda.mem_efficient_sdp_enabled():
        return "disabled (sdpa_kernel)"
    if not _sm(build, (5, 0), (12, 1)):  # check_mem_efficient_hardware_support
        return f"sm {build.capability[0]}.{build.capability[1]} (needs 5.0-12.1)"
    if reason := _four_dims(call):
        return reason
    align = _gemm_alignment(call, build)  # check_head_dim_size_mem_efficient
    dq, dv = q.shape[-1], v.shape[-1]
    if not (dq == k.shape[-1] and dq > 0 and dv > 0 and dq % align == 0 and dv % align == 0):
        return f"head dims {dq}/{dv} not multiples of {align}"
    offsets = (t.storage_offset() * t.element_size() % (align * t.element_size()) for t in call.qkv)
    if build.capability[0] >= 8 and any(offsets):  # check_data_ptr_alignment_mem_efficient
        return "inputs' storage offsets not aligned"
    if reason := _dense(call, ignore_singleton=False):
        return reason
    return _dtypes(call, (*HALF, torch.float32) if build.capability[0] >= 8 else (torch.float16, torch.float32))


def cudnn_refusal(call: Call, build: CudaBuild) -> str | None:
    """can_use_cudnn_attention (sdp_utils.cpp): general, then dense, then shape checks."""
    version, (major, minor) = build.cudnn, build.capability
    if version is None or version < 90000:
        return "torch built without cuDNN 9"
    if call.dropout > 0 and 91100 < version < 91400:
        return "dropout with cuDNN 9.11-9.13"
    if not torch.backends.cuda.cudnn_sdp_enabled():
        return "disabled (sdpa_kernel)"
    if reason := _four_dims(call):
        return reason
    if torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled():
        return "deterministic algorithms"  # check_cudnn_deterministic
    if reason := _dtypes(call, HALF if major >= 8 else (torch.float16,)) or _mask_shape(call):
        return reason
    if not _sm(build, (8, 0), (12, 1)):  # check_cudnn_hardware_support
        return f"sm {major}.{minor} (needs 8.0-12.1)"
    if call.dropout * 16 != math.floor(call.dropout * 16):  # check_cudnn_dropout
        return f"dropout {call.dropout} not a multiple of 1/16"
    if reason := _dense(call, ignore_singleton=True, same_kv_heads=False):
        return reason
    return _cudnn_shapes(call, build)


def _cudnn_shapes(call: Call, build: CudaBuild) -> str | None:
    """check_cudnn_tensor_shapes and check_cudnn_d256_bprop_head_dim (sdp_utils.cpp)."""
    (b, h, s_q, d_qk), s_k, d_v = call.query.shape, call.key.shape[-2], call.value.shape[-1]
    version, (major, minor) = build.cudnn or 0, build.capability
    if b > 65535 or h > 65535:
        return "batch or heads over 65535"
    sm90_10x = (major, minor) == (9, 0) or major == 10
    d256 = sm90_10x and not ((major, minor) == (10, 7) and version <= 92500) and version > 92200
    d256 = d256 and build.frontend_d256
    limit = 256 if d256 else 192 if sm90_10x and version >= 91100 and (d_qk, d_v) == (192, 128) else 128
    if d_qk > limit or d_v > limit or d_qk % 8 or d_v % 8:
        return f"head dims {d_qk}/{d_v} (needs multiples of 8, <= {limit})"
    if s_k == 1 or (call.dropout and s_q == 1):
        return "sequence of length 1"
    if call.requires_grad and d256 and not ((d_qk <= 128 and d_v <= 128) or (d_qk, d_v) in ((192, 128), (256, 256))):
        return f"backward with head dims {d_qk}/{d_v}"
    return None


REFUSALS = {FLASH: flash_refusal, EFFICIENT: efficient_refusal, CUDNN: cudnn_refusal}


def priority(build: CudaBuild) -> list[str]:
    """The order backends are tried in: the user's (sdpa_kernel(..., set_priority=True)), else the
    default, with cuDNN first where torch prefers it (check_prefer_cudnn_attention)."""
    order = torch._C._get_sdp_priority_order()
    deprioritized = os.environ.get("TORCH_CUDNN_SDPA_DEPRIORITIZED", "").upper() in ("1", "ON", "YES", "TRUE", "Y")
    major, minor = build.capability
    prefer = not deprioritized and (build.cudnn or 0) > 91500 and major in (9, 10)
    if prefer and build.cuda < (13, 0):
        prefer = minor in (0, 3)
    if order == _DEFAULT_ORDER and prefer:
        order = [3, 1, 2, 0]
    return [_BACKEND_IDS[i] for i in order if i in _BACKEND_IDS]


def choose(call: Call, build: CudaBuild) -> str:
    """select_sdp_backend: the first backend in priority order that can run the call."""
    enabled = torch.backends.cuda
    for backend in priority(build):
        if backend == MATH:
            if enabled.math_sdp_enabled():
                return MATH
        elif REFUSALS[backend](call, build) is None:
            return backend
    reasons = "; ".join(f"{name}: {REFUSALS[name](call, build)}" for name in REFUSALS)
    raise RuntimeError(f"No available kernel. Aborting execution. ({reasons})")

"""CUDA's autocast policy, applied to the simulated device's CPU tensors.

The simulated device runs on (fake) CPU tensors, and CPU autocast casts by other lists than
CUDA's: CUDA runs pow, exp, softmax, layer_norm, sum, … in fp32 and casts mv/addmv down, CPU
does neither. Which dtype an op runs in decides what autograd saves for backward (GPT-2's
GELU calls pow: 216 MiB a sample at seq 1024, docs/design.md), so while a simulated session
runs autocast, every op of either list gets a kernel at the AutocastCPU key that applies
CUDA's policy. The lists are those of ATen's autocast_mode.h / autocast_mode.cpp (the
AutocastCUDA registrations); tests check them against the installed torch's dispatcher.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

# AT_FORALL_LOWER_PRECISION_FP, plus the cuDNN kernels registered beside it and _cudnn_rnn
# (aten/src/ATen/native/cudnn/AutocastRNN.cpp).
LOWER_PRECISION = (
    "_convolution", "_convolution.deprecated", "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d",
    "conv_transpose2d.input", "conv_transpose3d.input", "convolution", "cudnn_convolution",
    "cudnn_convolution_transpose", "prelu", "addmm", "addmv", "addr", "matmul", "einsum", "mm", "mv",
    "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm", "chain_matmul", "linalg_multi_dot",
    "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell",
    "_scaled_dot_product_flash_attention", "scaled_dot_product_attention", "_cudnn_rnn",
)  # fmt: skip
# AT_FORALL_FP32: every floating input cast to fp32.
FP32 = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "layer_norm",
    "native_layer_norm", "group_norm", "rms_norm", "frobenius_norm.dim", "nuclear_norm", "nuclear_norm.dim",
    "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d",
    "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss",
    "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
    "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
    "linalg_matrix_sqrth", "upsample_nearest1d", "_upsample_nearest_exact1d", "upsample_nearest2d",
    "_upsample_nearest_exact2d", "upsample_nearest3d", "_upsample_nearest_exact3d", "upsample_linear1d",
    "upsample_bilinear2d", "_upsample_bilinear2d_aa", "upsample_trilinear3d", "upsample_bicubic2d",
    "_upsample_bicubic2d_aa",
)  # fmt: skip
# AT_FORALL_FP32_SET_OPT_DTYPE: run in fp32 through the op's own `dtype` argument.
FP32_SET_OPT_DTYPE = (
    "prod", "prod.dim_int", "softmax.int", "log_softmax.int", "cumprod", "cumsum", "linalg_vector_norm",
    "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "sum", "sum.dim_IntList",
)  # fmt: skip
# AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE: norm without a dtype becomes norm with dtype=fp32.
FP32_APPEND_DTYPE = {"norm.Scalar": "ScalarOpt_dtype", "norm.ScalarOpt_dim": "ScalarOpt_dim_dtype"}
# AT_FORALL_PROMOTE (+ vdot): the widest floating input's type.
PROMOTE = (
    "addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler", "index_put", "tensordot",
    "scatter_add",
)  # fmt: skip
# autocast_mode.cpp registers this one to raise on CUDA (and to run in fp32 on CPU).
BANNED = ("binary_cross_entropy",)
BANNED_MESSAGE = (
    "torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to autocast (CUDA refuses them); "
    "use binary_cross_entropy_with_logits or BCEWithLogitsLoss"
)

_AUTOCAST_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)


def cuda_policy() -> dict[str, str]:
    """Op name ('pow.Tensor_Scalar') -> CUDA's cast policy for it."""
    policy = {name: "lower" for name in LOWER_PRECISION}
    policy.update({name: "fp32" for name in FP32})
    policy.update({name: "fp32_set_opt_dtype" for name in FP32_SET_OPT_DTYPE})
    policy.update({name: "fp32_append_dtype" for name in FP32_APPEND_DTYPE})
    policy.update({name: "promote" for name in PROMOTE})
    policy.update({name: "banned" for name in BANNED})
    return policy


def registered(dispatch_key: str) -> set[str]:
    """Names of the aten ops with a kernel at `dispatch_key` in the installed torch."""
    names = set()
    for full in torch._C._dispatch_get_all_op_names():
        if full.startswith("aten::") and torch._C._dispatch_has_kernel_for_dispatch_key(full, dispatch_key):
            names.add(full[len("aten::") :])
    return names


def _overload(name: str) -> Any:
    base, _, overload = name.partition(".")
    packet = getattr(torch.ops.aten, base, None)
    return getattr(packet, overload or "default", None) if packet is not None else None


class CudaAutocastPolicy:
    """CUDA's casting rules for CPU autocast, installed while a simulated session runs.

    The kernels are process-wide while installed (the dispatcher has no per-thread table);
    `installed()` removes them again, which restores CPU's own kernels.
    """

    _lock = threading.Lock()

    def __init__(self) -> None:
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    _owner: int | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if CudaAutocastPolicy._owner == threading.get_ident():
            # The dispatcher takes one Python kernel per op and key: a nested session cannot stack.
            raise RuntimeError("a simulated-device session is already running in this thread; they do not nest")
        with self._lock:
            CudaAutocastPolicy._owner = threading.get_ident()
            library = torch.library.Library("aten", "IMPL")
            clear = torch.clear_autocast_cache

            def clear_both() -> None:
                # Autocast drops its cast weights where its outermost region exits; so do these, on
                # the same call (checkpoint's recompute in backward opens and closes a region of its own).
                clear()
                self._cache.clear()

            torch.clear_autocast_cache = clear_both
            try:
                policy = cuda_policy()
                with warnings.catch_warnings():
                    # Replacing CPU's autocast kernels is the point; torch warns on every override.
                    warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
                    self._register(library, policy)
                yield
            finally:
                torch.clear_autocast_cache = clear
                library._destroy()
                self._cache.clear()
                CudaAutocastPolicy._owner = None

    def _register(self, library: Any, policy: dict[str, str]) -> None:
        for name in registered("AutocastCPU") | set(policy):
            op = _overload(name)
            if op is None:  # an op this torch does not have
                continue
            if name in policy:
                library.impl(name, self._kernel(op, name, policy[name]), "AutocastCPU")
            else:
                # Not on CUDA's lists: no cast here, and ops it decomposes into (a padded
                # conv into convolution) still meet autocast, as they do on CUDA.
                library.impl(name, torch.library.fallthrough_kernel, "AutocastCPU")

    def clear_cache(self) -> None:
        """Drop cast weights, as autocast does when its outermost region exits."""
        self._cache.clear()

    def _cast(self, value: Any, dtype: torch.dtype) -> Any:
        if isinstance(value, (list, tuple)):
            return type(value)(self._cast(v, dtype) for v in value)
        if not _eligible(value) or value.dtype == dtype:
            return value
        # autocast caches the low-precision copy of fp32 leaf weights for the whole region.
        if (
            dtype == torch.get_autocast_dtype("cpu")
            and value.dtype == torch.float32
            and value.requires_grad
            and value.is_leaf
            and not value._is_view()
            and torch.is_autocast_cache_enabled()
        ):
            hit = self._cache.get(id(value))
            if hit is None:
                hit = self._cache[id(value)] = (value, value.to(dtype))
            return hit[1]
        return value.to(dtype)

    def _kernel(self, op: Any, name: str, policy: str) -> Callable[..., Any]:
        schema_names = [a.name for a in op._schema.arguments]
        dtype_index = schema_names.index("dtype") if "dtype" in schema_names else None
        append: Any = _overload(f"norm.{FP32_APPEND_DTYPE[name]}") if policy == "fp32_append_dtype" else None

        def kernel(*args: Any, **kwargs: Any) -> Any:
            with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_CPU):
                if policy == "banned":
                    raise RuntimeError(BANNED_MESSAGE)
                if policy in ("lower", "fp32", "promote"):
                    if policy == "lower":
                        dtype = torch.get_autocast_dtype("cpu")
                    elif policy == "fp32":
                        dtype = torch.float32
                    else:
                        dtype = _widest(args, kwargs)
                    args = tuple(self._cast(a, dtype) for a in args)
                    kwargs = {k: self._cast(v, dtype) for k, v in kwargs.items()}
                elif policy == "fp32_set_opt_dtype" and args and _eligible(args[0]) and dtype_index is not None:
                    if dtype_index < len(args):
                        if args[dtype_index] is None:
                            args = (*args[:dtype_index], torch.float32, *args[dtype_index + 1 :])
                    elif kwargs.get("dtype") is None:
                        kwargs = {**kwargs, "dtype": torch.float32}
                elif policy == "fp32_append_dtype":
                    out = torch.float32 if _eligible(args[0]) else args[0].dtype
                    p = args[1] if len(args) > 1 else kwargs.get("p", 2)
                    if name == "norm.Scalar":
                        return append(args[0], p, dtype=out)
                    keepdim = args[3] if len(args) > 3 else kwargs.get("keepdim", False)
                    return append(args[0], p, args[2] if len(args) > 2 else kwargs["dim"], keepdim, dtype=out)
                return op(*args, **kwargs)

        return kernel


def _eligible(value: Any) -> bool:
    # autocast_mode.h is_eligible: a defined floating tensor of the device, never double.
    return (
        isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and value.dtype != torch.float64
        and value.device.type == "cpu"
    )


def _widest(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.dtype:
    """autocast's promote_type: fp32 if any eligible input is fp32, else the low-precision type."""
    flat: list[Any] = []
    for value in (*args, *kwargs.values()):
        flat.extend(value if isinstance(value, (list, tuple)) else [value])
    if any(_eligible(v) and v.dtype == torch.float32 for v in flat):
        return torch.float32
    return torch.get_autocast_dtype("cpu")

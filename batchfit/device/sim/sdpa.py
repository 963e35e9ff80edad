"""Every scaled_dot_product_attention call of a simulated trial, run on the backend CUDA picks.

attention.py decides the backend by torch's rules; this runs it the way ATen's composite
`scaled_dot_product_attention` (aten/src/ATen/native/transformers/attention.cpp) runs it on a
card: autocast's casts first, a boolean mask made additive, flash's head dimension padded to a
multiple of 8, the memory-efficient kernel's bias aligned, then the backend's own aten op. On
fake tensors those ops' meta kernels give the kernels' outputs (output, logsumexp, RNG state)
and autograd keeps what their backward takes; the math path keeps its softmax.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch
from torch.nn import functional as F

from batchfit.device.sim.attention import CUDNN, EFFICIENT, FLASH, MATH, Call, CudaBuild, choose

aten = torch.ops.aten


class AttentionRouter:
    """Runs each SDPA call on CUDA's backend for `build`, and counts the backends per trial."""

    def __init__(self, build: CudaBuild) -> None:
        self.build = build
        self.counts: Counter[str] = Counter()  # the trial running now
        self.step: Counter[str] = Counter()  # a step of the last trial that ended well

    def start(self) -> None:
        """A trial begins."""
        self.counts = Counter()

    def finish(self, steps: int) -> None:
        """A trial of `steps` steps ended without an error: its calls a step are the ones noted."""
        if steps:
            self.step = Counter({name: n // steps for name, n in self.counts.items()})

    def summary(self) -> str | None:
        """The note saying which backends were assumed, or None before any attention call."""
        if not self.step:
            return None
        calls = ", ".join(f"{n} calls {name}" if n > 1 else f"1 call {name}" for name, n in self.step.most_common())
        major, minor = self.build.capability
        return f"attention: {calls} a step, the SDPA backends CUDA picks on sm {major}.{minor} by this torch's rules"

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if any(t.is_nested for t in args[:3] if isinstance(t, torch.Tensor)):  # nested inputs: left to torch
            return F.scaled_dot_product_attention(*args, **kwargs)
        call, scale, unbatched = as_call("cpu", *args, **kwargs)
        backend = choose(call, self.build)
        self.counts[backend] += 1
        with torch.autocast("cpu", enabled=False):  # CUDA's autocast kernel runs the op below it
            out = run(backend, call, scale)
        return out.squeeze(0) if unbatched else out


def as_call(
    autocast_device: str,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[Call, float | None, bool]:
    """SDPA's arguments as its backends see them, the scale, and whether the call was unbatched.

    Autocast's cast first (CUDA's policy for SDPA is lower_precision_fp: every floating input
    but fp64 cast down), then normalize_unbatched_input gives 3-d inputs a batch dimension.
    """
    if torch.is_autocast_enabled(autocast_device):
        low = torch.get_autocast_dtype(autocast_device)

        def cast(t: Any) -> Any:
            return t.to(low) if t is not None and t.is_floating_point() and t.dtype not in (low, torch.float64) else t

        query, key, value, attn_mask = cast(query), cast(key), cast(value), cast(attn_mask)
    unbatched = query.dim() == key.dim() == value.dim() == 3
    if unbatched:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        while attn_mask is not None and attn_mask.dim() < 4:
            attn_mask = attn_mask.unsqueeze(0)
    return Call(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa), scale, unbatched


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """convert_boolean_attn_mask: a boolean mask becomes 0 / -inf of the query's dtype."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.where(mask, 0.0, torch.tensor(-math.inf, dtype=dtype))


def run(backend: str, call: Call, scale: float | None) -> torch.Tensor:
    """The call on `backend`, keeping for backward what that backend keeps."""
    from torch._subclasses.fake_tensor import FakeTensor

    q, k, v = call.qkv
    mask = _additive(call.mask, q.dtype)
    if backend == MATH:
        return _math(call, mask, scale)
    if not isinstance(q, FakeTensor):  # real CPU arithmetic: no CPU kernel for CUDA's fused ops
        return _Recomputed.apply(q, k, v, mask, call.causal, scale, call.gqa)
    if backend == FLASH:
        d = q.shape[-1]
        if d % 8:  # pad_last_dim<8>: copies the flash kernel keeps for backward
            q, k, v = (F.pad(t, (0, 8 - d % 8)) for t in (q, k, v))
        scale = scale if scale is not None else 1 / math.sqrt(d)
        return aten._scaled_dot_product_flash_attention(q, k, v, call.dropout, call.causal, False, scale=scale)[0][
            ..., :d
        ]
    if backend == EFFICIENT:
        if mask is not None:
            mask = _aligned_bias(mask).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])  # preprocess_mask
        return aten._scaled_dot_product_efficient_attention(
            q, k, v, mask, call.requires_grad, call.dropout, call.causal, scale=scale
        )[0]
    assert backend == CUDNN  # compute_log_sumexp: should_compute_logsumexp, which is input_requires_grad
    return aten._scaled_dot_product_cudnn_attention(
        q, k, v, mask, call.requires_grad, call.dropout, call.causal, False, scale=scale
    )[0]


def _aligned_bias(mask: torch.Tensor) -> torch.Tensor:
    """aligned_tensor<8> / pad_bias<8>: a bias whose strides are not multiples of 8 is copied padded."""
    if all(s % 8 == 0 for s in mask.stride()[:-1]) and mask.stride(-1) == 1:
        return mask
    last = mask.shape[-1]
    return F.pad(mask, (0, 8 - last % 8))[..., :last]


def _math(call: Call, mask: torch.Tensor | None, scale: float | None) -> torch.Tensor:
    """_scaled_dot_product_attention_math, whose dropout on CUDA is native_dropout (a bool mask
    kept); on CPU it would keep a float noise tensor, so the kept elements are passed in."""
    q, k, v = call.qkv
    keep = None
    if call.dropout > 0:
        shape = torch.broadcast_shapes((*q.shape[:-1], k.shape[-2]), mask.shape if mask is not None else ())
        keep = torch.empty(shape, dtype=torch.bool, device=q.device).bernoulli_(1 - call.dropout)
    return aten._scaled_dot_product_attention_math(
        q, k, v, mask, call.dropout, call.causal, keep, scale=scale, enable_gqa=call.gqa
    )[0]


class _Recomputed(torch.autograd.Function):
    """A fused kernel with real CPU numbers: the output and a logsumexp are kept, as on CUDA, and
    backward recomputes the attention (the math path's memory, briefly). Dropout is not applied."""

    @staticmethod
    def forward(ctx: Any, q: Any, k: Any, v: Any, mask: Any, causal: bool, scale: Any, gqa: bool) -> Any:
        out = F.scaled_dot_product_attention(q, k, v, mask, 0.0, causal, scale=scale, enable_gqa=gqa)
        logsumexp = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, mask, out, logsumexp)
        ctx.options = causal, scale, gqa
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        causal, scale, gqa = ctx.options
        saved, needs = ctx.saved_tensors[:4], ctx.needs_input_grad[:4]
        inputs = [None if t is None else t.detach().requires_grad_(n) for t, n in zip(saved, needs, strict=True)]
        with torch.enable_grad():
            out = aten._scaled_dot_product_attention_math(*inputs, 0.0, causal, None, scale=scale, enable_gqa=gqa)[0]
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad))
        return (*(next(grads) if t is not None and t.requires_grad else None for t in inputs), None, None, None)

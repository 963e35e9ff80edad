"""The simulated device's SDPA backend, call by call, by CUDA's rules (device/sim/attention.py)."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest
import torch
from conftest import needs_hf
from torch.nn.attention import SDPBackend, sdpa_kernel

from batchfit.device.sim.attention import (
    CUDNN,
    EFFICIENT,
    FLASH,
    MATH,
    Call,
    CudaBuild,
    choose,
    cudnn_refusal,
    efficient_refusal,
    flash_refusal,
)
from batchfit.device.sim.sdpa import AttentionRouter

H100 = CudaBuild((9, 0), cudnn=92400, cuda=(13, 0))
A100 = CudaBuild((8, 0), cudnn=92400, cuda=(13, 0))
A10G = CudaBuild((8, 6), cudnn=92400, cuda=(13, 0))
T4 = CudaBuild((7, 5), cudnn=92400, cuda=(13, 0))
HALF = torch.float16


def qkv(
    d: int = 64, dtype: torch.dtype = HALF, heads: tuple[int, int] = (8, 8), seq: tuple[int, int] = (128, 128)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, H, L, d) query, key and value on the meta device: the rules read only their metadata."""
    q = torch.empty(2, heads[0], seq[0], d, dtype=dtype, device="meta", requires_grad=True)
    k = torch.empty(2, heads[1], seq[1], d, dtype=dtype, device="meta", requires_grad=True)
    return q, k, torch.empty_like(k).requires_grad_()


def mask(*shape: int, grad: bool = False) -> torch.Tensor:
    return torch.empty(*shape, dtype=HALF, device="meta", requires_grad=grad)


# One call per rule: the backend a card must give it.
@pytest.mark.parametrize(
    ("call", "build", "expected"),
    [
        (Call(*qkv()), H100, CUDNN),  # Hopper with cuDNN > 9.15: cuDNN first (check_prefer_cudnn_attention)
        (Call(*qkv()), A100, FLASH),  # sm 8.0: the default order, flash first
        (Call(*qkv(dtype=torch.float32)), H100, EFFICIENT),  # fp32: flash and cuDNN take fp16/bf16 only
        (Call(*qkv(), mask(128, 128)), A100, EFFICIENT),  # flash takes no mask
        (Call(*qkv(), mask(2, 1, 128, 128)), H100, CUDNN),  # cuDNN takes a 4-d broadcastable mask
        (Call(*qkv(), mask(2, 8, 128, 128, grad=True)), H100, EFFICIENT),  # ... not one that requires grad
        (Call(*qkv(), mask(8, 128, 128)), H100, EFFICIENT),  # ... nor a 3-d one
        (Call(*qkv(), dropout=0.1), H100, FLASH),  # cuDNN's dropout is in 1/16ths
        (Call(*qkv(), dropout=0.125), H100, CUDNN),
        (Call(*qkv(d=256)), A100, FLASH),  # flash: head dim <= 256
        (Call(*qkv(d=288)), A100, EFFICIENT),
        (Call(*qkv(d=6, dtype=torch.float32)), A100, MATH),  # memory-efficient: fp32 head dim % 4 on sm80+
        (Call(*qkv(d=6, dtype=torch.float32)), T4, EFFICIENT),  # ... % 1 below sm80
        (Call(*qkv(d=200)), A10G, EFFICIENT),  # flash: no training with head dim (192, 224] on sm 8.6
        (Call(*qkv(), causal=True), A100, FLASH),
        (Call(*qkv(seq=(64, 128)), causal=True), A100, EFFICIENT),  # flash: causal needs L == S
        (Call(*qkv(dtype=torch.bfloat16)), T4, MATH),  # sm 7.5: no flash, no bf16 memory-efficient
        (Call(*qkv()), T4, EFFICIENT),
        (Call(*qkv(heads=(32, 8)), gqa=True), A100, FLASH),  # grouped-query heads with enable_gqa
        (Call(*qkv(heads=(32, 8))), A100, MATH),  # ... refused without it
        (Call(*qkv(heads=(32, 1))), A100, FLASH),  # multi-query heads need no flag
    ],
)
def test_each_rule_lands_on_its_backend(call: Call, build: CudaBuild, expected: str) -> None:
    assert choose(call, build) == expected


def test_rules_that_read_strides_offsets_and_grad_mode() -> None:
    _, k, v = qkv()
    transposed = torch.empty(2, 8, 64, 128, dtype=HALF, device="meta").transpose(-1, -2)
    assert flash_refusal(Call(transposed, k, v), A100) == "last dimension not contiguous"
    shifted = torch.empty(2 * 8 * 128 * 64 + 1, dtype=HALF, device="meta")[1:].view(2, 8, 128, 64)
    assert efficient_refusal(Call(shifted, k, v), A100) == "inputs' storage offsets not aligned"
    assert flash_refusal(Call(*qkv(d=200)), A10G) is not None
    with torch.no_grad():  # inference with head dim 200 on sm 8.6 is flash's
        assert flash_refusal(Call(*qkv(d=200)), A10G) is None
    assert cudnn_refusal(Call(*qkv(seq=(128, 1))), H100) == "sequence of length 1"
    assert cudnn_refusal(Call(*qkv()), CudaBuild((9, 0), cudnn=None)) == "torch built without cuDNN 9"


def test_user_settings_are_respected(monkeypatch: pytest.MonkeyPatch) -> None:
    call = Call(*qkv())
    with sdpa_kernel(SDPBackend.MATH):
        assert choose(call, H100) == MATH
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION], set_priority=True):
        assert choose(call, H100) == EFFICIENT
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), pytest.raises(RuntimeError, match="No available kernel"):
        choose(Call(*qkv(), mask(128, 128)), H100)
    torch.use_deterministic_algorithms(True)
    try:
        assert choose(call, H100) == FLASH  # cuDNN's SDPA is not deterministic
    finally:
        torch.use_deterministic_algorithms(False)
    monkeypatch.setenv("TORCH_CUDNN_SDPA_DEPRIORITIZED", "1")
    assert choose(call, H100) == FLASH
    monkeypatch.delenv("TORCH_CUDNN_SDPA_DEPRIORITIZED")
    assert choose(call, CudaBuild((9, 0), cudnn=91500)) == FLASH  # cuDNN first only above 9.15
    assert choose(call, CudaBuild((9, 0), cudnn=92400, cuda=(12, 8))) == CUDNN
    assert choose(call, CudaBuild((10, 1), cudnn=92400, cuda=(12, 8))) == FLASH  # CUDA 12: sm x.0 / x.3 only


def test_installed_torch_has_the_checks_the_rules_copy() -> None:
    """sdp_utils.cpp is not installed; the messages of the checks attention.py copies are, in
    libtorch_cuda.so. A torch whose rules changed is caught here (and its default order)."""
    assert torch._C._get_sdp_priority_order() == [1, 2, 0, 3, 4]
    library = Path(torch.__file__).parent / "lib" / "libtorch_cuda.so"
    if not library.exists():
        pytest.skip("a torch without CUDA: nothing to check against")
    messages = [
        b"Flash attention only supports gpu architectures in the range [sm80, sm121]",
        b"Mem Efficient Attention only supports gpu architectures in the range [sm50, sm121]",
        b"cuDNN MHA only supports gpu architectures in the range [sm80, sm121]",
        b"requires q,k,v to have the same last dimension and to be less than or equal to 256.",
        b"Flash attention currently doesn't support training with head_dim",
        b"Flash attention does not support the is_causal flag when seqlen_q != seqlen_k.",
        b"Mem efficient attention on sm80 or newer requires q, k, and v storage offsets",
        b"cuDNN dropout probability resolution is limited to 1/16.",
        b"cudnn SDPA does not support key/value sequence length 1.",
        b"cuDNN SDPA on SM 9.0/10.x does not support backward with these head dimensions",
        b"cuDNN SDPA is not deterministic.",
        b"TORCH_CUDNN_SDPA_DEPRIORITIZED",
    ]
    with open(library, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as image:
        missing = [m.decode() for m in messages if image.find(m) < 0]
    assert not missing


def saved_by(fn, *args, **kwargs) -> tuple[int, list[torch.dtype], int]:  # type: ignore[no-untyped-def]
    """Bytes, dtypes and the largest element count of what autograd keeps for backward of fn(*args)."""
    seen: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen.setdefault(id(t.untyped_storage()), t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    out.sum().backward()
    kept = seen.values()
    return sum(t.untyped_storage().nbytes() for t in kept), [t.dtype for t in kept], max(t.numel() for t in kept)


def real_qkv(dtype: torch.dtype = torch.float32, d: int = 64) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(2, 4, 96, d, dtype=dtype, requires_grad=True) for _ in range(3)]


def test_math_keeps_what_torchs_math_path_keeps() -> None:
    bias = torch.randn(2, 4, 96, 96)
    router = AttentionRouter(T4)  # bf16 on sm 7.5: math
    ours = saved_by(router, *real_qkv(torch.bfloat16), bias.bfloat16())
    with sdpa_kernel(SDPBackend.MATH):
        torchs = saved_by(torch.nn.functional.scaled_dot_product_attention, *real_qkv(torch.bfloat16), bias.bfloat16())
    assert router.counts == {MATH: 1}
    assert ours == torchs
    assert ours[2] == 2 * 4 * 96 * 96  # the softmax


def test_math_dropout_keeps_a_bool_mask_as_cuda_does() -> None:
    _, dtypes, _ = saved_by(AttentionRouter(T4), *real_qkv(torch.bfloat16), dropout_p=0.1)
    assert torch.bool in dtypes


def test_fused_backends_keep_no_attention_matrix() -> None:
    """On fake tensors the backend's own op runs; on real CPU tensors a recomputing stand-in."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    square = 2 * 4 * 96 * 96  # (B, H, L, S)
    for build, dtype, backend in ((A100, torch.float32, EFFICIENT), (A100, HALF, FLASH), (H100, HALF, CUDNN)):
        router = AttentionRouter(build)
        real = saved_by(router, *real_qkv(dtype))
        with FakeTensorMode():
            fake = saved_by(router, *real_qkv(dtype))
        assert router.counts == {backend: 2}
        assert real[2] < square and fake[2] < square, backend
        assert torch.float32 in fake[1]  # the logsumexp


def test_the_router_matches_torchs_output_on_real_tensors() -> None:
    q, k, v = real_qkv()
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    got = AttentionRouter(A100)(q, k, v, is_causal=True)
    torch.testing.assert_close(got, expected)
    (grad_got,) = torch.autograd.grad(got.sum(), q)
    (grad_expected,) = torch.autograd.grad(expected.sum(), q)
    torch.testing.assert_close(grad_got, grad_expected)


def zoo_step(name: str, precision: torch.dtype | None, capability: tuple[int, int] = (9, 0)) -> dict[str, int]:
    """Backends of one training step of a zoo model (random weights, seq 32) on a simulated card."""
    from torch.func import functional_call

    from batchfit.device import SimulatedDevice
    from batchfit.models import build

    spec = build(name, seq_len=32, on_meta=True)
    device = SimulatedDevice(2**40, capability=capability)
    batch = {k: v.unsqueeze(0) for k, v in spec.sample.items()}
    with device.session(), device.hold(spec.model) as held, device.measure(), device.autocast(precision):
        out = functional_call(spec.model, held, (), device.put(batch))
        out.loss.backward()
    return dict(device.attention.counts)


# What an H100 (sm 9.0, this torch's cuDNN) picks for the zoo's attention, and why.
@needs_hf
@pytest.mark.parametrize(
    ("name", "precision", "expected"),
    [
        ("t5-small", None, {EFFICIENT: 18}),  # fp32, and 12 calls carry the learned position bias
        # all carry a mask: not flash; not cuDNN: 12 biases require grad, the 6 cross-attention calls drop out 0.1
        ("t5-small", torch.bfloat16, {EFFICIENT: 18}),
        ("gpt2", None, {EFFICIENT: 12}),  # fp32
        ("gpt2", torch.bfloat16, {FLASH: 12}),  # attention dropout 0.1 is no multiple of 1/16: not cuDNN
        ("bert-base", torch.bfloat16, {FLASH: 12}),
        ("llama-1b", torch.bfloat16, {CUDNN: 16}),  # no dropout, grouped-query heads: cuDNN first
        ("llama-1b", None, {EFFICIENT: 16}),
    ],
)
def test_zoo_calls_are_classified_as_an_h100_would(name: str, precision: torch.dtype | None, expected: dict) -> None:
    assert zoo_step(name, precision) == expected


@needs_hf
def test_estimate_notes_say_which_backends_were_assumed() -> None:
    import batchfit
    from batchfit.models import build

    spec = build("gpt2", seq_len=32, on_meta=True)
    result = batchfit.find_batch_size(spec.model, spec.sample, gpu="A10G", device="simulated", max_batch_size=2)
    note = next(n for n in result.notes if n.startswith("attention:"))
    assert note.startswith("attention: 12 calls memory-efficient a step")
    assert "sm 8.6" in note


class _Attention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(64, 192)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 4, 16).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum()


def test_a_compiled_step_keeps_torchs_choice_without_graph_breaks() -> None:
    """Dynamo traces the routing mode; the router stays out of the graph (no break per call)."""
    import batchfit

    kwargs = {"loss_fn": lambda out, batch: out, "gpu": "A100-80GB", "device": "simulated", "max_batch_size": 4}
    result = batchfit.find_batch_size(_Attention(), torch.randn(128, 64), compile=True, **kwargs)
    assert result.compiled is not None and result.compiled["graph_breaks"] == 0
    assert not any(n.startswith("attention:") for n in result.notes)
    eager = batchfit.find_batch_size(_Attention(), torch.randn(128, 64), **kwargs)
    assert "attention: 1 call memory-efficient a step" in "\n".join(eager.notes)


def test_gpu_checks_recorder_sets_torchs_choice_beside_the_rules() -> None:
    """scripts/attention_check.py, on CPU: torch's choice here is CPU's (flash for a plain call)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from attention_check import Recorder

    recorder = Recorder(H100)
    q, k, v = real_qkv()
    with recorder, torch.autocast("cpu", dtype=torch.bfloat16):
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
    assert recorder.calls == [("flash", CUDNN), ("math", FLASH)]  # bf16 by autocast; CPU flash takes no dropout

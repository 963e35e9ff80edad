"""The simulated device casts as CUDA's autocast does, checked op by op against CUDA's own kernels.

CUDA's autocast kernels run on fake CUDA tensors without a GPU (forward only), so each op
with an OpInfo in torch's test suite runs twice: on fake CUDA tensors under CUDA autocast,
and on fake CPU tensors under the simulated device's policy; the output dtypes must agree.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import pytest
import torch
from conftest import card, needs_hf
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_flatten, tree_map

from batchfit.device.sim.autocast import CudaAutocastPolicy, cuda_policy, registered


@contextlib.contextmanager
def cuda_autocast(dtype: torch.dtype) -> Iterator[None]:
    """CUDA autocast without a GPU: torch.autocast('cuda') would disable itself."""
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        torch.autocast_decrement_nesting()
        torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", False)


def _dtypes(out: object) -> list[torch.dtype]:
    return [t.dtype for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def _run(op, args, kwargs, device: str):
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        a, k = tree_map(lambda t: mode.from_tensor(t).to(device) if isinstance(t, torch.Tensor) else t, (args, kwargs))
        context = cuda_autocast(torch.bfloat16) if device == "cuda" else torch.autocast("cpu", dtype=torch.bfloat16)
        with context:
            return _dtypes(op(*a, **k))


def test_the_table_is_cudas_registration_in_this_torch():
    table = cuda_policy()
    cuda = registered("AutocastCUDA")
    missing = sorted(cuda - set(table))
    assert not missing, f"ops CUDA autocasts that the simulated device does not: {missing}"
    have = {name for name in table if getattr(torch.ops.aten, name.partition(".")[0], None) is not None}
    if torch.version.cuda is None:  # a CPU build registers no cuDNN kernels
        have.discard("_cudnn_rnn")
    assert sorted(have - cuda) == [], "the table names ops CUDA does not autocast"


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.skipif(torch.version.cuda is None, reason="fake CUDA tensors need a CUDA build of torch")
def test_every_op_casts_as_on_cuda():
    common = pytest.importorskip("torch.testing._internal.common_methods_invocations", exc_type=ImportError)
    names = {n.split(".")[0] for n in cuda_policy()} | {n.split(".")[0] for n in registered("AutocastCPU")}
    ops = [o for o in common.op_db if o.name.split(".")[-1] in names or (o.aten_name or "") in names]
    assert len(ops) > 100
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    was, fake_log.disabled = fake_log.disabled, True
    checked, mismatches = 0, []
    try:
        with CudaAutocastPolicy().installed():
            for op in ops:
                for dtype in (torch.float32, torch.bfloat16):  # fp32 inputs show casts down, bf16 casts up
                    if dtype not in op.supported_dtypes("cpu"):
                        continue
                    for sample in list(op.sample_inputs("cpu", dtype, requires_grad=False))[:2]:
                        args = (sample.input, *sample.args)
                        try:
                            cuda = _run(op.op, args, sample.kwargs, "cuda")
                        except Exception:  # an op fake CUDA cannot run without a GPU
                            continue
                        simulated = _run(op.op, args, sample.kwargs, "cpu")
                        checked += 1
                        if cuda != simulated:
                            mismatches.append((op.name, dtype, cuda, simulated))
    finally:
        fake_log.disabled = was
    assert checked > 400
    assert mismatches == []


def test_policy_examples_and_removal():
    x = torch.randn(8, 8)
    policy = CudaAutocastPolicy()
    with policy.installed(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.pow(x.bfloat16(), 3.0).dtype == torch.float32  # GELU's pow: fp32 on CUDA
        assert torch.softmax(x.bfloat16(), -1).dtype == torch.float32
        assert torch.mv(x, x[0]).dtype == torch.bfloat16  # CUDA casts mv down, CPU does not
        assert (x @ x).dtype == torch.bfloat16
        with pytest.raises(RuntimeError, match="unsafe to autocast"):
            torch.nn.functional.binary_cross_entropy(torch.rand(4), torch.rand(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # CPU's own policy is back
        assert torch.pow(x.bfloat16(), 3.0).dtype == torch.bfloat16
        assert torch.mv(x, x[0]).dtype == torch.float32


def test_weights_are_cast_once_per_region():
    weight = torch.randn(16, 16, requires_grad=True)
    policy = CudaAutocastPolicy()
    with policy.installed(), torch.autocast("cpu", dtype=torch.bfloat16):
        a = torch.mm(torch.randn(4, 16), weight)
        b = torch.mm(torch.randn(4, 16), weight)
        assert a.grad_fn.next_functions[1][0] is b.grad_fn.next_functions[1][0]  # the same cast node
        policy.clear_cache()
        c = torch.mm(torch.randn(4, 16), weight)
        assert c.grad_fn.next_functions[1][0] is not a.grad_fn.next_functions[1][0]


def test_sessions_do_not_nest_but_follow_each_other():
    policy = CudaAutocastPolicy()
    with policy.installed(), pytest.raises(RuntimeError, match="do not nest"), CudaAutocastPolicy().installed():
        pass
    with policy.installed(), torch.autocast("cpu", dtype=torch.bfloat16):  # installable again afterwards
        assert torch.pow(torch.ones(2).bfloat16(), 2.0).dtype == torch.float32


def test_cast_weights_are_dropped_where_the_outermost_region_exits():
    """As torch.autocast drops its cache: checkpoint's recompute in backward opens a region of its
    own, whose cast weights CUDA frees at its exit; kept, they stayed until the next step's forward."""
    weight, x = torch.randn(16, 16, requires_grad=True), torch.randn(4, 16)
    clear = torch.clear_autocast_cache
    policy = CudaAutocastPolicy()

    def cast(out: torch.Tensor) -> object:
        return out.grad_fn.next_functions[1][0]

    with policy.installed():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a = torch.mm(x, weight)
            with torch.autocast("cpu", dtype=torch.bfloat16):  # nested: the region goes on
                assert cast(torch.mm(x, weight)) is cast(a)
            assert cast(torch.mm(x, weight)) is cast(a)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert cast(torch.mm(x, weight)) is not cast(a)
    assert torch.clear_autocast_cache is clear


@needs_hf
def test_a_checkpointed_bf16_trial_leaves_no_cast_weights_to_the_next():
    from test_levers import tiny_gpt2

    from batchfit.changes import enable_checkpointing
    from batchfit.config import ProbeConfig
    from batchfit.device import resolve_device
    from batchfit.device.sim.stream import record
    from batchfit.session import holding

    model, sample = tiny_gpt2()
    enable_checkpointing(model)
    config = ProbeConfig(memory=card(512), precision="bf16")
    device = resolve_device("simulated", config)
    with holding(model, sample, device, None, None, config, None) as probe:
        probe.run(4)
        # Carried over, the last trial's cast weights would be freed in this one's forward.
        after = record(device.tracker.allocator, probe.run, 4)
        assert after.trial.ok and after.replayable

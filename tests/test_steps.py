"""A trial's second step repeated from the first's allocator stream (device/sim/steps.py) against
the step run: every trial the same, peak for peak, out of memory where it ran out."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any
from unittest import mock

import pytest
import torch
from conftest import SmallCNN, card, linear_stack, needs_hf
from test_stream import CASES as STREAM_CASES
from test_stream import adamw, tiny_gpt2, tokens
from torch import nn

import batchfit
from batchfit.config import ProbeConfig
from batchfit.device import SimulatedDevice
from batchfit.device.sim.steps import StepReplay, _events
from batchfit.optimizers import OPTIMIZERS
from batchfit.result import Trial
from batchfit.session import holding
from batchfit.trial import default_loss

Case = Callable[[], tuple[nn.Module, Any, Any, ProbeConfig]]


class LateState(torch.optim.SGD):
    """Makes one more buffer a parameter at its second step: a second step unlike the first."""

    def step(self, closure: Any = None) -> Any:
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state["n"] = state.get("n", 0) + 1
                if state["n"] == 2:
                    state["late"] = torch.zeros_like(p)
        return super().step(closure)


def _trials(case: Case, mib: int, sizes: tuple[int, ...], repeat: bool) -> tuple[list[Trial], int, StepReplay]:
    """The trials at `sizes` on a fresh card, steps repeated or all run; the forward passes run."""
    torch.manual_seed(0)
    model, sample, optimizer, config = case()
    forwards: list[int] = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    device = SimulatedDevice(card(mib))
    off = mock.patch.object(StepReplay, "repeat", lambda self, *a: False)
    with (
        contextlib.nullcontext() if repeat else off,
        holding(model, sample, device, optimizer, default_loss, config, None) as probe,
    ):
        trials = [probe.run(size) for size in sizes]
    return trials, len(forwards), device._steps


def _same(case: Case, mib: int, sizes: tuple[int, ...]) -> StepReplay:
    repeated, forwards, steps = _trials(case, mib, sizes, repeat=True)
    run, all_forwards, _ = _trials(case, mib, sizes, repeat=False)
    assert repeated == run
    assert steps.exact and forwards < all_forwards  # some steps were repeated, not run
    return steps


def _stack(optimizer: Any) -> tuple[nn.Module, Any, Any, ProbeConfig]:
    return linear_stack(4, 256), torch.randn(256), optimizer, ProbeConfig()


CASES: dict[str, Case] = {
    **STREAM_CASES,
    **{f"linear stack, {name}": (lambda name=name: _stack(OPTIMIZERS[name])) for name in OPTIMIZERS},
}


@pytest.mark.parametrize("name", CASES)
def test_a_repeated_step_is_the_step_run(name):
    _same(CASES[name], 48, (64, 256, 32, 1024, 100_000))


@needs_hf
def test_a_repeated_transformer_step_is_the_step_run():
    _same(lambda: (tiny_gpt2(), tokens(), adamw, ProbeConfig(precision="bf16")), 1024, (2, 8, 4, 10_000))


def test_out_of_memory_in_the_second_step_is_the_same():
    """AdamW's moments (twice the weights) live through the second step's activations only: a
    card between the two steps' peaks runs out in the second."""
    case: Case = lambda: (linear_stack(4, 1024), torch.randn(1024), OPTIMIZERS["adamw"], ProbeConfig())  # noqa: E731
    sizes = (256, 1024, 2048)
    run, forwards, _ = _trials(case, 96, sizes, repeat=False)
    assert [t.ok for t in run] == [True, True, False]
    assert forwards == 2 * len(sizes)  # the last ran out in its second step, not its first
    _same(case, 96, sizes)


def test_a_model_whose_second_step_differs_runs_every_step():
    case: Case = lambda: (linear_stack(4, 256), torch.randn(256), LateState, ProbeConfig())  # noqa: E731
    sizes = (8, 16, 32)
    repeated, forwards, steps = _trials(case, 48, sizes, repeat=True)
    run, all_forwards, _ = _trials(case, 48, sizes, repeat=False)
    assert steps.exact is False and forwards == all_forwards == 2 * len(sizes)
    assert repeated == run


def test_a_step_that_frees_what_it_did_not_make_is_not_a_stream():
    assert _events([("m", 512), ("b", 1), ("f", 1)]) == ((("m", 512), ("f", 0)), frozenset())
    assert _events([("m", 512), ("b", 1), ("m", 64), ("b", 2), ("f", 1)]) == (
        (("m", 512), ("m", 64), ("f", 0)),
        frozenset({1}),
    )
    assert _events([("m", 512), ("b", 1), ("f", 7)]) is None  # a block made before the step
    assert _events([("m", 512), ("b", 1), ("e", 0)]) is None  # the cache emptied
    assert _events([("m", 512)]) is None  # out of memory: the step did not end


def test_a_probe_with_repeated_steps_gives_the_model_and_optimizer_back_bitwise(monkeypatch):
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 16, 16)).mean().backward()
    opt.step()  # optimizer state exists, gradients exist
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    momentum = {k: v["momentum_buffer"].clone() for k, v in opt.state.items()}
    repeated: list[bool] = []
    real = StepReplay.repeat
    monkeypatch.setattr(StepReplay, "repeat", lambda self, *a: repeated.append(real(self, *a)) or repeated[-1])
    device = SimulatedDevice(card(48))
    batchfit.find_batch_size(model, torch.randn(3, 16, 16), optimizer=opt, device=device)
    assert any(repeated)  # some steps were repeated, not run
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert all(torch.equal(opt.state[k]["momentum_buffer"], v) for k, v in momentum.items())
    assert device.allocated() == 0  # the card's memory as it was before the probe

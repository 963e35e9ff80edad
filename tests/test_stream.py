"""Replayed trials (device/sim/stream.py) against the trials they stand for, run on the simulated card."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from conftest import SmallCNN, card, needs_hf
from torch import nn

from batchfit.config import ProbeConfig
from batchfit.device import SimulatedDevice
from batchfit.device.sim import stream
from batchfit.device.sim.allocator import CachingAllocator
from batchfit.device.sim.stream import Replay, record
from batchfit.lever.pricing import Pricer
from batchfit.memory import budget
from batchfit.result import Trial
from batchfit.session import holding
from batchfit.trial import default_loss as _loss


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3)


def tiny_gpt2() -> nn.Module:
    import transformers as hf

    model = hf.GPT2LMHeadModel(hf.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64))
    model.loss_type = "ForCausalLM"
    return model


def tokens() -> dict[str, torch.Tensor]:
    ids = torch.arange(64) % 1000
    return {"input_ids": ids, "labels": ids.clone()}


class Pairwise(nn.Module):
    """In-batch negatives: a B × B similarity matrix, so memory is not affine in B."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(256, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.proj(x)
        logits = f @ f.T
        return nn.functional.cross_entropy(logits, torch.arange(len(x)))


CASES: dict[str, Callable[[], tuple[nn.Module, Any, Any, ProbeConfig]]] = {
    "cnn with BatchNorm, dropout, SGD momentum": lambda: (SmallCNN(), torch.randn(3, 16, 16), sgd, ProbeConfig()),
    "linear stack, AdamW, bf16": lambda: (
        nn.Sequential(nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 10)),
        torch.randn(512),
        adamw,
        ProbeConfig(precision="bf16"),
    ),
}
HF_CASES: dict[str, Callable[[], tuple[nn.Module, Any, Any, ProbeConfig]]] = {
    "tiny GPT-2, AdamW": lambda: (tiny_gpt2(), tokens(), adamw, ProbeConfig()),
    "tiny GPT-2, AdamW, bf16": lambda: (tiny_gpt2(), tokens(), adamw, ProbeConfig(precision="bf16")),
}


@contextmanager
def session(case: Callable[[], tuple[nn.Module, Any, Any, ProbeConfig]], mib: int) -> Iterator[tuple[Any, Any]]:
    """A model held on a fresh simulated card: (run(B), the card's allocator)."""
    torch.manual_seed(0)
    model, sample, optimizer, config = case()
    device = SimulatedDevice(card(mib))
    with holding(model, sample, device, optimizer, _loss, config, None) as probe:
        yield probe.run, device.tracker.allocator


def _exact_everywhere(case: Callable[[], tuple[nn.Module, Any, Any, ProbeConfig]], mib: int) -> None:
    with session(case, mib) as (run, allocator):
        first, a, b = (record(allocator, run, size) for size in (64, 8, 16))
        assert a.trial.ok and b.trial.ok
        for size in (2, 4, 12, 24, 40, 64, 100, 4096):
            replayed = stream._replayed(a, b, size)
            assert replayed == run(size), size
        # The session's first trial (it made the card's workspaces) is reproduced too.
        assert stream._replayed(a, b, 64, like=first) == first.trial


@pytest.mark.parametrize("name", CASES)
def test_a_replayed_trial_is_the_trial_run_there(name):
    _exact_everywhere(CASES[name], 48)


@needs_hf
@pytest.mark.parametrize("name", HF_CASES)
def test_a_replayed_transformer_trial_is_the_trial_run_there(name):
    _exact_everywhere(HF_CASES[name], 1024)


def test_replays_only_below_a_size_that_ran_once_a_third_trial_agrees():
    with session(CASES["cnn with BatchNorm, dropout, SGD momentum"], 48) as (run, allocator):
        replay = Replay()
        for size in (8, 16):
            replay.run(size, allocator, run)
        assert replay.replay(12, allocator) is None  # two trials: a line, checked nowhere
        replay.run(32, allocator, run)
        assert replay.replay(24, allocator) == run(24)
        assert replay.replay(32, allocator) is None and replay.replay(48, allocator) is None  # none larger ran
        ran = len(replay.ran)
        assert replay.run(20, allocator, run) == run(20) and len(replay.ran) == ran  # replayed, not run


def test_a_stream_not_affine_in_the_batch_is_run_not_replayed():
    case = lambda: (Pairwise(), torch.randn(256), sgd, ProbeConfig())  # noqa: E731
    with session(case, 48) as (run, allocator):
        replay = Replay()
        for size in (16, 32, 8):
            replay.run(size, allocator, run)
        assert replay.replay(12, allocator) is None and replay.refused


def _row(case: Callable[[], tuple[nn.Module, Any, Any, ProbeConfig]], mib: int, asked: int) -> Any:
    """A lever row's pricing: (largest within the budget, peak at the batch asked, the trials)."""
    torch.manual_seed(0)
    model, sample, optimizer, config = case()
    pricer = Pricer(lambda: SimulatedDevice(card(mib)), budget(card(mib), config.margin), asked)
    return pricer.price(model, sample, optimizer, _loss, config)


@pytest.mark.parametrize("name", [*CASES, "pairwise"])
def test_a_lever_row_is_the_same_with_replays_and_runs_fewer_trials(name, monkeypatch):
    case = CASES.get(name) or (lambda: (Pairwise(), torch.randn(256), sgd, ProbeConfig()))
    ran: list[int] = []
    real = stream.record

    def counted(allocator: CachingAllocator, run: Callable[[int], Trial], size: int) -> stream.Stream:
        ran.append(size)
        return real(allocator, run, size)

    monkeypatch.setattr(stream, "record", counted)
    replayed = _row(case, 24, 512)
    run_for_it = list(ran)
    monkeypatch.setattr(Replay, "replay", lambda self, size, allocator: None)
    assert replayed == _row(case, 24, 512)
    trials = [t.batch_size for t in replayed[2]]
    if name == "pairwise":
        assert run_for_it == trials  # refused: every trial run
    else:
        assert len(run_for_it) < len(trials), (run_for_it, trials)


def test_the_log_names_blocks_by_request_and_sets_the_workspaces_apart():
    allocator = CachingAllocator(2**30)
    workspace = 3 * 2**20

    def trial(size: int) -> Trial:
        allocator.reset_peaks()
        if not held:
            held.append(allocator.malloc(workspace))
        x = allocator.malloc(1000 * size)
        y = allocator.malloc(10)
        allocator.free(x)
        allocator.free(y)
        peaks = allocator.peaks()
        allocator.empty_cache()
        return Trial(
            size,
            True,
            peaks.allocated,
            peaks.reserved,
            largest_alloc=peaks.largest_request,
            peak_inactive_split=peaks.inactive_split,
        )

    held: list[Any] = []
    first = record(allocator, trial, 4)
    assert first.held == (workspace,)
    assert first.events == (("r", 0), ("m", 4000), ("m", 10), ("f", 1), ("f", 2), ("p", 0), ("e", 0))
    second, third = record(allocator, trial, 8), record(allocator, trial, 16)
    assert second.held == () and second.shape == first.shape and first.settled == second.settled
    assert stream._replayed(second, third, 4, like=first) == first.trial
    assert stream._replayed(second, third, 32) == trial(32)


def test_a_model_of_many_small_weights_is_priced():
    """800 weights of under 512 B: one segment of the small pool holds a chain of 800 blocks, which
    a recursive copy of the allocator could not copy (RecursionError found on ResNet-152's table)."""

    def case() -> tuple[nn.Module, Any, Any, ProbeConfig]:
        return nn.Sequential(*[nn.Linear(8, 8) for _ in range(400)]), torch.randn(8), sgd, ProbeConfig()

    fits, _, trials = _row(case, 24, 4096)
    assert fits > 0 and any(t.ok for t in trials)


def test_a_row_with_replays_leaves_the_users_model_and_optimizer_bitwise_as_they_were(monkeypatch):
    torch.manual_seed(0)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3, 16, 16)).sum().backward()
    optimizer.step()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    momentum = {k: v["momentum_buffer"].clone() for k, v in optimizer.state_dict()["state"].items()}
    replayed: list[int] = []
    replay = Replay.replay

    def counted(self: Replay, size: int, allocator: CachingAllocator) -> Trial | None:
        trial = replay(self, size, allocator)
        if trial is not None:
            replayed.append(size)
        return trial

    monkeypatch.setattr(Replay, "replay", counted)
    pricer = Pricer(lambda: SimulatedDevice(card(24)), budget(card(24), 0.2), 512)
    fits, _, _ = pricer.price(model, torch.randn(3, 16, 16), optimizer, _loss, ProbeConfig())
    assert fits > 0 and replayed
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(grads[n], p.grad) for n, p in model.named_parameters())
    after = optimizer.state_dict()["state"]
    assert all(torch.equal(momentum[k], after[k]["momentum_buffer"]) for k in momentum)


def test_a_stream_without_its_kept_requests_renames_each_free():
    from batchfit.device.sim.stream import without

    events = [("r", 0), ("m", 8), ("m", 16), ("m", 32), ("f", 3), ("f", -1), ("m", 4), ("f", 6), ("p", 0)]
    assert without(events, {1, 2}) == (("r", 0), ("m", 32), ("f", 1), ("f", -1), ("m", 4), ("f", 4), ("p", 0))
    assert without(events, set()) == tuple(events)

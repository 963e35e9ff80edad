"""The probe end to end on the simulated device: the same code that runs on CUDA."""

from __future__ import annotations

import pytest
import torch
from conftest import RESULT_KEYS, WORKSPACES, DictModel, PairModel, card, linear_stack
from torch import nn

import batchfit
from batchfit import SimulatedDevice, TrialError, find_batch_size


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bitwise_equal(before: dict, model: nn.Module) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype and after[key].device == value.device, key
        assert torch.equal(
            after[key].view(torch.uint8) if value.dim() else after[key],
            value.view(torch.uint8) if value.dim() else value,
        ), key


def test_linear_stack_matches_closed_form():
    """Closed form for L bias-free Linear(d, d) layers, SGD with momentum, fp32, loss = mean.

    Per sample at the peak (start of backward): the inputs of all L layers are saved
    for the weight gradients, and the last layer's incoming gradient (materialised from
    mean's expand) coexists with the gradient of its input: (L + 2)·d·4 bytes.
    Fixed: weights and momentum (2·L·d²·4) plus the first weight gradient (d²·4).
    """
    layers, width = 4, 512
    model = linear_stack(layers, width)
    result = find_batch_size(model, torch.randn(width), memory="1GiB", max_batch_size=8192)
    per_sample = (layers + 2) * width * 4
    fixed = (2 * layers + 1) * width * width * 4 + WORKSPACES  # + the cuBLAS workspaces a card holds
    assert result.per_sample_allocated_bytes == pytest.approx(per_sample, rel=0.02)
    assert result.fixed_allocated_bytes == pytest.approx(fixed, rel=0.02)
    # Reserved is what the caching allocator holds: at least what is allocated, in every trial.
    assert all(t.peak_reserved >= t.peak_allocated for t in result.trials if t.ok)


def test_oom_trials_happen_and_the_answer_respects_the_margin():
    model = linear_stack(4, 256)
    result = find_batch_size(model, torch.randn(256), memory=card(64), exact=True)
    assert any(not t.ok for t in result.trials)
    budget = 0.8 * card(64)
    chosen = next(t for t in result.trials if t.batch_size == result.recommended_batch_size)
    assert chosen.ok and chosen.peak_reserved <= budget
    assert result.exact_limit >= result.recommended_batch_size
    assert result.exact_limit < 2 * result.predicted_limit


def test_margin_moves_the_answer():
    model = linear_stack(4, 256)
    loose = find_batch_size(model, torch.randn(256), memory=card(128), margin=0.0, rounding="none")
    tight = find_batch_size(model, torch.randn(256), memory=card(128), margin=0.5, rounding="none")
    assert tight.recommended_batch_size < loose.recommended_batch_size
    for r, m in ((loose, 0.0), (tight, 0.5)):
        t = next(t for t in r.trials if t.batch_size == r.recommended_batch_size)
        assert t.peak_reserved <= (1 - m) * card(128)
        # The budget the search judged with travels with the answer, for everything that reads it.
        assert r.budget_bytes == int((1 - m) * card(128)) == r.to_dict()["budget_bytes"]
        assert t.within(r.budget_bytes)


def test_model_optimizer_rng_and_mode_come_back_bitwise(cnn):
    cnn.eval()
    opt = torch.optim.SGD(cnn.parameters(), lr=0.1, momentum=0.9)
    cnn(torch.randn(2, 3, 16, 16)).mean().backward()
    opt.step()  # optimizer state exists, grads exist
    before, grads = state_of(cnn), [p.grad.clone() for p in cnn.parameters()]
    opt_before = {k: v["momentum_buffer"].clone() for k, v in opt.state.items()}
    sample = torch.randn(3, 16, 16)
    rng = torch.get_rng_state()
    find_batch_size(cnn, sample, optimizer=opt, memory="256MiB", device="cpu")
    assert_bitwise_equal(before, cnn)
    assert all(torch.equal(p.grad, g) for p, g in zip(cnn.parameters(), grads, strict=False))
    assert all(torch.equal(opt.state[k]["momentum_buffer"], v) for k, v in opt_before.items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert not cnn.training and not cnn.bn.training


class Boom(Exception):
    pass


def _explode_at(model: nn.Module, batch_size: int, error: BaseException):
    def hook(module, args):
        if args[0].shape[0] >= batch_size:
            raise error

    return model.register_forward_pre_hook(hook)


@pytest.mark.parametrize("device", ["cpu", "simulated"])
def test_real_bug_reaches_the_caller_with_the_batch_size_and_state_is_restored(cnn, device):
    before = state_of(cnn)
    _explode_at(cnn.fc, 8, ValueError("shape mismatch in fc"))
    with pytest.raises(
        TrialError, match=r"batch_size=8 failed with ValueError: shape mismatch in fc \(not an out-of-memory"
    ):
        find_batch_size(cnn, torch.randn(3, 16, 16), memory="256MiB", device=device)
    assert_bitwise_equal(before, cnn)


@pytest.mark.parametrize("device", ["cpu", "simulated"])
def test_keyboard_interrupt_restores_state(cnn, device):
    before = state_of(cnn)
    cnn.train()
    _explode_at(cnn.fc, 16, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        find_batch_size(cnn, torch.randn(3, 16, 16), memory="256MiB", device=device)
    assert_bitwise_equal(before, cnn)
    assert cnn.training


def test_memory_is_back_where_it_was():
    dev = SimulatedDevice(256 * 2**20)
    model = linear_stack(3, 128)
    find_batch_size(model, torch.randn(128), device=dev, exact=True)  # exact: OOM trials included
    assert dev.tracker.allocated == 0  # the fake weights, batches and optimizer state are all gone


def test_real_cpu_compute_frees_everything_it_made():
    dev = SimulatedDevice(256 * 2**20, compute="real")
    model = linear_stack(3, 128)
    baseline = sum(p.numel() * 4 for p in model.parameters())
    find_batch_size(model, torch.randn(128), device=dev, exact=True)
    assert dev.tracker.allocated == pytest.approx(baseline, rel=0.01)  # only the weights stay


@pytest.mark.parametrize(
    ("model", "sample"),
    [
        (linear_stack(2, 32), torch.randn(32)),
        (PairModel(), (torch.randn(16), torch.randn(4))),
        (DictModel(), {"input_ids": torch.randint(0, 100, (12,)), "labels": torch.randint(0, 100, (12,))}),
        (linear_stack(2, 32), lambda b: torch.randn(b, 32)),
    ],
    ids=["tensor", "tuple", "dict", "callable"],
)
def test_sample_forms(model, sample):
    result = find_batch_size(model, sample, memory=card(64))
    assert result.recommended_batch_size >= 1
    assert result.per_sample_allocated_bytes and result.per_sample_allocated_bytes > 0


def test_batchnorm_model_never_runs_one(cnn):
    result = find_batch_size(cnn, torch.randn(3, 16, 16), memory="128MiB")
    assert result.trials[0].batch_size == 4 and min(t.batch_size for t in result.trials) >= 2


def test_bf16_uses_less_activation_memory():
    model = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 256))
    fp32 = find_batch_size(model, torch.randn(256), memory="256MiB", rounding="none")
    bf16 = find_batch_size(model, torch.randn(256), memory="256MiB", rounding="none", precision="bf16")
    assert bf16.per_sample_bytes < 0.9 * fp32.per_sample_bytes


def test_adamw_state_costs_more_than_sgd():
    model = linear_stack(4, 256)
    sgd = find_batch_size(model, torch.randn(256), memory=card(64))
    adam = find_batch_size(model, torch.randn(256), memory=card(64), optimizer=torch.optim.AdamW(model.parameters()))
    weights = 4 * 256 * 256 * 4
    # exp_avg_sq on top
    assert adam.fixed_allocated_bytes - sgd.fixed_allocated_bytes == pytest.approx(weights, rel=0.05)


def test_learning_rate_is_scaled():
    result = find_batch_size(
        linear_stack(2, 64),
        torch.randn(64),
        memory=card(64),
        base_lr=0.1,
        base_batch_size=256,
        max_batch_size=8192,
    )
    assert result.learning_rate == pytest.approx(0.1 * result.recommended_batch_size / 256)


def test_result_dict_has_the_shared_keys():
    result = find_batch_size(linear_stack(2, 32), torch.randn(32), memory=card(64))
    data = result.to_dict()
    for key in RESULT_KEYS:
        assert key in data
    assert data["trials"][0]["status"] in ("fitted", "oom")
    assert "recommended batch size" in str(result)


def test_nothing_fits_is_one_clear_error():
    with pytest.raises(batchfit.DoesNotFitError, match="no batch size trains within"):
        find_batch_size(linear_stack(4, 512), torch.randn(512), memory=card(4))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"margin": 1.0}, "margin=1.0"),
        ({"margin": -0.1}, "margin=-0.1"),
        ({"steps_per_trial": 0}, "steps_per_trial=0"),
        ({"precision": "fp8"}, "precision='fp8'"),
        ({"memory": "lots"}, "memory size 'lots'"),
        ({"base_lr": -1.0}, "base_lr=-1.0"),
        ({"rounding": "odd"}, "rounding='odd'"),
    ],
)
def test_bad_options_fail_before_any_trial(kwargs, match):
    with pytest.raises(ValueError, match=match):
        find_batch_size(linear_stack(1, 8), torch.randn(8), **{"memory": "1GiB", **kwargs})


def test_bad_model_and_sample():
    with pytest.raises(ValueError, match=r"must be a torch\.nn\.Module"):
        find_batch_size("resnet", torch.randn(3), memory="1GiB")
    with pytest.raises(ValueError, match="holds no tensor"):
        find_batch_size(linear_stack(1, 8), [1, 2, 3], memory="1GiB")


def test_simulated_device_needs_a_capacity():
    with pytest.raises(ValueError, match="needs a capacity"):
        find_batch_size(linear_stack(1, 8), torch.randn(8), device="simulated")


def test_preflight_passes_and_fails(cnn):
    ok = batchfit.preflight(cnn, torch.randn(3, 16, 16), 4, memory=card(64))
    assert ok.fits and ok.peak_reserved_bytes <= ok.budget_bytes
    with pytest.raises(batchfit.DoesNotFitError, match="does not fit") as info:
        batchfit.preflight(cnn, torch.randn(3, 16, 16), 4096, memory=card(64))
    check = info.value.check
    assert not check.fits and 0 < check.largest_fitting < 4096


def _counting(monkeypatch) -> tuple[list[int], list[int]]:
    """(sessions opened, sizes run) by the probe module from now on."""
    from batchfit import probe, session

    sessions: list[int] = []
    sizes: list[int] = []
    holding, run = probe.holding, session.Session.run

    def counted_holding(*args, **kwargs):
        sessions.append(1)
        return holding(*args, **kwargs)

    def counted_run(self, batch_size):
        sizes.append(batch_size)
        return run(self, batch_size)

    monkeypatch.setattr(probe, "holding", counted_holding)
    monkeypatch.setattr(session.Session, "run", counted_run)
    return sessions, sizes


@pytest.mark.parametrize("exact", [False, True])
def test_preflight_searches_down_from_the_batch_asked_as_the_lever_table_does(cnn, monkeypatch, exact):
    """One held model, the batch asked run once, then one search down from it: the lever table's
    pricing search, so preflight's largest size is the table's first row, by the same trials
    (exact's bisection adds none)."""
    sample, memory = torch.randn(3, 16, 16), card(64)
    row = batchfit.levers(cnn, sample, 4096, memory=memory, groups=()).levers[0]
    sessions, sizes = _counting(monkeypatch)
    with pytest.raises(batchfit.DoesNotFitError) as info:
        batchfit.preflight(cnn, sample, 4096, memory=memory, exact=exact)
    assert info.value.check.largest_fitting == row.fits > 0
    assert sessions == [1]
    assert sizes == [t.batch_size for t in row.trials] and sizes[0] == 4096 and sizes.count(4096) == 1


@pytest.mark.parametrize("batch_size", [4096, 8])
def test_the_lever_table_starts_from_the_checks_trial_at_the_batch_asked(cnn, monkeypatch, batch_size):
    """`check` on the simulated card: the table's first row takes the check's trial at the batch
    asked instead of running it again, and comes out as it does without it (fits or not). Its
    later trials start on a card that has not run the batch asked: the allocator's statistics that
    the table does not read may differ (this CNN at 4: inactive split 0.9 vs 1.9 MiB, largest
    request 80 KiB vs 32 MiB), the peaks it reads may not."""
    from batchfit.lever.table import prepare

    sample, memory = torch.randn(3, 16, 16), card(64)
    alone = batchfit.levers(cnn, sample, batch_size, memory=memory, groups=()).levers[0]
    try:
        check = batchfit.preflight(cnn, sample, batch_size, memory=memory, find_largest=False)
    except batchfit.DoesNotFitError as error:
        check = error.check
    assert check.trial is not None and check.trial.batch_size == batch_size
    _, sizes = _counting(monkeypatch)
    row = prepare(cnn, sample, batch_size, memory=memory).price((), None, (), check.trial).levers[0]
    ran = [t.batch_size for t in row.trials]
    # Run in the row's order, all but the check's (and those its other trials let be replayed).
    assert sizes == [b for b in ran[1:] if b in sizes] and sizes[0] == ran[1]
    assert row.trials[0] is check.trial
    assert (row.fits, row.peak_at_batch) == (alone.fits, alone.peak_at_batch)

    def peaks(trials):
        return [(t.batch_size, t.ok, t.peak_allocated, t.peak_reserved) for t in trials]

    assert peaks(row.trials) == peaks(alone.trials)


def test_preflight_searching_down_with_real_steps_leaves_model_and_optimizer_as_they_were(cnn):
    """The search down from the batch asked trains for real on CPU (weights move, BatchNorm's
    statistics and the RNG too): the user's model, its gradients and optimizer state come back bitwise."""
    sample = torch.randn(3, 16, 16)
    optimizer = torch.optim.AdamW(cnn.parameters(), lr=1e-3)
    cnn(sample.unsqueeze(0).expand(2, -1, -1, -1)).sum().backward()
    optimizer.step()  # the user's optimizer holds state, and the weights their gradients
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    grads = [p.grad.clone() for p in cnn.parameters()]
    state = {k: v.clone() for k, v in optimizer.state[next(cnn.parameters())].items()}
    with pytest.raises(batchfit.DoesNotFitError) as info:
        batchfit.preflight(cnn, sample, 4096, optimizer=optimizer, device="cpu", memory=card(64))
    assert info.value.check.largest_fitting > 0
    assert all(torch.equal(before[k], v) for k, v in cnn.state_dict().items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, cnn.parameters(), strict=True))
    assert all(torch.equal(state[k], v) for k, v in optimizer.state[next(cnn.parameters())].items())


def test_throughput_objective_picks_the_knee_on_real_timing():
    model = linear_stack(2, 64)
    result = find_batch_size(model, torch.randn(64), memory=card(32), device="cpu", objective="throughput")
    assert result.timing_is_real and result.throughput_knee is not None
    assert result.recommended_batch_size == result.throughput_knee <= result.memory_batch_size
    budget = 0.8 * result.capacity_bytes  # the knee is chosen among trials within the budget
    rates = {t.batch_size: t.samples_per_s for t in result.trials if t.samples_per_s and t.peak_reserved <= budget}
    assert rates[result.throughput_knee] >= 0.95 * max(rates.values())


def test_objective_without_real_timing_keeps_the_memory_answer():
    result = find_batch_size(linear_stack(2, 64), torch.randn(64), memory=card(32), objective="throughput")
    assert result.throughput_knee is None
    assert result.recommended_batch_size == result.memory_batch_size
    assert any("needs real step times" in n for n in result.notes)


def test_goodput_needs_a_noise_scale():
    with pytest.raises(ValueError, match="noise_scale"):
        find_batch_size(linear_stack(1, 8), torch.randn(8), memory="1GiB", objective="goodput")


@pytest.mark.parametrize("compute", ["fake", "real"])
def test_each_trial_frees_its_memory_without_a_garbage_collection(compute):
    """Trials skip gc.collect() (slow in big processes), so nothing may hang on in a cycle."""
    from batchfit.config import ProbeConfig
    from batchfit.session import holding

    dev = SimulatedDevice(card(64), compute=compute)
    model = linear_stack(3, 128)
    with holding(model, torch.randn(128), dev, torch.optim.AdamW(model.parameters()), None, ProbeConfig(), None) as p:
        p.run(4)  # the first trial creates the cuBLAS workspaces, which stay (as on CUDA)
        baseline = dev.tracker.allocated
        for size in (4, 64, 100_000, 16):  # 100_000 runs out of memory
            p.run(size)
            assert dev.tracker.allocated == baseline, size


def test_a_trial_runs_from_the_one_bundle_a_session_is():
    """run_trial takes the model held on a device (device, workload, tensors, params, steps), which
    a session is, rather than those five apart."""
    from batchfit.config import ProbeConfig
    from batchfit.session import holding
    from batchfit.trial import Held, run_trial

    config = ProbeConfig(steps_per_trial=3)
    with holding(linear_stack(2, 64), torch.randn(64), SimulatedDevice(card(64)), None, None, config, None) as held:
        assert isinstance(held, Held) and held.steps == 3
        trial = run_trial(held, 8)
        assert trial.ok and trial.batch_size == 8 and trial.peak_reserved > 0
        assert all(param.grad is None for param in held.params)


def test_a_model_built_on_meta_probes_on_the_simulated_device():
    with torch.device("meta"):
        model = linear_stack(4, 512)
    real = find_batch_size(linear_stack(4, 512), torch.randn(512), memory="1GiB", rounding="none")
    started: list[int] = []
    sample = torch.empty(512, device="meta")  # values are never read on the simulated device
    meta = find_batch_size(model, sample, memory="1GiB", rounding="none", on_trial_start=started.append)
    assert meta.recommended_batch_size == real.recommended_batch_size
    assert started == [t.batch_size for t in meta.trials]
    assert all(p.is_meta for p in model.parameters())


def test_allocator_retries_at_the_answer_are_reported():
    from batchfit.answer import build_result as _result
    from batchfit.config import ProbeConfig
    from batchfit.result import Trial
    from batchfit.search import search

    def run(b):
        return Trial(batch_size=b, ok=True, peak_allocated=b * 2**20, peak_reserved=b * 2**20, alloc_retries=b // 64)

    outcome = search(run, 100 * 2**20, margin=0.2)
    result = _result(outcome, SimulatedDevice(100 * 2**20), ProbeConfig(), 0.0)
    assert result.recommended_batch_size == 64
    assert any("1 allocator retries" in n for n in result.notes)


@pytest.mark.parametrize("device", ["simulated", "cpu"])
def test_a_card_too_small_for_its_own_workspaces_does_not_fit(device):
    """The workspaces are reserved as a trial starts: running out there is an OOM trial, not a crash."""
    with pytest.raises(batchfit.DoesNotFitError, match="batch_size=1 ran out of memory"):
        find_batch_size(linear_stack(), torch.randn(256), device=device, memory=WORKSPACES - 2**20)


def test_a_step_that_raises_with_a_cause_keeps_the_users_chain():
    """Issue 18 case 17: freeing the failed trial's frames also cleared the user's __cause__."""

    def step(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        if batch.shape[0] >= 4:
            try:
                raise KeyError("token 50257 not in the vocabulary")
            except KeyError as inner:
                raise ValueError("could not embed the batch") from inner
        return model(batch).mean()

    with pytest.raises(TrialError) as caught:
        find_batch_size(linear_stack(2, 16), torch.randn(16), step=step, memory="256MiB", device="simulated")
    user = caught.value.__cause__
    assert isinstance(user, ValueError) and isinstance(user.__cause__, KeyError)
    assert "50257" in str(user.__cause__) and user.__traceback__ is None and user.__cause__.__traceback__ is None
    assert any("raise KeyError" in note for note in user.__cause__.__notes__)


def test_an_oom_of_cudnn_attention_is_a_trial_out_of_memory():
    """Issue 18 case 16: a cuDNN SDPA OOM stopped the probe as a TrialError."""

    def step(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        if batch.shape[0] >= 8:
            raise RuntimeError(
                "cuDNN SDPA execution failed with error code 2\nCUDA ran out of memory outside PyTorch's allocator."
            )
        return model(batch).mean()

    result = find_batch_size(linear_stack(2, 16), torch.randn(16), step=step, memory="256MiB", device="simulated")
    assert result.largest_batch_ran < 8 and any(not t.ok for t in result.trials)


def test_a_list_of_token_id_tensors_is_a_list_of_examples():
    """Issue 18 case 8: 100 1-D tensors of different lengths were one example's 100 inputs."""

    class Emb(nn.Module):  # one positional input, token ids
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.head = nn.Embedding(100, 32), nn.Linear(32, 100)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.emb(ids))

    examples = [torch.randint(0, 100, (8 + i % 40,)) for i in range(100)]
    result = find_batch_size(Emb(), examples, memory="1GiB", device="simulated")
    assert result.sample_index == 39 and "probed with item 39" in result.notes[0]  # the longest, 47 tokens


def test_a_sample_of_the_wrong_form_says_what_to_pass():
    """Issue 18 case 8: a dataset item (x, y) without step=, and a list meant as one example's inputs."""
    item = (torch.randn(16), torch.tensor(3))
    with pytest.raises(TrialError, match=r"for a dataset item such as \(inputs, target\) pass step="):
        find_batch_size(linear_stack(2, 16), item, memory="1GiB", device="simulated")
    with pytest.raises(TrialError, match="a list is taken as a list of examples"):
        find_batch_size(PairModel(), [torch.randn(16), torch.randn(4)], memory="1GiB", device="simulated")

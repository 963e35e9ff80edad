"""The probe: real training steps at growing batch sizes, and the answer with its evidence.

`find_batch_size` is the library's front door; `preflight` answers "does batch N fit?" for
pipelines. Both leave the user's model exactly as they found it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import fields, replace
from typing import Any

from torch import nn

from batchfit import distributed
from batchfit.answer import build_result, finish, with_evaluation
from batchfit.config import ProbeConfig, check_positive_int
from batchfit.device import Device, resolve_device, timer
from batchfit.internals import collectives_on, fsdp_modules
from batchfit.limit import fit_trials
from batchfit.memory import budget as memory_budget
from batchfit.memory import format_size
from batchfit.result import CheckResult, DoesNotFitError, Result, Trial
from batchfit.samples import choose, form_hint
from batchfit.search import SearchOutcome, price, search
from batchfit.session import Session, has_batchnorm, holding, model_need
from batchfit.trial import TrialError, loss_for

log = logging.getLogger(__name__)

BY_THE_LINE = "the memory line of the trials that ran"
BEFORE_ANY_BATCH = "at least, before any batch"


def _explaining(entry: Callable[..., Any]) -> Callable[..., Any]:
    """A model that refused the arguments the sample's form gave it (TypeError) hears what to pass."""

    @functools.wraps(entry)
    def explained(model: nn.Module, sample: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return entry(model, sample, *args, **kwargs)
        except TrialError as error:
            cause = error.__cause__
            hint = form_hint(sample, kwargs.get("step") is not None) if isinstance(cause, TypeError) else ""
            if not hint or hint in str(error):
                raise
            raise TrialError(f"{error}{hint}") from cause

    return explained


@_explaining
def find_batch_size(
    model: nn.Module,
    sample: Any,
    *,
    optimizer: Any = None,
    loss_fn: Callable[[Any, Any], Any] | None = None,
    step: Callable[[nn.Module, Any], Any] | None = None,
    device: Device | str | None = None,
    config: ProbeConfig | None = None,
    on_trial: Callable[[Trial], None] | None = None,
    on_trial_start: Callable[[int], None] | None = None,
    on_start: Callable[[Device], None] | None = None,
    **options: Any,
) -> Result:
    """Find the largest batch that trains `model` within the memory budget, and its learning rate.

    `sample` is one example without a batch dimension, a callable `batch_size -> batch`, or data
    (a map-style dataset or a list of examples: the largest of `scan_items` is probed with).
    A tensor is passed as `model(x)`, a tuple as `model(*sample)` (a list is examples), a dict as
    `model(**sample)`; for anything else, e.g. a dataset's `(inputs, target)` item, pass
    `step(model, batch) -> loss`. Options are those of `ProbeConfig` (or pass `config=`);
    `on_start(device)`, `on_trial_start(B)` and `on_trial(trial)` report progress. Under
    torch.distributed every rank probes its own device and all return the same answer.
    """
    config = ProbeConfig.from_options(config, options)
    loss_fn = loss_for(loss_fn, step)
    if config.mode == "eval" and optimizer is not None:
        raise ValueError("mode='eval' runs no optimizer step: optimizer= does not apply (use mode='both')")
    chosen = choose(sample, config.scan_items)
    progress = (on_trial, on_trial_start, on_start)
    train = replace(config, mode="train") if config.mode == "both" else config
    sharded = bool(fsdp_modules(model))
    if sharded:
        distributed.refuse_unsupported(model, train)
    here = functools.partial(_probe_here, model, chosen.sample, optimizer, loss_fn, device, train, *progress)
    result = _agreed(here, train, optimizer, sharded)
    if config.mode == "both":
        result = add_evaluation(
            result, model, chosen.sample, loss_fn=loss_fn, device=device, config=config,
            on_trial=on_trial, on_trial_start=on_trial_start, on_start=on_start,
        )  # fmt: skip
    if chosen.note is None:
        return result
    return replace(result, sample_index=chosen.index, notes=[chosen.note, *result.notes])


def add_evaluation(trained: Result, model: nn.Module, sample: Any, **options: Any) -> Result:
    """The training answer `trained` with the evaluation batch size beside it, as mode='both' gives.

    `model` is probed forward only (model.eval(), under inference mode) with the training probe's
    own arguments (`find_batch_size`'s: config= or ProbeConfig's options, loss_fn=, device=, the
    progress callbacks) less the options for training only (`ProbeConfig.for_evaluation`).
    mode='both' and the integrations (each with its own evaluation step and sample) build "both" here.
    """
    given = {name: options.pop(name) for name in _CONFIG_FIELDS & options.keys()}
    evaluation = ProbeConfig.from_options(options.pop("config", None), given).for_evaluation()
    return with_evaluation(trained, find_batch_size(model, sample, config=evaluation, **options))


_CONFIG_FIELDS = {f.name for f in fields(ProbeConfig)}


def _agreed(here: Callable[..., Result], config: ProbeConfig, optimizer: Any, sharded: bool = False) -> Result:
    """This process's probe (`here`), agreed with the other ranks' under torch.distributed; a
    sharded model's ranks run their trials in lockstep on the agreement group."""
    group = distributed.setup(config.dist_timeout_s, config.rendezvous_timeout_s)
    if group is None:
        return finish(here(), config, optimizer, [])
    rank = distributed.rank(group)
    try:
        local = here(lockstep_group=group if sharded else None)
        report = distributed.RankReport(rank, local.recommended_batch_size, local.device, local.capacity_bytes)
        failure: Exception | None = None
    except Exception as error:  # every rank must join the agreement, failed or not
        report = distributed.RankReport(
            rank, None, "", 0, f"{type(error).__name__}: {error}", distributed.failure_kind(error)
        )
        failure = error
    try:
        reports = distributed.agree(group, report)
    except distributed.DistributedProbeError as error:
        if isinstance(failure, distributed.DistributedProbeError):
            raise failure from None  # lockstep: every rank already holds the same account of it
        raise error from failure
    return finish(local, config, optimizer, reports)


def _probe_here(
    model: nn.Module,
    sample: Any,
    optimizer: Any,
    loss_fn: Any,
    device: Device | str | None,
    config: ProbeConfig,
    on_trial: Callable[[Trial], None] | None,
    on_trial_start: Callable[[int], None] | None = None,
    on_start: Callable[[Device], None] | None = None,
    lockstep_group: Any = None,
) -> Result:
    """The probe on this process's device, before any agreement between ranks."""
    dev = resolve_device(device, config)
    if on_start is not None:
        on_start(dev)
    timer_start = timer()
    with (
        holding(model, sample, dev, optimizer, loss_fn, config, on_trial, on_trial_start) as session,
        _in_lockstep(session, lockstep_group, config) as run,
    ):
        # In lockstep every rank plans with the smallest card, so all take the same next step.
        capacity = distributed.smallest_capacity(lockstep_group, dev.capacity) if lockstep_group else dev.capacity
        outcome = _search(session, config, run, capacity)
    if outcome.recommended == 0:
        first = min(outcome.trials, key=lambda t: t.batch_size)  # the smallest size tried
        if first.ok:
            how = f"peaked at {format_size(first.peak_reserved)}"
        else:
            need, parts = model_need(model, optimizer, dev)
            how = f"ran out of memory; before any batch the model needs at least {format_size(need)} ({parts})"
        raise DoesNotFitError(
            f"no batch size trains within {1 - config.margin:.0%} of {format_size(dev.capacity)} "
            f"on {dev.description}: batch_size={first.batch_size} {how}"
        )
    return build_result(outcome, dev, config, timer() - timer_start)


@contextlib.contextmanager
def _in_lockstep(probe: Session, group: Any, config: ProbeConfig) -> Iterator[Callable[[int], Trial]]:
    """The trial runner: the session's own, or (a sharded model under torch.distributed) every rank
    at once, the model's collectives on a probe-owned group whose timeout bounds the wait when a
    rank leaves a step."""
    if group is None:
        yield probe.run
        return
    trials_group = distributed.probe_group(config.dist_timeout_s)
    try:
        with probe.device.lockstep(), collectives_on(probe.workload.model, trials_group):
            yield distributed.lockstep(group, probe.run, config.dist_timeout_s)
    finally:
        distributed.close(trials_group)


def _search(
    session: Session, config: ProbeConfig, run: Callable[[int], Trial] | None = None, capacity: int | None = None
) -> SearchOutcome:
    """The search on a held model, as `config` asks: its trials through `run` (the session's own
    by default), planned for `capacity` (the device's by default)."""
    return search(
        run or session.run,
        capacity or session.device.capacity,
        margin=config.margin,
        start=_smallest(session, config),
        max_batch_size=config.max_batch_size,
        rounding=config.rounding,
        exact=config.exact,
        max_trials=config.max_trials,
    )


def _smallest(session: Session, config: ProbeConfig) -> int:
    """The smallest size a search may run: 2 with BatchNorm (one sample has no batch statistics),
    and compiled (Dynamo specialises size 1: a graph for size 1 alone, recompiled at 2)."""
    return 2 if has_batchnorm(session.workload.model) or config.compile else 1


@_explaining
def preflight(
    model: nn.Module,
    sample: Any,
    batch_size: int,
    *,
    optimizer: Any = None,
    loss_fn: Callable[[Any, Any], Any] | None = None,
    step: Callable[[nn.Module, Any], Any] | None = None,
    device: Device | str | None = None,
    config: ProbeConfig | None = None,
    on_start: Callable[[Device], None] | None = None,
    find_largest: bool = True,
    **options: Any,
) -> CheckResult:
    """Check that `batch_size` trains within the budget on this device; raise DoesNotFitError if not.

    One real trial decides. When it fails, the search runs below it on the model already held,
    so the error says the largest size that fits (`find_largest=False` skips it: the caller finds
    it another way, e.g. the lever table's first row).
    """
    check_positive_int("batch_size", batch_size)
    config = ProbeConfig.from_options(config, options)
    if config.mode == "both":
        raise ValueError("preflight checks one batch size for one use: mode='train' or mode='eval'")
    loss_fn = loss_for(loss_fn, step)
    sample = choose(sample, config.scan_items).sample  # the worst input decides whether it fits
    dev = resolve_device(device, config)
    if on_start is not None:
        on_start(dev)
    budget = memory_budget(dev.capacity, config.margin)
    largest, line = None, None
    with holding(model, sample, dev, optimizer, loss_fn, config, None) as session:
        need, parts = model_need(model, optimizer, dev)
        trial = session.run(batch_size)
        fits = trial.within(budget)
        if not fits and find_largest:
            # Down from the batch asked, on the same held model, as the lever table prices its
            # first row (one search, `search.price`): this device's own answer, unrounded (a
            # pre-flight check is per device, with no agreement between ranks).
            below = price(
                session.run,
                budget,
                batch_size,
                _smallest(session, config),
                config.max_trials,
                over=need > budget,
                ran={batch_size: trial},
            )
            largest = below.verified()
            line = fit_trials(below.order) if largest else None
    check = CheckResult(
        batch_size=batch_size,
        fits=fits,
        peak_reserved_bytes=trial.peak_reserved if trial.ok else None,
        budget_bytes=budget,
        capacity_bytes=dev.capacity,
        margin=config.margin,
        device=dev.description,
        needed_bytes=None if trial.ok else need,
        needed_basis=None if trial.ok else f"{BEFORE_ANY_BATCH}: {parts}",
        largest_fitting=largest,
        trial=trial,
    )
    if not trial.ok and line is not None:
        check = replace(check, needed_bytes=round(line.predict(batch_size)), needed_basis=BY_THE_LINE)
    if fits:
        return check
    raise DoesNotFitError(str(check), check)

"""From what the search found to the answer a user gets: the objective's pick, the notes, the Result.

And across ranks: the smallest card decides, the global batch is planned, and the learning rate
is scaled on it. Pure: no devices are touched here.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from batchfit.config import ProbeConfig
from batchfit.device import Device
from batchfit.limit import reserved_model
from batchfit.lr import scale_lr
from batchfit.memory import round_batch
from batchfit.objective import goodput_batch_size, throughput_knee
from batchfit.plan import plan_global_batch
from batchfit.result import Result
from batchfit.search import SearchOutcome


def finish(
    local: Result, config: ProbeConfig, optimizer: Any, reports: list[Any], world_size: int | None = None
) -> Result:
    """Agree across ranks (the smallest card decides), plan the global batch, scale the rate on it.

    `world_size`: the ranks the batch is planned for when no reports stand for them (an offline
    sharded estimate answers for N ranks from one process)."""
    per_device = min([local.recommended_batch_size] + [r.recommended for r in reports])
    world = world_size if world_size is not None else max(1, len(reports))
    plan = plan_global_batch(per_device, world, config.target_global_batch)
    notes = list(local.notes)
    if plan.per_device < local.recommended_batch_size:
        notes.append(
            f"per-device batch {plan.per_device} is below this device's verified "
            f"{local.recommended_batch_size} (another rank's card or the global target decided); "
            "memory only falls with the batch"
        )
    lr = None
    if config.base_lr is not None:
        lr = scale_lr(
            config.base_lr,
            config.base_batch_size or plan.global_batch,
            plan.global_batch,
            rule=config.lr_rule,
            optimizer=optimizer if optimizer is not None else "sgd",
            noise_scale=config.noise_scale,
        )
    return replace(
        local,
        recommended_batch_size=plan.per_device,
        world_size=plan.world_size,
        gradient_accumulation_steps=plan.accumulation,
        global_batch_size=plan.global_batch,
        ranks=[r.to_dict() for r in reports],
        learning_rate=lr.learning_rate if lr else None,
        lr_advice=lr.to_dict() if lr else None,
        notes=notes,
    )


def rounding_note(outcome: SearchOutcome, config: ProbeConfig) -> list[str]:
    """Say what power-of-two rounding cost, when the memory line says a multiple of 8 gives more."""
    line, budget = reserved_model(outcome.trials), outcome.budget
    if config.rounding != "pow2" or line is None or not outcome.recommended:
        return []
    over = [t.batch_size for t in outcome.trials if not t.ok or t.peak_reserved > budget]
    limit = min([line.max_batch(budget), *(b - 1 for b in over), config.max_batch_size or 2**62])
    mult8 = round_batch(limit, "mult8")
    if mult8 <= outcome.recommended:
        return []
    return [
        f"rounded down to a power of two; by the memory line rounding='mult8' (--rounding mult8) "
        f"gives about {mult8}, verified by a trial when asked"
    ]


def build_result(outcome: SearchOutcome, dev: Device, config: ProbeConfig, elapsed: float) -> Result:
    within = [t for t in outcome.trials if t.within(outcome.budget)]
    knee = throughput_knee(within) if dev.real_timing else None
    goodput = goodput_batch_size(within, config.noise_scale) if dev.real_timing and config.noise_scale else None
    recommended = outcome.recommended
    notes = []
    if config.objective == "throughput" and knee is not None:
        recommended = knee
    elif config.objective == "goodput" and goodput is not None:
        recommended = goodput
    elif config.objective != "memory":
        notes.append(
            f"objective={config.objective!r} needs real step times; {dev.description} has none, "
            "so the memory answer stands"
        )
    notes.extend(dev.notes)
    notes.extend(rounding_note(outcome, config))
    chosen = next((t for t in outcome.trials if t.batch_size == recommended and t.ok), None)
    if chosen is not None and chosen.alloc_retries:
        # The allocator had to free its cache and retry: the batch fits, but only just.
        notes.append(
            f"batch {recommended} needed {chosen.alloc_retries} allocator retries (cache flushes): it fits "
            "only just; consider a larger margin"
        )
    compile_info = compile_summary(outcome, dev) if config.compile else None
    if compile_info and dev.is_estimate:
        notes.append(
            f"compiled with backend {compile_info['backend']}: what the graph saves for backward as "
            "inductor partitions it, with eager kernels; inductor's fusion of temporaries is not counted"
        )
    if compile_info and compile_info["graph_breaks"]:
        notes.append(
            f"{compile_info['graph_breaks']} graph breaks: parts of the step ran eager between compiled graphs"
        )
    line, line_alloc = outcome.line, outcome.line_allocated
    return Result(
        mode=config.mode,
        eval_batch_size=recommended if config.mode == "eval" else None,
        recommended_batch_size=recommended,
        largest_batch_ran=outcome.largest_ran,
        predicted_limit=outcome.predicted_limit,
        per_sample_bytes=line.per_sample if line else None,
        fixed_bytes=line.fixed if line else None,
        per_sample_allocated_bytes=line_alloc.per_sample if line_alloc else None,
        fixed_allocated_bytes=line_alloc.fixed if line_alloc else None,
        capacity_bytes=dev.capacity,
        budget_bytes=outcome.budget,
        margin=config.margin,
        device=dev.description,
        is_estimate=dev.is_estimate,
        trials=outcome.trials,
        elapsed_s=elapsed,
        exact_limit=outcome.exact_limit,
        throughput_knee=knee,
        goodput_batch_size=goodput,
        memory_batch_size=outcome.recommended,
        objective=config.objective,
        timing_is_real=dev.real_timing,
        notes=notes,
        compiled=compile_info,
    )


def compile_summary(outcome: SearchOutcome, dev: Device) -> dict[str, Any]:
    """How often the compiled step compiled: the first trial compiles, any later compile is a recompile."""
    counts = [t.compilations for t in outcome.trials]
    return {
        "backend": dev.compile_backend,
        "compilations": sum(counts),
        "recompiles": sum(counts[1:]),
        "graph_breaks": sum(t.graph_breaks for t in outcome.trials),
    }


def with_evaluation(trained: Result, evaluated: Result) -> Result:
    """The training answer with the evaluation answer beside it (mode='both')."""
    return replace(
        trained,
        mode="both",
        eval_batch_size=evaluated.recommended_batch_size,
        eval_per_sample_bytes=evaluated.per_sample_allocated_bytes,
        eval_fixed_bytes=evaluated.fixed_allocated_bytes,
        eval_trials=evaluated.trials,
        elapsed_s=trained.elapsed_s + evaluated.elapsed_s,
    )

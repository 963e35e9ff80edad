"""What a probe found, as a frozen record: JSON-ready through `to_dict()`, readable through `str()`.

The library returns this and never prints; the CLI decides what to show.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from batchfit.memory import format_size


@dataclass(frozen=True)
class Trial:
    """One batch size, run for a few real optimizer steps and measured."""

    batch_size: int
    ok: bool
    """True when every step ran; False when the device ran out of memory."""
    peak_allocated: int = 0
    peak_reserved: int = 0
    seconds_per_step: float | None = None
    alloc_retries: int = 0
    largest_alloc: int = 0
    """The largest single allocation (bytes): a request no free hole fits can fail early."""
    peak_inactive_split: int = 0
    """Peak free bytes stranded in partly used segments (the allocator's fragmentation)."""
    compilations: int = 0
    """Frames torch.compile compiled during this trial (compile=True): after the first, recompiles."""
    graph_breaks: int = 0

    def within(self, budget: float) -> bool:
        """Whether every step ran and peaked at or under `budget` bytes reserved."""
        return self.ok and self.peak_reserved <= budget

    @property
    def samples_per_s(self) -> float | None:
        if not self.ok or not self.seconds_per_step:
            return None
        return self.batch_size / self.seconds_per_step

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "status": "fitted" if self.ok else "oom",
            "peak_allocated_bytes": self.peak_allocated,
            "peak_reserved_bytes": self.peak_reserved,
            "seconds_per_step": self.seconds_per_step,
            "samples_per_s": self.samples_per_s,
            "alloc_retries": self.alloc_retries,
            "largest_alloc_bytes": self.largest_alloc,
            "peak_inactive_split_bytes": self.peak_inactive_split,
            "compilations": self.compilations,
            "graph_breaks": self.graph_breaks,
        }


def _trial_table(trials: list[Trial], title: str) -> list[str]:
    lines = [title] if title else []
    lines.append(f"{'batch':>7} {'status':>7} {'peak alloc':>11} {'peak reserved':>14} {'s/step':>8} {'samples/s':>10}")
    for t in trials:
        sps = f"{t.samples_per_s:10.1f}" if t.samples_per_s else f"{'-':>10}"
        sec = f"{t.seconds_per_step:8.3f}" if t.seconds_per_step else f"{'-':>8}"
        peak_a = format_size(t.peak_allocated) if t.ok else "-"
        peak_r = format_size(t.peak_reserved) if t.ok else "-"
        lines.append(f"{t.batch_size:>7} {'fitted' if t.ok else 'OOM':>7} {peak_a:>11} {peak_r:>14} {sec} {sps}")
    return lines


@dataclass(frozen=True)
class Result:
    """The answer of a probe and the evidence behind it."""

    recommended_batch_size: int
    largest_batch_ran: int
    predicted_limit: int | None
    per_sample_bytes: float | None
    fixed_bytes: float | None
    per_sample_allocated_bytes: float | None
    fixed_allocated_bytes: float | None
    capacity_bytes: int
    budget_bytes: int
    """What the recommendation may peak at: (1 - margin) × capacity, as the search judged it."""
    margin: float
    device: str
    is_estimate: bool
    trials: list[Trial]
    elapsed_s: float
    learning_rate: float | None = None
    lr_advice: dict[str, Any] | None = None
    exact_limit: int | None = None
    throughput_knee: int | None = None
    goodput_batch_size: int | None = None
    memory_batch_size: int | None = None
    objective: str = "memory"
    timing_is_real: bool = True
    world_size: int = 1
    gradient_accumulation_steps: int = 1
    global_batch_size: int | None = None
    ranks: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    mode: str = "train"
    """What was sized: 'train', 'eval' (forward only, inference mode) or 'both'."""
    eval_batch_size: int | None = None
    eval_per_sample_bytes: float | None = None
    """Evaluation's allocated memory line (mode='both'); the trials are `eval_trials`."""
    eval_fixed_bytes: float | None = None
    eval_trials: list[Trial] = field(default_factory=list)
    sample_index: int | None = None
    """When the sample was data: the item probed with (the largest scanned)."""
    compiled: dict[str, Any] | None = None
    """compile=True: the backend, frames compiled, recompiles after the first trial, graph breaks."""

    @property
    def headroom_bytes(self) -> float | None:
        """Capacity left free at the recommendation, by the fitted line."""
        if self.per_sample_bytes is None or self.fixed_bytes is None:
            return None
        used = self.fixed_bytes + self.per_sample_bytes * self.recommended_batch_size
        return self.capacity_bytes - used

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["trials"] = [t.to_dict() for t in self.trials]
        data["eval_trials"] = [t.to_dict() for t in self.eval_trials]
        data["headroom_bytes"] = self.headroom_bytes
        data["per_device_batch_size"] = self.recommended_batch_size
        # Fitted lines give fractional bytes; a byte count in JSON is a whole number.
        for key in (k for k in data if k.endswith("_bytes") and data[k] is not None):
            data[key] = round(data[key])
        return data

    def __str__(self) -> str:
        lines = [f"device: {self.device}" + (" — an estimate" if self.is_estimate else "")]
        lines += _trial_table(self.trials, "evaluation (forward only)" if self.mode == "eval" else "")
        if self.eval_trials:
            lines += ["", *_trial_table(self.eval_trials, "evaluation (forward only)")]
        lines.append("")
        lines.append(
            ("evaluation batch size:  " if self.mode == "eval" else "recommended batch size: ")
            + str(self.recommended_batch_size)
            + (f" (objective: {self.objective})" if self.objective != "memory" else "")
        )
        if self.mode == "both" and self.eval_batch_size is not None:
            per = self.eval_per_sample_bytes
            line = f"evaluation batch size:  {self.eval_batch_size}"
            lines.append(line + (f" (forward only: {format_size(per)} a sample allocated)" if per else ""))
        if self.world_size > 1 or self.gradient_accumulation_steps > 1:
            lines.append(
                f"global batch:           {self.global_batch_size} = {self.recommended_batch_size} per device"
                f" × {self.world_size} ranks × {self.gradient_accumulation_steps} accumulation steps"
            )
        if self.learning_rate is not None:
            on = f" (for global batch {self.global_batch_size})" if self.world_size > 1 else ""
            lines.append(f"learning rate:          {self.learning_rate:.6g}{on}")
        lines.append(f"largest batch that ran: {self.largest_batch_ran}")
        if self.predicted_limit is not None:
            lines.append(f"predicted limit:        {self.predicted_limit}")
        if self.exact_limit is not None:
            lines.append(f"exact limit:            {self.exact_limit}")
        if self.per_sample_bytes is not None and self.fixed_bytes is not None:
            allocated = ""
            if self.per_sample_allocated_bytes is not None and self.fixed_allocated_bytes is not None:
                allocated = (
                    f"{format_size(self.per_sample_allocated_bytes)} allocated "
                    f"(+ {format_size(self.fixed_allocated_bytes)} fixed), "
                )
            lines.append(
                f"memory per sample:      {allocated}{format_size(self.per_sample_bytes)} reserved "
                f"(+ {format_size(self.fixed_bytes)} fixed)"
            )
        headroom = self.headroom_bytes
        if headroom is not None:
            lines.append(
                f"headroom:               {format_size(headroom)} of {format_size(self.capacity_bytes)} "
                f"(margin {self.margin:.0%})"
            )
        if self.compiled:
            c = self.compiled
            lines.append(
                f"compiled:               {c['backend']}, {c['compilations']} compilations "
                f"({c['recompiles']} after the first trial), {c['graph_breaks']} graph breaks"
            )
        if self.throughput_knee is not None:
            lines.append(f"throughput knee:        {self.throughput_knee} (95% of best samples/s)")
        if self.lr_advice and self.lr_advice.get("advice"):
            for line in self.lr_advice["advice"]:
                lines.append(f"lr advice: {line}")
        lines.extend(f"note: {n}" for n in self.notes)
        lines.append(f"elapsed: {self.elapsed_s:.1f} s")
        return "\n".join(lines)


@dataclass(frozen=True)
class CheckResult:
    """Whether one batch size trains within the budget, measured by a real trial."""

    batch_size: int
    fits: bool
    peak_reserved_bytes: int | None
    budget_bytes: float
    capacity_bytes: int
    margin: float
    device: str
    largest_fitting: int | None = None
    needed_bytes: int | None = None
    """When the trial ran out of memory: what the batch needs, by `needed_basis`."""
    needed_basis: str | None = None
    trial: Trial | None = field(default=None, compare=False, repr=False)
    """The trial at `batch_size` that decided (not in to_dict): the lever table's first row on
    the same simulated card starts from it instead of running it again."""

    @property
    def overshoot_bytes(self) -> int | None:
        peak = self.peak_reserved_bytes if self.peak_reserved_bytes is not None else self.needed_bytes
        return None if peak is None else round(peak - self.budget_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "fits": self.fits,
            "peak_reserved_bytes": self.peak_reserved_bytes,
            "budget_bytes": round(self.budget_bytes),
            "overshoot_bytes": self.overshoot_bytes,
            "capacity_bytes": self.capacity_bytes,
            "margin": self.margin,
            "device": self.device,
            "largest_fitting": self.largest_fitting,
            "needed_bytes": self.needed_bytes,
            "needed_basis": self.needed_basis,
        }

    def __str__(self) -> str:
        if self.fits:
            return (
                f"batch_size={self.batch_size} fits: peak {format_size(self.peak_reserved_bytes or 0)} "
                f"within {format_size(self.budget_bytes)} ({1 - self.margin:.0%} of "
                f"{format_size(self.capacity_bytes)}) on {self.device}"
            )
        over = f"{format_size(self.overshoot_bytes or 0)} over the budget"
        if self.peak_reserved_bytes is not None:
            how = f"peaks at {format_size(self.peak_reserved_bytes)}, {over}"
        elif self.needed_bytes is not None:
            how = f"runs out of memory: it needs about {format_size(self.needed_bytes)} ({self.needed_basis}), {over}"
        else:
            how = "runs out of memory, over the budget"
        return (
            f"batch_size={self.batch_size} does not fit: it {how} of {format_size(self.budget_bytes)} "
            f"({1 - self.margin:.0%} of {format_size(self.capacity_bytes)}) on {self.device}"
            + ("" if self.largest_fitting is None else f"; largest that fits: {self.largest_fitting}")
        )


class DoesNotFitError(RuntimeError):
    """The batch (or any batch) does not train within the memory budget."""

    def __init__(self, message: str, check: CheckResult | None = None) -> None:
        super().__init__(message)
        self.check = check

"""The lever table's records: one row per lever, and the table with its text rendering."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from batchfit.memory import format_size
from batchfit.result import Trial


@dataclass(frozen=True)
class Lever:
    """One row: a change to the training run, and what it buys at the batch asked."""

    name: str
    group: str
    cost: str
    fits: int | None = None
    """Largest batch within the margin with this lever (by its memory line, verified by a trial)."""
    peak_at_batch: int | None = None
    """Peak reserved bytes at the batch asked; None when it ran out of memory there."""
    predicted_peak: int | None = None
    """When the batch asked ran out of memory: its peak by the variant's memory line."""
    detail: str = ""
    applies: bool = True
    """False: the lever does not apply to this model; `detail` says why and no number is given."""
    trials: list[Trial] = field(default_factory=list)

    def reaches(self, batch_size: int) -> bool:
        """Whether the lever trains the batch asked (accumulation: as a global batch)."""
        return self.applies and ((self.fits or 0) >= batch_size or self.group == "accumulation")

    def to_dict(self) -> dict[str, Any]:
        return {
            "lever": self.name,
            "group": self.group,
            "applies": self.applies,
            "fits": self.fits,
            "peak_at_batch_bytes": self.peak_at_batch,
            "predicted_peak_bytes": self.predicted_peak,
            "cost": self.cost,
            "detail": self.detail,
            "trials": [t.to_dict() for t in self.trials],
        }


@dataclass(frozen=True)
class LeverTable:
    """The levers priced for one model and batch size on one (simulated) card."""

    batch_size: int
    capacity_bytes: int
    budget_bytes: int
    device: str
    levers: list[Lever]
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "capacity_bytes": self.capacity_bytes,
            "budget_bytes": self.budget_bytes,
            "device": self.device,
            "levers": [lever.to_dict() for lever in self.levers],
            "elapsed_s": self.elapsed_s,
        }

    def __str__(self) -> str:
        lines = [
            f"levers for batch {self.batch_size} on {self.device} "
            f"(budget {format_size(self.budget_bytes)} of {format_size(self.capacity_bytes)}):",
            f"  {'lever':<30} {'fits':>6} {f'peak at {self.batch_size}':>16}  cost",
        ]
        for lever in self.levers:
            if not lever.applies:
                lines.append(f"  {lever.name:<30} {'-':>6} {'-':>16}  {lever.detail}")
                continue
            peak = format_size(lever.peak_at_batch) if lever.peak_at_batch is not None else "OOM"
            if lever.peak_at_batch is None and lever.predicted_peak:
                peak = f"OOM ~{format_size(lever.predicted_peak)}"
            if lever.peak_at_batch is not None and lever.peak_at_batch > self.budget_bytes:
                peak += "!"
            detail = f" [{lever.detail}]" if lever.detail else ""
            lines.append(f"  {lever.name:<30} {lever.fits or 0:>6} {peak:>16}  {lever.cost}{detail}")
        lines.append(
            "  (fits: largest batch within the margin; '!': over the budget at the batch asked; "
            "'OOM ~': out of memory, peak by the lever's memory line)"
        )
        lines.append(f"elapsed: {self.elapsed_s:.1f} s")
        return "\n".join(lines)

"""Plots of peak memory against batch size (trials, fitted line, capacity, budget, samples/s) and of
the lever table, as PNG, PDF or SVG by the path's suffix; each names the card, simulated or not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from batchfit.lever.records import LeverTable
from batchfit.memory import GIB
from batchfit.result import Result


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("--plot needs matplotlib: pip install 'batchfit[plot]'") from error
    return plt


FORMATS = (".png", ".pdf", ".svg")


def _save(fig: Any, path: str, device: str) -> None:
    """The card in a corner (its description says when it is simulated), in the suffix's format."""
    fig.text(0.99, 0.005, device, ha="right", va="bottom", fontsize="x-small", color="dimgray")
    suffix = Path(path).suffix.lower()
    fig.savefig(path, dpi=100, format=suffix[1:] if suffix in FORMATS else "png")  # the path as given


def plot_levers(table: LeverTable, path: str, title: str = "") -> None:
    """A bar per lever: the largest batch that fits with it, against the batch asked."""
    plt = _pyplot()
    rows = table.levers[::-1]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    fits = [lever.fits or 0 if lever.applies else 0 for lever in rows]
    colors = ["tab:green" if lever.reaches(table.batch_size) else "tab:gray" for lever in rows]
    # Accumulation's bar is its per-step (micro) batch: hatched, and labelled with the global batch.
    hatches = ["//" if lever.group == "accumulation" and lever.applies else "" for lever in rows]
    ax.barh([lever.name for lever in rows], fits, color=colors, hatch=hatches)
    ax.axvline(table.batch_size, color="black", linestyle="--", label=f"batch asked: {table.batch_size}")
    for y, lever in enumerate(rows):
        label = str(lever.fits or 0) if lever.applies else "does not apply"
        if lever.applies and lever.group == "accumulation":
            label = f"{lever.detail.split(';')[0]} = global batch {table.batch_size}"
        ax.annotate(label, (fits[y], y), xytext=(3, 0), textcoords="offset points", va="center", fontsize="small")
    ax.set_xlabel("largest batch within the margin (accumulation: per step)")
    ax.set_title(title or table.device, fontsize="medium")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    _save(fig, path, table.device)
    plt.close(fig)


def plot_result(result: Result, path: str, title: str = "") -> None:
    """Write the memory plot of `result` to `path`; matplotlib is an optional extra."""
    plt = _pyplot()
    fitted = [t for t in result.trials if t.ok]
    failed = [t for t in result.trials if not t.ok]
    top = max([t.batch_size for t in result.trials] + [result.predicted_limit or 0])
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.scatter([t.batch_size for t in fitted], [t.peak_reserved / GIB for t in fitted], label="peak reserved")
    ax.scatter(
        [t.batch_size for t in fitted],
        [t.peak_allocated / GIB for t in fitted],
        marker="x",
        label="peak allocated",
    )
    evaluated = [t for t in result.eval_trials if t.ok]
    if evaluated:
        ax.scatter(
            [t.batch_size for t in evaluated],
            [t.peak_allocated / GIB for t in evaluated],
            marker="^",
            label="evaluation, peak allocated",
        )
    for t in failed:
        ax.axvline(t.batch_size, color="red", alpha=0.3, linestyle=":")
    if failed:
        ax.plot([], [], color="red", alpha=0.3, linestyle=":", label="out of memory")
    if result.per_sample_bytes is not None and result.fixed_bytes is not None:
        xs = [0, top * 1.1]
        ax.plot(
            xs,
            [(result.fixed_bytes + result.per_sample_bytes * x) / GIB for x in xs],
            color="gray",
            label="fitted line",
        )
    ax.axhline(result.capacity_bytes / GIB, color="black", label="capacity")
    ax.axhline(
        result.budget_bytes / GIB,
        color="orange",
        linestyle="--",
        label=f"budget ({1 - result.margin:.0%})",
    )
    ax.axvline(result.recommended_batch_size, color="green", label=f"recommended {result.recommended_batch_size}")
    ax.set_xlabel("batch size")
    ax.set_ylabel("GiB")
    ax.set_title(title or result.device)
    rates = [(t.batch_size, t.samples_per_s) for t in fitted if t.samples_per_s]
    if rates:
        twin = ax.twinx()
        twin.plot(*zip(*sorted(rates), strict=False), color="purple", marker="o", alpha=0.6, label="samples/s")
        twin.set_ylabel("samples/s")
        twin.legend(loc="lower right")
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    _save(fig, path, result.device)
    plt.close(fig)

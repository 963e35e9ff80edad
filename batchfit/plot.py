"""A PNG of peak memory against batch size: trials, fitted line, capacity, budget, samples/s."""

from __future__ import annotations

from typing import Any

from batchfit.lever.records import LeverTable
from batchfit.memory import GIB
from batchfit.memory import budget as memory_budget
from batchfit.result import Result


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("--plot needs matplotlib: pip install 'batchfit[plot]'") from error
    return plt


def plot_levers(table: LeverTable, path: str, title: str = "") -> None:
    """A bar per lever: the largest batch that fits with it, against the batch asked."""
    plt = _pyplot()
    rows = [lever for lever in table.levers if lever.applies]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    names = [lever.name for lever in rows][::-1]
    fits = [lever.fits or 0 for lever in rows][::-1]
    colors = ["tab:green" if lever.reaches(table.batch_size) else "tab:gray" for lever in rows][::-1]
    ax.barh(names, fits, color=colors)
    ax.axvline(table.batch_size, color="black", linestyle="--", label=f"batch asked: {table.batch_size}")
    for y, value in enumerate(fits):
        ax.annotate(str(value), (value, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize="small")
    ax.set_xlabel("largest batch within the margin")
    ax.set_title(title or table.device, fontsize="medium")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
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
        memory_budget(result.capacity_bytes, result.margin) / GIB,
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
    fig.savefig(path, dpi=100, format="png")  # the path as given: no extension added
    plt.close(fig)

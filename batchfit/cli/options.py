"""The options the commands share, and the callbacks that check them before any work.

torch-free, like config and memory: `batchfit --help` must not import torch.
"""

from __future__ import annotations

import functools
import os
import re
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from batchfit import interrupts
from batchfit.config import LR_RULES, MODES, OPTIMIZER_NAMES, PRECISIONS, ROUNDINGS, check_device_name
from batchfit.gpus import find_gpu
from batchfit.memory import parse_size


def _shape(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        shape = tuple(int(part) for part in value.replace("x", ",").split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a shape; use e.g. 3,224,224") from None
    if not shape or any(d < 1 for d in shape):
        raise click.BadParameter(f"{value!r} must be positive integers, e.g. 3,224,224")
    return shape


def world_sizes(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    """'8,64' -> (8, 64): the world sizes of --fsdp."""
    if value is None:
        return None
    try:
        sizes = tuple(int(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a list of GPU counts; use e.g. 8,64") from None
    if any(n < 1 for n in sizes):
        raise click.BadParameter(f"{value!r}: GPU counts are positive, e.g. 8,64")
    return tuple(dict.fromkeys(sizes))


def _converting(convert: Callable[[str], Any]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback that turns the library's ValueError into a one-line usage error."""

    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
        if value is None:
            return None
        try:
            return convert(value)
        except ValueError as error:
            raise click.BadParameter(str(error)) from None

    return callback


def _cli_size(value: str) -> int:
    """A size on the command line: a bare number is almost never meant as bytes, so it needs a unit."""
    if re.fullmatch(r"\s*[0-9.eE+-]+\s*", value):
        raise ValueError(f"{value.strip()} has no unit: give a unit, e.g. 24GiB ({value.strip()}B for bytes)")
    return parse_size(value)


def output_path(
    *, stdout: bool, needs: str | None = None, suffixes: tuple[str, ...] = ()
) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """Check an output path before any work: a file in an existing, writable folder, which opens
    for writing (a read-only or immutable file, a path under /proc) and has a suffix it can be."""

    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is None or (stdout and value == "-"):
            return value
        if value == "-":
            raise click.BadParameter("'-' (stdout) is for --json; give a file path")
        path = Path(value)
        if path.is_dir():
            raise click.BadParameter(f"{value!r} is a directory; give a file path")
        if suffixes and path.suffix and path.suffix.lower() not in suffixes:  # no suffix: the first format
            raise click.BadParameter(f"{value!r}: give a path ending in {', '.join(suffixes)} (the format written)")
        folder = path.parent
        if not folder.is_dir():
            raise click.BadParameter(f"{value!r}: the folder {str(folder)!r} does not exist")
        if not os.access(folder, os.W_OK):
            raise click.BadParameter(f"{value!r}: the folder {str(folder)!r} is not writable")
        if needs is not None:
            import importlib.util

            if importlib.util.find_spec(needs) is None:
                raise click.BadParameter(f"writing {value!r} needs {needs}: pip install 'batchfit[plot]'")
        _try_open(path)
        return value

    return callback


def _try_open(path: Path) -> None:
    """Open `path` for writing now, not after the work: a file made for the test is removed again."""
    existed = path.exists()
    try:
        with open(path, "a"):
            pass
    except OSError as error:
        raise click.BadParameter(f"{str(path)!r} cannot be opened for writing: {error.strerror}") from None
    if not existed:
        path.unlink()


def choice(flag: str, choices: tuple[str, ...], help: str) -> Callable[..., Any]:
    """An option over one of config.py's closed choices; the first is the default."""
    return click.option(flag, type=click.Choice(choices), default=choices[0], show_default=True, help=help)


def model_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by probe, estimate and check."""
    options = [
        click.option(
            "--model",
            "model_name",
            metavar="NAME",
            help="torchvision name, bert-base/gpt2/…, timm:NAME or path/file.py:factory.",
        ),
        click.option(
            "--input-shape",
            callback=_shape,
            metavar="C,H,W",
            help="One sample's shape (image models; default 3,224,224).",
        ),
        click.option("--seq-len", type=click.IntRange(min=1), help="Sequence length (transformers)."),
        click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True),
        click.option(
            "--optimizer",
            type=click.Choice(OPTIMIZER_NAMES),
            default="sgd",
            show_default=True,
            help="SGD momentum 0.9; AdamW/Adam with foreach.",
        ),
        click.option(
            "--margin",
            type=click.FloatRange(0, 1, max_open=True),
            default=0.2,
            show_default=True,
            help="Fraction of usable memory kept free.",
        ),
        click.option(
            "--memory", callback=_converting(_cli_size), metavar="SIZE", help="Plan for this capacity, e.g. 24GiB."
        ),
        click.option(
            "--gpu", callback=_converting(find_gpu), metavar="NAME", help="Plan for a known card (batchfit gpus)."
        ),
        click.option(
            "--device",
            "device_name",
            metavar="DEV",
            callback=_converting(check_device_name),
            help="cuda, cuda:N, simulated (offline estimate) or cpu (simulated, real CPU arithmetic).",
        ),
        click.option(
            "--base-lr",
            type=click.FloatRange(min=0, min_open=True),
            help="Learning rate known good at --base-batch-size.",
        ),
        click.option("--base-batch-size", type=click.IntRange(min=1)),
        click.option(
            "--lr-rule",
            type=click.Choice(LR_RULES),
            default="auto",
            show_default=True,
        ),
        click.option(
            "--noise-scale",
            type=click.FloatRange(min=0, min_open=True),
            help="Gradient noise scale B_simple, if known.",
        ),
        click.option("--exact", is_flag=True, help="Also bisect to the exact limit."),
        click.option(
            "--steps-per-trial",
            type=click.IntRange(min=1),
            default=2,
            show_default=True,
            help="Training steps a trial runs; 1: optimizer state made before its one step (faster; docs/design.md).",
        ),
        click.option(
            "--checkpointing", is_flag=True, help="Checkpoint the model's repeated blocks (activation checkpointing)."
        ),
        click.option(
            "--lora",
            type=click.IntRange(min=1),
            metavar="R",
            help="Train LoRA adapters of rank R on every linear layer (Hugging Face models; needs peft).",
        ),
        click.option(
            "--compile",
            "compile_model",
            is_flag=True,
            help="Measure the model under torch.compile (batch dimension dynamic).",
        ),
        choice("--mode", MODES, "Size training, evaluation (forward only, inference mode), or both."),
        choice("--rounding", ROUNDINGS, "Round the answer down to a power of two, a multiple of 8, or not at all."),
        click.option(
            "--target-global-batch",
            type=click.IntRange(min=1),
            help="Global batch to reach with gradient accumulation (per device × ranks × steps).",
        ),
        click.option(
            "--rendezvous-timeout",
            type=click.FloatRange(min=0, min_open=True),
            metavar="SECONDS",
            help="Under torchrun's variables: how long to wait for the other ranks to join "
            "(default 300, or BATCHFIT_RENDEZVOUS_TIMEOUT).",
        ),
        click.option(
            "--json",
            "json_path",
            metavar="PATH",
            callback=output_path(stdout=True),
            help="Write the result as JSON ('-': stdout).",
        ),
        click.option(
            "--plot",
            "plot_path",
            metavar="PATH",
            callback=output_path(stdout=False, needs="matplotlib", suffixes=(".png", ".pdf", ".svg")),
            help="Plot memory against batch size (check: the levers) to PATH (.png, .pdf or .svg).",
        ),
        click.option("--quiet", "-q", is_flag=True, help="Print only the answer."),
    ]
    for option in reversed(options):
        func = option(func)
    return _after_importing_torch(func)


def import_torch() -> None:
    """torch imported with Ctrl-C held until it is done, then raised: a KeyboardInterrupt inside
    torch's C++ start-up is lost (its own numpy import turns it into a warning, and the command
    went on) or aborts the process (pybind11: "terminate called ... KeyboardInterrupt", exit -6).
    A user who started the command with SIGINT ignored keeps it ignored."""
    held = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    heard: list[int] = []
    if held:
        signal.signal(signal.SIGINT, lambda number, frame: heard.append(number))
    try:
        import torch  # noqa: F401
    finally:
        if held:
            # From now on Python's handler, that also notes each Ctrl-C: one that a finalizer drops
            # is raised again by the simulated card's next operator (batchfit.interrupts).
            signal.signal(signal.SIGINT, interrupts.heard)
    if heard:
        raise KeyboardInterrupt


def _after_importing_torch(command: Callable[..., Any]) -> Callable[..., Any]:
    """The command, which imports torch first (held from Ctrl-C) once its options are parsed."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        import_torch()
        return command(*args, **kwargs)

    return run

"""The `batchfit` command: parses options, calls the library, prints. Nothing else lives here.

Exit codes, for every command: 0 success (and `check`: the batch fits), 1 it does not fit,
2 bad input (checked before any probing wherever it can be), 3 the user's model or factory
failed (a real bug, not memory), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

# torch-free, like memory: `batchfit --help` must not import torch
from batchfit.config import LR_RULES, MODES, OBJECTIVES, OPTIMIZER_NAMES, PRECISIONS, ROUNDINGS, check_device_name
from batchfit.gpus import find_gpu
from batchfit.memory import parse_size

EXIT_DOES_NOT_FIT = 1
EXIT_BAD_INPUT = 2
EXIT_MODEL_ERROR = 3
EXIT_INTERRUPTED = 130  # the shell's convention: 128 + SIGINT


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


def _output_path(*, stdout: bool, needs: str | None = None) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """Check an output path before any work: a file in an existing, writable folder."""

    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is None or (stdout and value == "-"):
            return value
        path = Path(value)
        if path.is_dir():
            raise click.BadParameter(f"{value!r} is a directory; give a file path")
        folder = path.parent
        if not folder.is_dir():
            raise click.BadParameter(f"{value!r}: the folder {str(folder)!r} does not exist")
        if not os.access(folder, os.W_OK):
            raise click.BadParameter(f"{value!r}: the folder {str(folder)!r} is not writable")
        if needs is not None:
            import importlib.util

            if importlib.util.find_spec(needs) is None:
                raise click.BadParameter(f"writing {value!r} needs {needs}: pip install 'batchfit[plot]'")
        return value

    return callback


def _choice(flag: str, choices: tuple[str, ...], help: str) -> Callable[..., Any]:
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
            "--memory", callback=_converting(parse_size), metavar="SIZE", help="Plan for this capacity, e.g. 24GiB."
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
        _choice("--mode", MODES, "Size training, evaluation (forward only, inference mode), or both."),
        _choice("--rounding", ROUNDINGS, "Round the answer down to a power of two, a multiple of 8, or not at all."),
        click.option(
            "--target-global-batch",
            type=click.IntRange(min=1),
            help="Global batch to reach with gradient accumulation (per device × ranks × steps).",
        ),
        click.option(
            "--json",
            "json_path",
            metavar="PATH",
            callback=_output_path(stdout=True),
            help="Write the result as JSON ('-': stdout).",
        ),
        click.option(
            "--plot",
            "plot_path",
            metavar="PATH",
            callback=_output_path(stdout=False, needs="matplotlib"),
            help="Write a PNG of memory against batch size to PATH.",
        ),
        click.option("--quiet", "-q", is_flag=True, help="Print only the answer."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


class Run:
    """The pieces every command needs, built from the shared options: one ProbeConfig, a model."""

    def __init__(self, opts: dict[str, Any], *, simulate: bool, **extra: Any) -> None:
        import batchfit
        from batchfit.models import UserCodeError, build, variant
        from batchfit.optimizers import OPTIMIZERS

        if not opts["model_name"]:
            raise click.UsageError("--model is required (see batchfit probe --list-models)")
        if opts["memory"] and opts["gpu"]:
            raise click.UsageError("give --memory or --gpu, not both")
        if bool(opts["base_batch_size"]) != bool(opts["base_lr"]):
            raise click.UsageError("--base-lr and --base-batch-size go together: the rate and the batch it was good at")
        # Under torchrun every rank probes, and rank 0 speaks for all of them.
        self.main_rank = os.environ.get("RANK", "0") == "0"
        self.quiet = opts["quiet"] or not self.main_rank
        self.live = not self.quiet and sys.stderr.isatty()
        self.optimizer: Any = OPTIMIZERS[opts["optimizer"]]
        if opts["mode"] == "eval":
            source = click.get_current_context().get_parameter_source("optimizer")
            if source == click.core.ParameterSource.COMMANDLINE:
                raise click.UsageError("--mode eval runs no optimizer step: --optimizer does not apply (--mode both)")
            self.optimizer = None
        try:
            self.config = batchfit.ProbeConfig(
                margin=opts["margin"],
                memory=opts["memory"],
                gpu=opts["gpu"].name if opts["gpu"] else None,
                precision=None if opts["precision"] == "fp32" else opts["precision"],
                base_lr=opts["base_lr"],
                base_batch_size=opts["base_batch_size"],
                lr_rule=opts["lr_rule"],
                noise_scale=opts["noise_scale"],
                exact=opts["exact"],
                rounding=opts["rounding"],
                mode=opts["mode"],
                compile=opts["compile_model"],
                target_global_batch=opts["target_global_batch"],
                **extra,
            )
            # The CUDA device itself is resolved inside the probe, after torch.distributed has
            # pinned this rank's GPU; here only where it will run, to build the model for it.
            self.device: str | None = "simulated" if simulate else opts["device_name"]
            kind = self.device_kind = batchfit.device_kind(self.device)
        except ValueError as error:
            raise click.UsageError(str(error)) from None
        try:
            # The simulated device reads only shapes: build its models on the meta device.
            self.spec = variant(
                build(
                    opts["model_name"],
                    input_shape=opts["input_shape"],
                    seq_len=opts["seq_len"],
                    on_meta=kind == "simulated",
                ),
                checkpointing=opts["checkpointing"],
                lora=opts["lora"],
            )
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="--model") from None
        except UserCodeError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(EXIT_MODEL_ERROR)
        self.trials: list[Any] = []

    def call(self, entry: Callable[..., Any], *args: Any, **extra: Any) -> Any:
        """A library entry point (find_batch_size, preflight, levers) on this run's model and options."""
        return entry(
            self.spec.model,
            self.spec.sample,
            *args,
            optimizer=self.optimizer,
            loss_fn=self.spec.loss_fn,
            device=self.device,
            config=self.config,
            **extra,
        )

    def on_start(self, device: Any) -> None:
        self.say(f"probing {self.spec.description} on {device.description}")
        if device.caveat:
            self.say(device.caveat)

    def say(self, text: str) -> None:
        if not self.quiet:
            click.echo(text, err=True)

    def on_trial_start(self, batch_size: int) -> None:
        if self.live:
            click.echo(f"  batch {batch_size:>6}: running…", err=True, nl=False)

    def on_trial(self, trial: Any) -> None:
        self.trials.append(trial)
        line = _trial_line(trial)
        # On a terminal the "running…" line is overwritten in place; in a log each trial is one line.
        self.say(f"\r{line:<60}" if self.live else line)


def _trial_line(trial: Any) -> str:
    from batchfit.memory import format_size

    if not trial.ok:
        return f"  batch {trial.batch_size:>6}: out of memory"
    timing = f", {trial.seconds_per_step:.3f} s/step" if trial.seconds_per_step else ""
    return f"  batch {trial.batch_size:>6}: fitted, peak {format_size(trial.peak_reserved)}{timing}"


def _emit_json(data: dict[str, Any], path: str | None) -> None:
    if not path:
        return
    text = json.dumps(data, indent=2, default=str)
    if path == "-":
        click.echo(text)
    else:
        with open(path, "w") as handle:
            handle.write(text + "\n")


def _fail(error: BaseException, run: Run, json_path: str | None) -> NoReturn:
    """Leave with the exit code that says what went wrong; one line, never a traceback."""
    from batchfit import DistributedProbeError, DoesNotFitError, TrialError

    if isinstance(error, KeyboardInterrupt):
        # The trials already run are what the user paid for: show them, and mark the JSON.
        if run.quiet:  # otherwise each trial was printed as it finished
            for trial in run.trials:
                click.echo(_trial_line(trial), err=True)
        trials = [t.to_dict() for t in run.trials]
        _emit_json({"model": run.spec.description, "interrupted": True, "trials": trials}, json_path)
        click.echo(f"interrupted after {len(trials)} trials", err=True)
        sys.exit(EXIT_INTERRUPTED)
    if isinstance(error, DistributedProbeError):
        kinds = error.kinds
        code = EXIT_MODEL_ERROR if "model" in kinds else EXIT_BAD_INPUT if "input" in kinds else EXIT_DOES_NOT_FIT
    elif isinstance(error, TrialError):
        code = EXIT_MODEL_ERROR
    elif isinstance(error, DoesNotFitError):
        code = EXIT_DOES_NOT_FIT
    elif isinstance(error, ValueError):
        raise click.UsageError(str(error)) from None
    else:
        raise error  # not the user's doing: a bug in batchfit, which must show in full
    click.echo(f"error: {error}", err=True)
    sys.exit(code)


_FAILURES = (KeyboardInterrupt, ValueError, RuntimeError)  # RuntimeError: TrialError, DoesNotFit, ranks


def _probe(opts: dict[str, Any], *, simulate: bool, objective: str = "memory") -> None:
    from batchfit import find_batch_size

    run = Run(opts, simulate=simulate, objective=objective)
    try:
        result = run.call(
            find_batch_size, on_start=run.on_start, on_trial=run.on_trial, on_trial_start=run.on_trial_start
        )
    except _FAILURES as error:
        _fail(error, run, opts["json_path"])
    if not run.main_rank:
        return
    data = {"model": run.spec.description, **result.to_dict()}
    if opts["plot_path"]:
        from batchfit.plot import plot_result

        try:
            plot_result(result, opts["plot_path"], title=run.spec.description)
        except ImportError as error:
            raise click.UsageError(str(error)) from None
    if opts["json_path"] == "-":
        _emit_json(data, "-")
        return
    _emit_json(data, opts["json_path"])
    if run.quiet:
        lr = f", learning rate {result.learning_rate:.6g}" if result.learning_rate is not None else ""
        click.echo(f"recommended batch size {result.recommended_batch_size}{lr}")
    else:
        click.echo(str(result))


def entry() -> None:
    """The `batchfit` command. Under torchrun it leaves through os._exit once its own exit
    handlers (which close the process group it opened) have run: torch's distributed threads
    could still abort interpreter shutdown ("terminate called without an active exception",
    exit -6 instead of 3 on the failing rank, about 1 run in 10 on a loaded 2-core machine)."""
    try:
        main()
    except SystemExit as done:
        if "RANK" not in os.environ:
            raise
        from batchfit.distributed import torchrun_environment

        if not torchrun_environment():
            raise
        if done.code is not None and not isinstance(done.code, int):
            click.echo(done.code, err=True)
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        sys.stdout.flush()
        sys.stderr.flush()
        atexit._run_exitfuncs()
        os._exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="batchfit")
@click.option("--verbose", "-v", is_flag=True, help="Log each step of the search.")
def main(verbose: bool) -> None:
    """Find the largest batch size that trains safely on a GPU, and its learning rate."""
    if verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")


@main.command()
@model_options
@click.option(
    "--objective",
    type=click.Choice(OBJECTIVES),
    default="memory",
    show_default=True,
    help="What the recommendation maximises.",
)
@click.option("--list-models", is_flag=True, help="List the model names and exit.")
def probe(objective: str, list_models: bool, **opts: Any) -> None:
    """Run real training steps on the GPU (simulated without one) and recommend a batch size."""
    if list_models:
        from batchfit.models import list_models as names

        click.echo("\n".join(names()))
        click.echo("timm:NAME (with timm installed), path/to/file.py:factory")
        return
    _probe(opts, simulate=False, objective=objective)


@main.command()
@model_options
def estimate(**opts: Any) -> None:
    """Estimate offline on a simulated card, never touching a GPU (needs --gpu or --memory)."""
    if not opts["gpu"] and not opts["memory"]:
        raise click.UsageError("estimate needs --gpu NAME or --memory SIZE")
    _probe(opts, simulate=True)


@main.command()
@model_options
@click.option("--batch-size", type=click.IntRange(min=1), required=True, help="The batch size to check.")
@click.option(
    "--levers/--no-levers",
    "show_levers",
    default=None,
    help="Price each lever (precision, checkpointing, optimizer, frozen base, LoRA, accumulation, shorter "
    "sequences) on the simulated card. Default: only when the batch does not fit. --plot draws them.",
)
def check(batch_size: int, show_levers: bool | None, **opts: Any) -> None:
    """Pre-flight: exit 0 if BATCH_SIZE trains within the margin, 1 if not, 2 on bad input."""
    from batchfit import DoesNotFitError, preflight

    run = Run(opts, simulate=False)
    if show_levers and opts["mode"] != "train":
        raise click.UsageError("--levers price training: --mode does not apply")
    may_price = show_levers is not False and opts["mode"] == "train"
    # On the simulated card the lever table's first row is the largest batch that fits: found once.
    search = not (may_price and run.device_kind == "simulated")
    try:
        result = run.call(preflight, batch_size, on_start=run.on_start, find_largest=search)
        code = 0
    except DoesNotFitError as error:
        if error.check is None:  # preflight attaches its measurement; anything else is a failure
            _fail(error, run, opts["json_path"])
            return
        result, code = error.check, EXIT_DOES_NOT_FIT
    except _FAILURES as error:
        _fail(error, run, opts["json_path"])
    table = None
    if may_price and (show_levers or opts["plot_path"] or code == EXIT_DOES_NOT_FIT):
        table = _levers(run, batch_size)
        if not search and code == EXIT_DOES_NOT_FIT:
            result = dataclasses.replace(result, largest_fitting=table.levers[0].fits)
    data = {"model": run.spec.description, **result.to_dict()}
    if table is not None:
        data["levers"] = table.to_dict()
    _emit_json(data, opts["json_path"])
    if opts["json_path"] != "-":
        click.echo(str(result), err=code != 0)
        if table is not None:
            click.echo(str(table), err=code != 0)
    if table is not None and opts["plot_path"]:
        from batchfit.plot import plot_levers

        plot_levers(table, opts["plot_path"], title=f"{run.spec.description}, batch {batch_size}")
    sys.exit(code)


def _levers(run: Run, batch_size: int) -> Any:
    """The lever table for the checked batch, or a one-line failure."""
    from batchfit.lever import levers

    run.say("pricing the levers on the simulated card ...")
    try:
        return run.call(levers, batch_size)
    except _FAILURES as error:
        _fail(error, run, None)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the catalog as JSON.")
def gpus(as_json: bool) -> None:
    """The cards behind --gpu, with the memory their drivers report."""
    from batchfit.gpus import GPUS
    from batchfit.memory import format_size

    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "name": g.name,
                        "total_bytes": g.total_bytes,
                        "usable_bytes": g.usable_bytes,
                        "note": g.note,
                    }
                    for g in GPUS.values()
                ],
                indent=2,
            )
        )
        return
    click.echo(f"{'name':<11} {'driver total':>13} {'usable':>11}  note")
    for g in GPUS.values():
        click.echo(f"{g.name:<11} {format_size(g.total_bytes):>13} {format_size(g.usable_bytes):>11}  {g.note}")
    click.echo("usable = total less the CUDA context (~0.8 GiB), what the estimate plans with")


@main.command()
@click.option("--base-lr", type=click.FloatRange(min=0, min_open=True), required=True)
@click.option("--base-batch-size", type=click.IntRange(min=1), required=True)
@click.option("--batch-size", type=click.IntRange(min=1), required=True)
@click.option("--rule", type=click.Choice(LR_RULES), default="auto", show_default=True)
@click.option("--optimizer", help="Optimizer name (sgd, adamw, lamb, …): picks the auto rule.")
@click.option("--noise-scale", type=click.FloatRange(min=0, min_open=True), help="Gradient noise scale φ.")
@click.option(
    "--json",
    "json_path",
    metavar="PATH",
    callback=_output_path(stdout=True),
    help="Write the answer as JSON ('-': stdout).",
)
def lr(
    base_lr: float,
    base_batch_size: int,
    batch_size: int,
    rule: str,
    optimizer: str | None,
    noise_scale: float | None,
    json_path: str | None,
) -> None:
    """Scale a learning rate from one batch size to another, with warmup advice."""
    from batchfit.lr import scale_lr

    try:
        scaled = scale_lr(base_lr, base_batch_size, batch_size, rule=rule, optimizer=optimizer, noise_scale=noise_scale)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    _emit_json(scaled.to_dict(), json_path)
    if json_path != "-":
        click.echo(str(scaled))


if __name__ == "__main__":
    main()

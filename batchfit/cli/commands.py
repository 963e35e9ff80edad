"""The `batchfit` commands: each parses its options, calls the library, prints. Nothing else lives here.

Exit codes, for every command: 0 success (and `check`: the batch fits), 1 it does not fit,
2 bad input (checked before any probing wherever it can be), 3 the user's model or factory
failed (a real bug, not memory), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import logging
import os
import sys
from typing import Any

import click

from batchfit.cli.levers import prepare_table, price_levers
from batchfit.cli.options import model_options, output_path, world_sizes
from batchfit.cli.run import (
    EXIT_DOES_NOT_FIT,
    EXIT_INTERRUPTED,
    FAILURES,
    Run,
    could_not_write,
    emit_json,
    fail,
    plural,
)
from batchfit.config import LR_RULES, OBJECTIVES, PRECISIONS


def _probe(opts: dict[str, Any], *, simulate: bool, objective: str = "memory") -> None:
    from batchfit import find_batch_size

    run = Run(opts, simulate=simulate, objective=objective)
    try:
        result = run.call(
            find_batch_size, on_start=run.on_start, on_trial=run.on_trial, on_trial_start=run.on_trial_start
        )
    except FAILURES as error:
        fail(error, run, opts["json_path"])
    if not run.main_rank:
        return
    data = {"model": run.spec.description, **result.to_dict()}
    if opts["plot_path"]:
        from batchfit.plot import plot_result

        _plot(plot_result, result, opts["plot_path"], run.spec.description)
    if opts["json_path"] == "-":
        emit_json(data, "-")
        return
    emit_json(data, opts["json_path"])
    if run.quiet:
        lr = f", learning rate {result.learning_rate:.6g}" if result.learning_rate is not None else ""
        click.echo(f"recommended batch size {result.recommended_batch_size}{lr}")
    else:
        click.echo(str(result))


def _plot(draw: Any, what: Any, path: str, title: str) -> None:
    """Draw a plot; a file that cannot be written after all is one line (the result is printed)."""
    try:
        draw(what, path, title=title)
    except ImportError as error:
        raise click.UsageError(str(error)) from None
    except OSError as error:
        could_not_write(path, error, "the result is printed")


def _main() -> None:
    """The command line as click runs it, except that Ctrl-C at any moment (imports, the model's
    build) is exit 130 with one line: click's own 'Aborted!' and exit 1 reads as 'does not fit'."""
    try:
        code = main.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


def entry() -> None:
    """The `batchfit` command. It leaves through os._exit once its own exit handlers (which close
    the process group it opened) have run in two cases. Under torchrun: torch's distributed
    threads could still abort interpreter shutdown ("terminate called without an active
    exception", exit -6 instead of 3 on the failing rank, about 1 run in 10 on a loaded 2-core
    machine). After Ctrl-C: a KeyboardInterrupt that passed through code made by exec (a
    dataclass as a module imports) leaves CPython set to kill itself with SIGINT once shut down,
    so exit 130 became -2 (2 runs in 8 at 1.4 s, strace: kill(self, SIGINT) after exit 130)."""
    try:
        _main()
    except SystemExit as done:
        if done.code != EXIT_INTERRUPTED and not _under_torchrun():
            raise
        if done.code is not None and not isinstance(done.code, int):
            click.echo(done.code, err=True)
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        sys.stdout.flush()
        sys.stderr.flush()
        atexit._run_exitfuncs()
        os._exit(code)


def _under_torchrun() -> bool:
    if "RANK" not in os.environ:
        return False
    from batchfit.distributed import torchrun_environment

    return torchrun_environment()


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
@click.option(
    "--fsdp",
    "world_sizes",
    callback=world_sizes,
    metavar="N[,N...]",
    help="Shard with FSDP2 (fully_shard on each repeated block and the root) over N GPUs: one answer per N.",
)
@click.option(
    "--fsdp-param-dtype",
    type=click.Choice(PRECISIONS),
    default="fp32",
    show_default=True,
    help="FSDP's MixedPrecisionPolicy: the dtype parameters are gathered and computed in (reduce in fp32).",
)
def estimate(world_sizes: tuple[int, ...] | None, fsdp_param_dtype: str, **opts: Any) -> None:
    """Estimate offline on a simulated card, never touching a GPU (needs --gpu or --memory)."""
    if not opts["gpu"] and not opts["memory"]:
        raise click.UsageError("estimate needs --gpu NAME or --memory SIZE")
    if world_sizes:
        _sharded(opts, world_sizes, fsdp_param_dtype)
        return
    if fsdp_param_dtype != "fp32":
        raise click.UsageError("--fsdp-param-dtype applies with --fsdp N")
    _probe(opts, simulate=True)


def _sharded(opts: dict[str, Any], world_sizes: tuple[int, ...], param_dtype: str) -> None:
    """The per-GPU batch of an FSDP2 run for each world size, estimated in this one process."""
    from batchfit.sharded import estimate_sharded, mixed_precision

    if opts["plot_path"]:
        raise click.UsageError("--plot does not apply with --fsdp (one answer per world size)")
    run = Run(opts, simulate=True, sharded=True)
    try:
        estimate = run.call(
            estimate_sharded,
            world_sizes,
            mp_policy=mixed_precision(param_dtype),
            checkpointing=opts["checkpointing"],
            on_start=run.on_start,
            on_trial=run.on_trial,
        )
    except FAILURES as error:
        fail(error, run, opts["json_path"])
    data = {"model": run.spec.description, **estimate.to_dict()}
    emit_json(data, opts["json_path"])
    if opts["json_path"] == "-":
        return
    if run.quiet:
        for world, result in estimate.results.items():
            click.echo(
                f"world {world}: per-GPU batch {result.recommended_batch_size}, global {result.global_batch_size}"
            )
    else:
        click.echo(str(estimate))


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
@click.option(
    "--fsdp",
    "world_sizes",
    callback=world_sizes,
    metavar="N[,N...]",
    help="Also price FSDP2 over N GPUs (alone and with checkpointing) in the lever table: the batch per GPU.",
)
def check(batch_size: int, show_levers: bool | None, world_sizes: tuple[int, ...] | None, **opts: Any) -> None:
    """Pre-flight: exit 0 if BATCH_SIZE trains within the margin, 1 if not, 2 on bad input."""
    from batchfit import DoesNotFitError, preflight
    from batchfit.probe import BY_THE_LINE

    run = Run(opts, simulate=False)
    if show_levers and opts["mode"] != "train":
        raise click.UsageError("--levers price training: --mode does not apply")
    if world_sizes and show_levers is False:
        raise click.UsageError("--fsdp prices lever rows: it does not apply with --no-levers")
    may_price = show_levers is not False and opts["mode"] == "train"
    # On the simulated card the lever table's first row is the largest batch that fits: found once.
    search = not (may_price and run.device_kind == "simulated")
    # The table's helper process (a second core) is forked before the check runs a backward pass here.
    ahead = prepare_table(run, batch_size) if may_price and run.device_kind != "cuda" else None
    with ahead.on_two_cores(start=bool(show_levers or opts["plot_path"])) if ahead else contextlib.nullcontext():
        try:
            result = run.call(preflight, batch_size, on_start=run.on_start, find_largest=search)
            code = 0
        except DoesNotFitError as error:
            if error.check is None:  # preflight attaches its measurement; anything else is a failure
                fail(error, run, opts["json_path"])
                return
            result, code = error.check, EXIT_DOES_NOT_FIT
        except FAILURES as error:
            fail(error, run, opts["json_path"])
        table, interrupted = None, False
        if may_price and (show_levers or opts["plot_path"] or code == EXIT_DOES_NOT_FIT):
            table, interrupted = price_levers(run, batch_size, result, world_sizes or (), ahead)
            if not search and code == EXIT_DOES_NOT_FIT and table.levers:
                asked = table.levers[0]
                result = dataclasses.replace(result, largest_fitting=asked.fits)
                if result.peak_reserved_bytes is None and asked.predicted_peak:
                    result = dataclasses.replace(result, needed_bytes=asked.predicted_peak, needed_basis=BY_THE_LINE)
    data = {"model": run.spec.description, **result.to_dict()}
    if table is not None:
        data["levers"] = table.to_dict()
    if interrupted:
        data["interrupted"] = True
    emit_json(data, opts["json_path"])
    if opts["json_path"] != "-":
        click.echo(str(result), err=code != 0)
        if table is not None:
            click.echo(str(table), err=code != 0)
    if table is not None and opts["plot_path"]:
        from batchfit.plot import plot_levers

        _plot(plot_levers, table, opts["plot_path"], f"{run.spec.description}, batch {batch_size}")
    if interrupted and table is not None:
        click.echo(f"interrupted while pricing the levers: {plural(len(table.levers), 'row')} priced", err=True)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(code)


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
    callback=output_path(stdout=True),
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
    emit_json(scaled.to_dict(), json_path)
    if json_path != "-":
        click.echo(str(scaled))


if __name__ == "__main__":
    main()

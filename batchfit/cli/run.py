"""One command's run: the ProbeConfig and model built from its options, progress lines, and the
exit that says what went wrong (one line, never a traceback)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import click

EXIT_DOES_NOT_FIT = 1
EXIT_BAD_INPUT = 2
EXIT_MODEL_ERROR = 3
EXIT_INTERRUPTED = 130  # the shell's convention: 128 + SIGINT


class Run:
    """The pieces every command needs, built from the shared options: one ProbeConfig, a model."""

    def __init__(self, opts: dict[str, Any], *, simulate: bool, sharded: bool = False, **extra: Any) -> None:
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
                steps_per_trial=opts["steps_per_trial"],
                rounding=opts["rounding"],
                mode=opts["mode"],
                compile=opts["compile_model"],
                target_global_batch=opts["target_global_batch"],
                **({"rendezvous_timeout_s": opts["rendezvous_timeout"]} if opts["rendezvous_timeout"] else {}),
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
                # A sharded estimate checkpoints each world size's copy itself, before sharding.
                checkpointing=opts["checkpointing"] and not sharded,
                lora=opts["lora"],
            )
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="--model") from None
        except UserCodeError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(EXIT_MODEL_ERROR)
        self.trials: list[Any] = []
        self.passes = 0

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
        self.passes += 1
        # --mode both probes twice: the second pass says it is the evaluation, not a repeat.
        what = {(1, "both"): "training: ", (2, "both"): "evaluation (forward only, inference mode): "}
        label = what.get((self.passes, self.config.mode), "")
        self.say(f"{label}probing {self.spec.description} on {device.description}")
        if device.caveat and self.passes == 1:
            self.say(device.caveat)

    def say(self, text: str) -> None:
        if not self.quiet:
            click.echo(text, err=True)

    def on_trial_start(self, batch_size: int) -> None:
        if self.live:
            click.echo(f"  batch {batch_size:>6}: running…", err=True, nl=False)

    def on_trial(self, trial: Any) -> None:
        self.trials.append(trial)
        line = trial_line(trial)
        # On a terminal the "running…" line is overwritten in place; in a log each trial is one line.
        self.say(f"\r{line:<60}" if self.live else line)


def trial_line(trial: Any) -> str:
    from batchfit.memory import format_size

    if not trial.ok:
        return f"  batch {trial.batch_size:>6}: out of memory"
    timing = f", {trial.seconds_per_step:.3f} s/step" if trial.seconds_per_step else ""
    return f"  batch {trial.batch_size:>6}: fitted, peak {format_size(trial.peak_reserved)}{timing}"


def emit_json(data: dict[str, Any], path: str | None) -> None:
    """Write `data` to `path` ('-': stdout); if the file cannot be written after all, the result
    goes to stdout with one line saying so, never lost to a traceback."""
    if not path:
        return
    text = json.dumps(data, indent=2, default=str)
    if path == "-":
        click.echo(text)
        return
    try:
        with open(path, "w") as handle:
            handle.write(text + "\n")
    except OSError as error:
        click.echo(text)
        could_not_write(path, error, "the JSON is on stdout above")


def could_not_write(path: str, error: OSError, instead: str) -> None:
    click.echo(f"error: could not write {path!r} ({error.strerror or error}); {instead}", err=True)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def fail(error: BaseException, run: Run, json_path: str | None) -> NoReturn:
    """Leave with the exit code that says what went wrong; one line, never a traceback."""
    from batchfit import DistributedProbeError, DoesNotFitError, TrialError
    from batchfit.rendezvous import RendezvousTimeout

    if isinstance(error, KeyboardInterrupt):
        # The trials already run are what the user paid for: show them, and mark the JSON.
        if run.quiet:  # otherwise each trial was printed as it finished
            for trial in run.trials:
                click.echo(trial_line(trial), err=True)
        trials = [t.to_dict() for t in run.trials]
        emit_json({"model": run.spec.description, "interrupted": True, "trials": trials}, json_path)
        click.echo(f"interrupted after {plural(len(trials), 'trial')}", err=True)
        sys.exit(EXIT_INTERRUPTED)
    if isinstance(error, DistributedProbeError):
        kinds = error.kinds
        code = EXIT_MODEL_ERROR if "model" in kinds else EXIT_BAD_INPUT if "input" in kinds else EXIT_DOES_NOT_FIT
    elif isinstance(error, RendezvousTimeout):
        code = EXIT_BAD_INPUT  # the environment's variables name ranks that are not there
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


FAILURES = (KeyboardInterrupt, ValueError, RuntimeError)  # RuntimeError: TrialError, DoesNotFit, ranks

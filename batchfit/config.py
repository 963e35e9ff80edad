"""Options of a probe, validated once so that bad input fails before any trial runs."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, get_args

from batchfit.gpus import Gpu, find_gpu
from batchfit.memory import parse_size

# The closed choices, defined once: ProbeConfig validates against them and the CLI builds its
# click.Choice options from them.
Precision = Literal["fp32", "bf16", "fp16"]
Rounding = Literal["pow2", "mult8", "none"]
LrRule = Literal["auto", "linear", "sqrt", "noise"]
Objective = Literal["memory", "throughput", "goodput"]
Mode = Literal["train", "eval", "both"]
OptimizerName = Literal["sgd", "adamw", "adam"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
ROUNDINGS: tuple[str, ...] = get_args(Rounding)
LR_RULES: tuple[str, ...] = get_args(LrRule)
OBJECTIVES: tuple[str, ...] = get_args(Objective)
MODES: tuple[str, ...] = get_args(Mode)
OPTIMIZER_NAMES: tuple[str, ...] = get_args(OptimizerName)
# Where trials run: 'cuda' / 'cuda:N' a real GPU, 'simulated' the offline estimate (fake tensors),
# 'cpu' the simulated device with real CPU arithmetic (real step times).
DEVICE_NAMES = ("cuda", "cuda:N", "simulated", "cpu")
_DEVICE_RE = re.compile(r"^(cuda(:\d+)?|simulated|cpu)$")


RENDEZVOUS_ENV = "BATCHFIT_RENDEZVOUS_TIMEOUT"
RENDEZVOUS_TIMEOUT_S = 300.0


def rendezvous_default() -> float:
    """How long to wait for torchrun's other ranks: BATCHFIT_RENDEZVOUS_TIMEOUT (seconds), else 5 minutes."""
    value = os.environ.get(RENDEZVOUS_ENV)
    if value is None:
        return RENDEZVOUS_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise ValueError(f"{RENDEZVOUS_ENV}={value!r} must be a positive number of seconds")
    return seconds


# Options that describe training, not inference: an evaluation probe has none of them, and mode='both'
# drops them for its evaluation half (ProbeConfig.for_evaluation). `objective` too, beyond 'memory'.
TRAINING_ONLY = ("base_lr", "base_batch_size", "noise_scale", "target_global_batch")


def check_device_name(name: str) -> str:
    """`name` if it names a device batchfit can run on, else a ValueError listing them."""
    if not isinstance(name, str) or not _DEVICE_RE.match(name):
        raise ValueError(f"device={name!r} is not one of {', '.join(DEVICE_NAMES)} (or a batchfit Device)")
    return name


def check_positive_int(label: str, value: object, least: int = 1, why: str = "") -> None:
    """A ValueError unless `value` is an int of at least `least` (a bool is not one): every count
    option and argument (batch sizes, trials, items, steps) is checked here."""
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        kind = "a positive integer" if least == 1 else f"an integer >= {least}"
        raise ValueError(f"{label}={value!r} must be {kind}{why}")


def check_positive_number(label: str, value: object) -> None:
    """A ValueError unless `value` is a finite number above zero (a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{label}={value!r} must be a positive number")


def _one_of(choices: tuple[str, ...]) -> Callable[[str, Any], None]:
    def check(label: str, value: object) -> None:
        if value not in choices:
            raise ValueError(f"{label}={value!r} is not one of {', '.join(choices)}")

    return check


def _check_margin(label: str, value: object) -> None:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 <= value < 1):
        raise ValueError(f"{label}={value!r} must be in [0, 1), e.g. 0.2 for 20%")


def _check_flag(label: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{label}={value!r} must be True or False")


def _ignore(_: object) -> None:
    return None


# Each option's rule, checked in this order; an option whose default is None may be None.
_RULES: dict[str, Callable[[str, Any], None]] = {
    "margin": _check_margin,
    "steps_per_trial": check_positive_int,
    "max_batch_size": check_positive_int,
    "rounding": _one_of(ROUNDINGS),
    "exact": _check_flag,
    "precision": _one_of(PRECISIONS),
    "memory": lambda _, value: _ignore(parse_size(value)),  # its own message: what sizes look like
    "gpu": lambda _, value: _ignore(find_gpu(value)),  # its own message: the cards it knows
    "base_lr": check_positive_number,
    "base_batch_size": check_positive_int,
    "lr_rule": _one_of(LR_RULES),
    "noise_scale": check_positive_number,
    "objective": _one_of(OBJECTIVES),
    "target_global_batch": check_positive_int,
    "dist_timeout_s": check_positive_number,
    "rendezvous_timeout_s": check_positive_number,
    "max_trials": check_positive_int,
    "scan_items": check_positive_int,
    "mode": _one_of(MODES),
    "compile": _check_flag,
}


@dataclass(frozen=True, kw_only=True)
class ProbeConfig:
    """How a probe searches and what it recommends."""

    margin: float = 0.2
    """Fraction of usable memory kept free: the recommendation's peak stays under (1 - margin)."""
    steps_per_trial: int = 2
    """Training steps per trial. The first step makes the optimizer state, so the second peaks as
    training does. 1: the state is made before the one step (`trial.prime`), half the work a
    trial; its peak reserved differs from two steps' by a few percent on the simulated device
    (docs/design.md), so it is not the default until a real card shows which is closer to
    training (scripts/gpu_check.py prints both). A timing objective always runs two."""
    max_batch_size: int | None = None
    """Never try or recommend a batch larger than this (e.g. the dataset size)."""
    rounding: Rounding = "pow2"
    """How the recommendation is rounded down: 'pow2', 'mult8' or 'none'."""
    exact: bool = False
    """Also bisect to the exact largest batch that runs (more trials, some of them OOM)."""
    precision: Precision | None = None
    """None/'fp32', 'bf16' or 'fp16': mixed precision through torch.autocast."""
    memory: int | str | None = None
    """Capacity to plan for, e.g. '24GiB': caps the CUDA allocator, or sizes the simulated device."""
    gpu: str | None = None
    """A card to plan for by name (batchfit gpus): its usable memory, and on the simulated device
    its cuBLAS workspaces and CUDA context."""
    base_lr: float | None = None
    """Learning rate that worked at `base_batch_size`; scaled to the recommendation."""
    base_batch_size: int | None = None
    """Batch size `base_lr` belongs to."""
    lr_rule: LrRule = "auto"
    """'linear', 'sqrt', 'noise' or 'auto' (by optimizer family)."""
    noise_scale: float | None = None
    """Gradient noise scale B_simple, if known: enables the noise-aware rule and goodput."""
    objective: Objective = "memory"
    """What the recommendation maximises: 'memory' (largest safe), 'throughput', 'goodput'."""
    target_global_batch: int | None = None
    """Global batch to reach (per-device × ranks × accumulation); sets the accumulation steps."""
    dist_timeout_s: float = 1800.0
    """Under torch.distributed: how long ranks wait for each other to report (bounds a crashed rank)."""
    rendezvous_timeout_s: float = field(default_factory=rendezvous_default)
    """Under torchrun's variables: how long to wait for the other ranks to join (5 minutes, or
    BATCHFIT_RENDEZVOUS_TIMEOUT); stale variables with no other rank end there, exit 2."""
    max_trials: int = 40
    """Hard stop for the search, so a pathological memory curve cannot loop for long."""
    scan_items: int = 1000
    """When `sample` is data (a dataset or a list of examples): how many items to look at for the
    largest, which the probe then runs with."""
    mode: Mode = "train"
    """'train' (forward, backward, optimizer step), 'eval' (forward only, model.eval(), under
    torch.inference_mode()) or 'both' (the two sizes in one call)."""
    compile: bool = False
    """Measure the model under torch.compile (batch dimension dynamic); the model object stays
    uncompiled. On CUDA with inductor; on the simulated device with AOTAutograd's graph and
    inductor's partitioner but eager kernels (docs/design.md)."""

    def __post_init__(self) -> None:
        for name, check in _RULES.items():
            value = getattr(self, name)
            if value is not None or _FIELDS[name].default is not None:
                check(name, value)
        if self.memory is not None and self.gpu is not None:
            raise ValueError(f"give memory= or gpu=, not both (memory={self.memory!r}, gpu={self.gpu!r})")
        if self.mode == "eval":
            given = [name for name in TRAINING_ONLY if getattr(self, name) is not None]
            if given or self.objective != "memory":
                named = ", ".join(given + (["objective"] if self.objective != "memory" else []))
                raise ValueError(f"mode='eval' sizes inference: {named} apply to training only (use mode='both')")
        if self.objective == "goodput" and self.noise_scale is None:
            raise ValueError("objective='goodput' needs noise_scale (the gradient noise scale)")

    @classmethod
    def from_options(cls, config: ProbeConfig | None, options: dict[str, Any]) -> ProbeConfig:
        """One ProbeConfig from `config=` or from keyword options, never both (nothing dropped silently)."""
        if config is None:
            return cls(**options)
        if options:
            raise TypeError(f"pass options inside config= or as keywords, not both (got config= and {sorted(options)})")
        if not isinstance(config, cls):
            raise TypeError(f"config= must be a batchfit.ProbeConfig, got {type(config).__name__}")
        return config

    def for_evaluation(self) -> ProbeConfig:
        """These options for sizing evaluation: mode='eval', without the training-only ones."""
        cleared: dict[str, Any] = dict.fromkeys(TRAINING_ONLY)
        return replace(self, mode="eval", objective="memory", **cleared)

    @property
    def card(self) -> Gpu | None:
        return None if self.gpu is None else find_gpu(self.gpu)

    @property
    def capacity_bytes(self) -> int | None:
        """Bytes to plan for: `memory`, or the named card's usable memory, or None (the device's own)."""
        if self.memory is not None:
            return parse_size(self.memory)
        return self.card.usable_bytes if self.card else None

    @property
    def amp_dtype(self) -> object:
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision or "")


_FIELDS = {f.name: f for f in fields(ProbeConfig)}
assert _FIELDS.keys() == _RULES.keys(), "every option has a rule"

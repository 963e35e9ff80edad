"""Many GPUs: each rank probes its own device and the ranks agree on one per-device batch.

Uses torch.distributed as the user already runs it (torchrun's environment or an initialised
process group). The smallest card decides (MIN), and a rank that fails makes every rank fail:
each rank always joins the agreement, carrying its error if it has one, on a gloo group with
its own timeout, so no rank waits forever on a rank that crashed.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from batchfit import rendezvous
from batchfit.config import RENDEZVOUS_TIMEOUT_S
from batchfit.device import cuda_available, cuda_count, select_cuda

if TYPE_CHECKING:
    from torch import nn

    from batchfit.config import ProbeConfig
    from batchfit.result import Trial

log = logging.getLogger(__name__)


class DistributedProbeError(RuntimeError):
    """At least one rank's probe failed; every rank raises this.

    `kinds` holds each failed rank's kind of failure: 'model' (the user's model raised),
    'does_not_fit', 'input' (a bad option) or 'other' (a crash, a timeout).
    """

    def __init__(self, message: str, kinds: frozenset[str] = frozenset({"other"})) -> None:
        super().__init__(message)
        self.kinds = kinds


@dataclass(frozen=True)
class RankReport:
    """What one rank found on its own device."""

    rank: int
    recommended: int | None
    device: str
    capacity_bytes: int
    error: str | None = None
    error_kind: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def failure_kind(error: Exception) -> str:
    """How a rank failed, so that every rank can exit as one process would."""
    from batchfit.result import DoesNotFitError
    from batchfit.trial import TrialError

    if isinstance(error, TrialError):
        return "model"
    if isinstance(error, DoesNotFitError):
        return "does_not_fit"
    return "input" if isinstance(error, (ValueError, TypeError)) else "other"


def torchrun_environment() -> bool:
    """True when launched by torchrun (or anything that sets its variables) with several ranks."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(timeout_s: float, rendezvous_s: float = RENDEZVOUS_TIMEOUT_S) -> Any:
    """The gloo group the ranks agree on, or None in a single process.

    Initialises the default process group from torchrun's environment when nobody has yet
    (NCCL with CUDA, gloo without), and pins this rank to cuda:LOCAL_RANK.
    """
    if not dist.is_available():
        return None
    if not dist.is_initialized():
        if not torchrun_environment():
            return None
        timeout = datetime.timedelta(seconds=timeout_s)
        backend = "nccl" if cuda_available() else "gloo"
        rendezvous.init_default_group(backend, timeout, rendezvous_s)  # bounded, and Ctrl-C ends it
        # Ours, so ours to close: a process group still open when the interpreter shuts down can
        # abort it ("terminate called without an active exception", exit -6 instead of ours).
        atexit.register(_close_default_group)
        log.info("initialised %s process group, rank %d of %d", backend, dist.get_rank(), dist.get_world_size())
    if dist.get_world_size() < 2:
        return None
    if dist.get_backend() == "fake":  # one process standing for N ranks (an offline estimate): no peers
        return None
    if cuda_available():
        select_cuda(int(os.environ.get("LOCAL_RANK", dist.get_rank() % cuda_count())))
    # A CPU-side group with our own timeout: agreement must not hang on NCCL's or a dead rank.
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


def _close_default_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank(group: Any) -> int:
    return dist.get_rank(group)


def agree(group: Any, report: RankReport) -> list[RankReport]:
    """Gather every rank's report; raise DistributedProbeError on every rank if any failed."""
    reports: list[Any] = [None] * dist.get_world_size(group)
    try:
        dist.all_gather_object(reports, report, group=group)
    except RuntimeError as error:  # a rank died or hung past the timeout
        raise DistributedProbeError(
            f"rank {report.rank}: the other ranks did not all report ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); a rank crashed or timed out"
        ) from error
    finally:
        dist.destroy_process_group(group)  # the agreement group is ours; the default one is the user's
    failed = [r for r in reports if r.error]
    if failed:
        detail = "; ".join(f"rank {r.rank}: {r.error}" for r in failed)
        raise DistributedProbeError(
            f"the probe failed on {len(failed)} of {len(reports)} ranks: {detail}",
            frozenset(r.error_kind or "other" for r in failed),
        )
    return reports


def lockstep(group: Any, run: Callable[[int], Trial], timeout_s: float) -> Callable[[int], Trial]:
    """`run(B)` on every rank at once, for a sharded model whose collectives pair up across ranks.

    After each trial the ranks exchange what they measured: the trial fits only where it fits on
    every rank, with the largest peak, and any error raises on every rank. Every rank then holds
    the same trials and the pure search picks the same next size everywhere.
    """

    def together(batch_size: int) -> Trial:
        me = dist.get_rank(group)
        failure: Exception | None = None
        try:
            local: Trial | None = run(batch_size)
            report: tuple[int, Trial | None, str | None, str | None] = (me, local, None, None)
        except Exception as error:  # every rank must join the exchange, failed or not
            failure, local = error, None
            report = (me, None, f"{type(error).__name__}: {error}", failure_kind(error))
        reports: list[Any] = [None] * dist.get_world_size(group)
        try:
            dist.all_gather_object(reports, report, group=group)
        except RuntimeError as error:
            raise DistributedProbeError(
                f"rank {me}: the ranks did not all finish the trial at batch_size={batch_size} within "
                f"{timeout_s:g} s ({type(error).__name__}); a rank crashed or hung"
            ) from failure or error
        failed = [r for r in reports if r[2]]
        if failed:
            ran_out = [r[0] for r in reports if r[1] is not None and not r[1].ok]
            why = f" (rank {', '.join(map(str, ran_out))} ran out of memory and left the step)" if ran_out else ""
            detail = "; ".join(f"rank {r[0]}: {r[2]}" for r in failed)
            # The ranks left waiting by one that ran out of memory fail by timeout: not a model bug.
            kinds = frozenset({"other"}) if ran_out else frozenset(r[3] or "other" for r in failed)
            raise DistributedProbeError(
                f"the trial at batch_size={batch_size} failed on {len(failed)} of {len(reports)} ranks{why}: {detail}",
                kinds,
            ) from failure
        trials = [r[1] for r in reports]
        if not all(t.ok for t in trials):
            return next(t for t in trials if not t.ok)
        worst = max(trials, key=lambda t: t.peak_reserved)
        return replace(
            worst,
            peak_allocated=max(t.peak_allocated for t in trials),
            largest_alloc=max(t.largest_alloc for t in trials),
            seconds_per_step=max((t.seconds_per_step for t in trials if t.seconds_per_step), default=None),
        )

    return together


def smallest_capacity(group: Any, capacity: int) -> int:
    """The smallest of the ranks' capacities (every rank learns it)."""
    capacities: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(capacities, capacity, group=group)
    return min(capacities)


def close(group: Any) -> None:
    """Destroy a group batchfit made (never the user's default group)."""
    dist.destroy_process_group(group)


def probe_group(timeout_s: float) -> Any:
    """A group over every rank for a sharded model's collectives during trials, with its own timeout."""
    return dist.new_group(backend=dist.get_backend(), timeout=datetime.timedelta(seconds=timeout_s))


def refuse_unsupported(model: nn.Module | None, config: ProbeConfig) -> None:
    """One line (ValueError) for the sharded setups batchfit does not handle yet."""
    if config.compile:
        raise ValueError("compile=True with FSDP2 (fully_shard) is not supported yet: probe without compile")
    if model is None:
        return
    fsdp1 = sys.modules.get("torch.distributed.fsdp.fully_sharded_data_parallel")
    if fsdp1 is not None and any(isinstance(m, fsdp1.FullyShardedDataParallel) for m in model.modules()):
        raise ValueError(
            "FullyShardedDataParallel (FSDP1) is not supported: batchfit sizes FSDP2 models "
            "(torch.distributed.fsdp.fully_shard)"
        )
    meshes = [mesh for p in model.parameters() if (mesh := getattr(p, "device_mesh", None)) is not None]
    if any(mesh.ndim > 1 for mesh in meshes):
        raise ValueError(
            "a 2-D device mesh (HSDP, or FSDP with tensor parallelism) is not supported yet: batchfit "
            "sizes FSDP2 over a 1-D mesh"
        )

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
from dataclasses import asdict, dataclass
from typing import Any

import torch.distributed as dist

from batchfit.device import cuda_available, cuda_count, select_cuda

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


def setup(timeout_s: float) -> Any:
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
        dist.init_process_group(backend=backend, timeout=timeout)
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

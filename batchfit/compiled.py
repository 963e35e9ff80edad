"""Compiled models: the trial's step under torch.compile, how often it compiled, and its failures.

The user's model is never compiled: the probe compiles its own step function, which calls the
model functionally, once per probe. The batch dimension is marked dynamic, so a new trial size
does not recompile (dynamo specialises sizes 0 and 1, so a probe that starts at 1 recompiles
once, at 2). A probe that asked for compile never answers from eager code without saying so:
if dynamo compiled nothing, that is a CompileError.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_flatten


class CompileError(ValueError):
    """torch.compile could not compile the step: said in one line instead of an eager answer."""


@dataclass
class CompileCount:
    """What dynamo compiled while a trial ran (its counters are process-wide, so a difference)."""

    compilations: int = 0
    """Frames dynamo compiled: the first trial's are the compile, later ones are recompiles."""
    graph_breaks: int = 0
    first_break: str | None = None


def _counters() -> tuple[int, dict[str, int]]:
    from torch._dynamo.utils import counters

    return counters["frames"]["ok"], dict(counters["graph_break"])


@contextlib.contextmanager
def counting() -> Iterator[CompileCount]:
    """Count what dynamo compiles inside the block."""
    frames, breaks = _counters()
    count = CompileCount()
    try:
        yield count
    finally:
        frames_after, breaks_after = _counters()
        count.compilations = frames_after - frames
        new = {k: v - breaks.get(k, 0) for k, v in breaks_after.items() if v > breaks.get(k, 0)}
        count.graph_breaks = sum(new.values())
        count.first_break = next(iter(new), None)


def compile_step(fn: Callable[..., Any], backend: str) -> Callable[..., Any]:
    """`fn` compiled by dynamo with `backend`; sizes turn dynamic where they change."""
    return torch.compile(fn, backend=backend, dynamic=None)


def mark_batch_dynamic(batch: Any) -> None:
    """Mark dimension 0 of every tensor in the batch dynamic, so new batch sizes reuse the graph."""
    for leaf in tree_flatten(batch)[0]:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            torch._dynamo.maybe_mark_dynamic(leaf, 0)


def compile_failure(error: BaseException) -> CompileError | None:
    """A CompileError when `error` comes from torch.compile, else None.

    Dynamo raises its own exceptions for what it cannot trace or compile, including an
    operator it cannot run on fake tensors; a model bug met while tracing looks the same
    (TorchRuntimeError), so the message says to run without compile, where a bug shows as one.
    """
    from torch._dynamo import exc

    if not isinstance(error, (exc.TorchDynamoException, exc.FailOnRecompileLimitHit)):
        return None
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return CompileError(
        f"torch.compile could not compile the model ({type(error).__name__}: {'; '.join(lines[:2])[:300]}); "
        "run without compile"
    )


def reset() -> None:
    """Drop dynamo's caches after a compiled probe, so nothing compiled for it lingers.

    Dynamo's caches are process-wide: compiled functions of the caller's own recompile on
    their next call.
    """
    torch._dynamo.reset()

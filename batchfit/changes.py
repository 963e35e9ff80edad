"""What a lever does to a model, with its undo: checkpointing, a frozen base, LoRA, shorter text.

Each change applies in place and returns how to undo it (a ValueError: it cannot apply), so a
lever's trials run on the user's own model and leave it exactly as it was.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from batchfit.optional import optional


def repeated_blocks(model: nn.Module) -> list[str]:
    """Names of the blocks of the outermost containers that repeat one block type
    (torchvision's `layerN`, a `ModuleList` of transformer layers): what checkpointing wraps."""
    found: list[str] = []

    def visit(module: nn.Module, path: str) -> None:
        kids = list(module.named_children())
        container = isinstance(module, (nn.Sequential, nn.ModuleList)) and len(kids) >= 2
        if container and len({type(k) for _, k in kids}) == 1 and any(True for _ in kids[0][1].parameters()):
            found.extend(f"{path}{name}" for name, _ in kids)
            return
        for name, child in kids:
            visit(child, f"{path}{name}.")

    visit(model, "")
    return found


def _checkpointed_forward(block: nn.Module, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`block`'s forward under non-reentrant checkpointing.

    The recompute runs in backward, after the trial's functional_call has put the module's own
    tensors back; on the simulated device those are not the stand-ins the trial trains. So the
    tensors in place now are captured and put in place again for the recompute.
    """
    from torch.nn.utils.stateless import _reparametrize_module
    from torch.overrides import _get_current_function_mode_stack
    from torch.utils.checkpoint import checkpoint

    tensors = {**dict(block.named_parameters()), **dict(block.named_buffers())}
    # Torch function modes active now (the simulated device's kernel routing) are not active
    # where autograd recomputes; without them attention took another kernel on recompute.
    modes = _get_current_function_mode_stack()

    def run(*inner: Any, **inner_kwargs: Any) -> Any:
        with contextlib.ExitStack() as stack:
            active = {id(mode) for mode in _get_current_function_mode_stack()}
            for mode in modes:
                if id(mode) not in active:
                    stack.enter_context(mode)
            stack.enter_context(_reparametrize_module(block, tensors))
            return forward(*inner, **inner_kwargs)

    return checkpoint(run, *args, use_reentrant=False, **kwargs)


def enable_checkpointing(model: nn.Module) -> tuple[str, Callable[[], None]]:
    """Checkpoint each repeated block of `model`: what was wrapped, and how to undo it.

    A block's forward is replaced on the instance (parameter names unchanged). Hugging Face
    models are done the same way, on the same per-layer blocks their own switch checkpoints
    (docs/design.md says why not through it). Raises ValueError when no block repeats.
    """
    names = repeated_blocks(model)
    if not names:
        raise ValueError("no repeated blocks (a Sequential or ModuleList of one block type) to checkpoint")
    blocks = [model.get_submodule(n) for n in names]
    for block in blocks:
        block.forward = functools.partial(_checkpointed_forward, block, block.forward)  # type: ignore[method-assign]
    # A key/value cache is written in forward, and again on recompute; transformers turns it off
    # under its own checkpointing, and so does this (an OOM inside a block also left it alive).
    config = getattr(model, "config", None)
    cached = getattr(config, "use_cache", None)
    if cached:
        config.use_cache = False  # type: ignore[union-attr]

    def undo() -> None:
        for block in blocks:
            del block.forward
        if cached:
            config.use_cache = cached  # type: ignore[union-attr]

    return f"{len(names)} blocks: {_span(names)}", undo


Change = Callable[[nn.Module], tuple[str, Callable[[], None]]]
"""A lever applied to a model in place: what it did, and how to undo it (ValueError: cannot apply)."""


@contextlib.contextmanager
def applied(model: nn.Module, change: Change) -> Iterator[str]:
    """`change` applied to `model` while inside; yields what it did."""
    detail, undo = change(model)
    try:
        yield detail
    finally:
        undo()


def checkpointing(model: nn.Module) -> contextlib.AbstractContextManager[str]:
    """Activation checkpointing while inside; yields which blocks."""
    return applied(model, enable_checkpointing)


def frozen_base(model: nn.Module) -> contextlib.AbstractContextManager[str]:
    """Only the head trains while inside: the rest has requires_grad=False (restored after)."""
    return applied(model, freeze_base)


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose weights are on the meta device: its structure without its memory."""
    return structure_copy(model, lambda t: torch.empty_like(t, device="meta"))


def structure_copy(model: nn.Module, empty: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
    """A copy of `model` with each parameter and buffer replaced by `empty(tensor)` (shared once)."""
    memo: dict[int, Any] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in memo:
            made = empty(tensor)
            memo[id(tensor)] = nn.Parameter(made, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else made
    return copy.deepcopy(model, memo)


def with_lora(model: nn.Module, rank: int) -> nn.Module:
    """`model` with LoRA adapters of `rank` on every linear layer (peft): only they train.

    peft changes the model it wraps; pass a copy to keep the original.
    """
    if not hasattr(model, "config"):
        raise ValueError("LoRA through peft applies to Hugging Face models here (target_modules='all-linear')")
    peft = optional("peft", "LoRA")
    # peft reads transformers' deprecated `is_gradient_checkpointing` (a FutureWarning) and warns
    # about GPT-2's Conv1D layers, in the middle of batchfit's output: what the user sees comes
    # from batchfit.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.LoraConfig(r=rank, target_modules="all-linear"))


def _span(names: list[str]) -> str:
    """'layer1.0-2, layer2.0-3' for layer1.0, layer1.1, layer1.2, layer2.0, ..."""
    groups: dict[str, list[str]] = {}
    for name in names:
        parent, dot, last = name.rpartition(".")
        groups.setdefault(parent + dot, []).append(last)
    return ", ".join(f"{p}{v[0]}-{v[-1]}" if len(v) > 1 else f"{p}{v[0]}" for p, v in groups.items())


def head_only(model: nn.Module) -> tuple[str, set[int], int, int]:
    """A hand-frozen base: the last top-level child that has parameters (the head), the ids of
    its parameters (a tied head shares its embedding's), and (trained, total) parameter counts."""
    params = list(model.parameters())
    heads = [(name, child) for name, child in model.named_children() if any(True for _ in child.parameters())]
    if len(heads) < 2:
        raise ValueError("no head to train apart from a base (the model has one top-level part with parameters)")
    name, head = heads[-1]
    trained = {id(p) for p in head.parameters()}
    count = sum(p.numel() for p in params if id(p) in trained)
    return name, trained, count, sum(p.numel() for p in params)


def freeze_base(model: nn.Module) -> tuple[str, Callable[[], None]]:
    """Freeze all but the head (requires_grad=False): what trains, and how to undo it."""
    name, trained, count, total = head_only(model)
    params = list(model.parameters())
    was = [p.requires_grad for p in params]
    for param in params:
        param.requires_grad_(id(param) in trained)

    def undo() -> None:
        for param, flag in zip(params, was, strict=True):
            param.requires_grad_(flag)

    return f"only {name} trains: {count:,} of {total:,} parameters", undo


def shorten(sample: Any, length: int) -> Any:
    """A text sample cut to `length` tokens: every tensor whose first dimension is the sequence."""
    seq = sequence_length(sample)
    return {
        k: v[:length] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == seq else v
        for k, v in sample.items()
    }


def sequence_length(sample: Any) -> int | None:
    """The length of a text sample (a mapping with 1-D `input_ids`), else None."""
    if not isinstance(sample, Mapping):
        return None
    ids = sample.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.shape[0] < 2:
        return None
    return int(ids.shape[0])

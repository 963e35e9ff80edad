"""Every private torch internal that sharded training (FSDP2) needs, named here and nowhere else.

Each one is used through a function of this module, and `check()` fails loudly, naming the
internal, when a torch release moves or renames it (tests/test_internals.py runs it on every
torch version CI installs). Public API (fully_shard, FSDPModule.reset_iter_state, DTensor,
init_device_mesh, the "fake" process-group backend) is used directly elsewhere.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn


def _dtensor_class() -> type | None:
    """DTensor, if torch.distributed.tensor is loaded: no DTensor can exist before it is."""
    module = sys.modules.get("torch.distributed.tensor._api")
    return getattr(module, "DTensor", None) if module is not None else None


def is_dtensor_op(types: Any) -> bool:
    """Whether a dispatch involves a DTensor (a dispatch mode sees it before the subclass does)."""
    dtensor = _dtensor_class()
    return dtensor is not None and any(issubclass(t, dtensor) for t in types)


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor whose storage is this rank's memory: a DTensor's local shard, else `tensor`.

    `DTensor.untyped_storage()` reports the global tensor's size. Internal: `DTensor._local_tensor`
    (not `to_local()`, which adds an autograd node).
    """
    dtensor = _dtensor_class()
    while dtensor is not None and isinstance(tensor, dtensor):
        tensor = tensor._local_tensor  # type: ignore[attr-defined]
    return tensor


@contextlib.contextmanager
def resizes_followed(on_resize: Callable[[torch.UntypedStorage], None]) -> Iterator[None]:
    """Call `on_resize(storage)` after every `UntypedStorage.resize_` while inside.

    FSDP2 frees an unsharded parameter with `storage.resize_(0)` and brings it back with
    `resize_(n)` (`_fsdp_param.free_storage` / `alloc_storage`); no operator reaches a dispatch
    mode. torch's own MemTracker patches the same method (`mem_tracker._track_resize`).
    Process-wide while inside: batchfit runs its trials on one thread.
    """
    original = torch.UntypedStorage.resize_

    @functools.wraps(original)
    def resize_(storage: torch.UntypedStorage, size: int) -> Any:
        out = original(storage, size)
        on_resize(storage)
        return out

    torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.UntypedStorage.resize_ = original  # type: ignore[method-assign]


@contextlib.contextmanager
def propagation_marked(counter: list[int]) -> Iterator[None]:
    """`counter[0]` is above zero while DTensor works out an op's output metadata.

    That pass runs the op on fake tensors of the *global* shape (`ShardingPropagator.
    _propagate_tensor_meta_non_cached`, cached after its first call per op and shapes): no rank
    holds those tensors. GPT-2 seq 256, bf16 policy, world 2: 34 such calls in the first trial
    counted 2.7 GiB where the trial at twice the batch peaked at 1.5. Without DTensor loaded
    there is nothing to mark.
    """
    module = sys.modules.get("torch.distributed.tensor._sharding_prop")
    if module is None:
        yield
        return
    propagator = module.ShardingPropagator
    original = propagator._propagate_tensor_meta_non_cached

    @functools.wraps(original)
    def propagate(self: Any, *args: Any, **kwargs: Any) -> Any:
        counter[0] += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            counter[0] -= 1

    propagator._propagate_tensor_meta_non_cached = propagate
    try:
        yield
    finally:
        propagator._propagate_tensor_meta_non_cached = original


def fake_store() -> Any:
    """The store of torch's fake process group: one process stands for one rank of any world size."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    return FakeStore()


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules `fully_shard` (FSDP2) was applied to, outermost first."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not loaded: nothing can be sharded
    if fsdp is None or not isinstance(model, nn.Module):  # not a model: holding() says so in one line
        return []
    return [m for m in model.modules() if isinstance(m, fsdp.FSDPModule)]


def reset_after_failure(model: nn.Module) -> None:
    """Make an FSDP2 model ready for its next step after an exception inside a step.

    `reset_iter_state()` (public) reshards and clears the per-iteration state, but not the
    gradient autograd already accumulated into an unsharded parameter whose group's
    post-backward never ran: the next steps then trained on it (weights off by up to 0.03 on a
    3-block MLP). Internals: `FSDPModule._get_fsdp_state()`, `FSDPState._fsdp_param_groups`,
    `FSDPState._is_root`, `FSDPParamGroup.fsdp_params`, `FSDPParam._unsharded_param`,
    `.unsharded_accumulated_grad`.
    """
    modules = fsdp_modules(model)
    for module in modules:
        if module._get_fsdp_state()._is_root:  # type: ignore[operator]  # torch refuses it elsewhere
            module.reset_iter_state()  # type: ignore[operator]
    for module in modules:
        for group in _param_groups(module):
            for fsdp_param in group.fsdp_params:
                unsharded = getattr(fsdp_param, "_unsharded_param", None)
                if unsharded is not None:
                    unsharded.grad = None
                fsdp_param.unsharded_accumulated_grad = None
    for param in model.parameters():
        param.grad = None


@contextlib.contextmanager
def collectives_on(model: nn.Module, group: Any) -> Iterator[None]:
    """FSDP2's all-gathers and reduce-scatters of `model` run on `group` while inside.

    A probe-owned group with its own timeout: when one rank leaves a step (a real out-of-memory
    error), the others wait in a collective of this group, not of the user's, and are freed by
    its timeout while the user's group stays usable. Internals: `FSDPParamGroup.mesh_info`,
    `.post_forward_mesh_info`, `FSDPMeshInfo.shard_process_group`.
    """
    infos: dict[int, Any] = {}
    for module in fsdp_modules(model):
        for param_group in _param_groups(module):
            for info in (param_group.mesh_info, param_group.post_forward_mesh_info):
                if info is not None:
                    infos.setdefault(id(info), info)
    saved = {key: info.shard_process_group for key, info in infos.items()}
    for info in infos.values():
        info.shard_process_group = group
    try:
        yield
    finally:
        for key, info in infos.items():
            info.shard_process_group = saved[key]


def _param_groups(module: nn.Module) -> list[Any]:
    """An FSDP module's parameter groups: `FSDPState._fsdp_param_groups` (torch >= 2.12), or the one
    `_fsdp_param_group` of torch 2.11 and before."""
    state = module._get_fsdp_state()  # type: ignore[operator]
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        group = getattr(state, "_fsdp_param_group", None)
        groups = [group] if group is not None else []
    return list(groups)


def check() -> None:
    """Fail, naming the internal, if this torch no longer has what the functions above use."""
    import inspect

    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard import _fsdp_param
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._sharding_prop import ShardingPropagator

    checks = {
        "DTensor._local_tensor": "_local_tensor" in DTensor.__tensor_flatten__.__code__.co_consts,
        "torch.distributed.tensor._api.DTensor": sys.modules["torch.distributed.tensor._api"].DTensor is DTensor,
        "_fsdp_param.free_storage uses UntypedStorage.resize_(0)": "resize_(0)"
        in inspect.getsource(_fsdp_param.free_storage),
        "_fsdp_param.alloc_storage uses UntypedStorage.resize_": "resize_("
        in inspect.getsource(_fsdp_param.alloc_storage),
        "ShardingPropagator._propagate_tensor_meta_non_cached": callable(
            getattr(ShardingPropagator, "_propagate_tensor_meta_non_cached", None)
        ),
        "FSDPModule._get_fsdp_state": callable(getattr(FSDPModule, "_get_fsdp_state", None)),
        "FSDPModule.reset_iter_state": callable(getattr(FSDPModule, "reset_iter_state", None)),
        "FSDPState._fsdp_param_groups (or _fsdp_param_group)": bool(
            {"_fsdp_param_groups", "_fsdp_param_group"} & set(FSDPState.__init__.__code__.co_names)
        ),
        "FSDPState._is_root": "_is_root" in FSDPState.__init__.__code__.co_names,
        "FSDPParamGroup.fsdp_params": "fsdp_params" in FSDPParamGroup.__init__.__code__.co_names,
        "FSDPParam._unsharded_param, .unsharded_accumulated_grad": {
            "_unsharded_param",
            "unsharded_accumulated_grad",
        }
        <= set(_fsdp_param.FSDPParam.to_accumulated_grad_if_needed.__code__.co_names),
        "torch.testing._internal.distributed.fake_pg.FakeStore": callable(fake_store),
        "FSDPParamGroup.mesh_info, .post_forward_mesh_info": {"mesh_info", "post_forward_mesh_info"}
        <= set(FSDPParamGroup.__init__.__code__.co_names),
        "FSDPParamGroup collectives on FSDPMeshInfo.shard_process_group": "shard_process_group"
        in inspect.getsource(FSDPParamGroup),
    }
    fake_store()
    missing = [name for name, ok in checks.items() if not ok]
    if missing:
        raise RuntimeError(f"torch {torch.__version__} changed internals batchfit relies on: {', '.join(missing)}")

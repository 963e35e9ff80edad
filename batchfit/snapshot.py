"""The snapshot that puts the user's model back exactly as it was, bitwise, whatever a probe did.

Optimizer steps move weights, BatchNorm updates running statistics, dropout advances the RNG:
the probe and the noise-scale estimate both take a snapshot first and restore it in `finally`.
"""

from __future__ import annotations

import torch
from torch import nn

from batchfit.device import rng_state, set_rng_state


class ModelSnapshot:
    """Everything a probe may change in the user's model, kept to be put back bitwise.

    Each tensor object is put back in its module (moving a model replaces buffer objects)
    with its original device and contents; gradients are set aside and returned; training
    flags and RNG states are restored. Weights are copied to CPU only when the device trains
    them in place: a simulated device works on stand-ins, and there the tensors' version
    counters prove they were not touched, without doubling host memory for a large model.
    """

    def __init__(self, model: nn.Module, copy_weights: bool = True) -> None:
        self.slots: list[tuple[nn.Module, str, str, torch.Tensor, torch.device]] = []
        self.copies: dict[int, torch.Tensor] = {}
        self.versions: dict[int, int] = {}
        self.grads: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for module in model.modules():
            for kind in ("_parameters", "_buffers"):
                for name, tensor in getattr(module, kind).items():
                    if tensor is None:
                        continue
                    self.slots.append((module, kind, name, tensor, tensor.device))
                    self.versions[id(tensor)] = tensor._version
                    if copy_weights and id(tensor) not in self.copies:
                        self.copies[id(tensor)] = tensor.detach().to("cpu", copy=True)
                    if kind == "_parameters":
                        self.grads[id(tensor)] = (tensor, tensor.grad)
        self.modes = [(m, m.training) for m in model.modules()]
        self.rng = rng_state()

    def set_grads_aside(self) -> None:
        for tensor, _ in self.grads.values():
            tensor.grad = None

    def restore(self) -> None:
        with torch.no_grad():
            for module, kind, name, tensor, device in self.slots:
                getattr(module, kind)[name] = tensor
                saved = self.copies.get(id(tensor))
                if saved is None:
                    if tensor.device != device or tensor._version != self.versions[id(tensor)]:
                        raise RuntimeError(f"batchfit changed {name!r} during a probe that was not to touch it")
                elif tensor.device == device and tensor.dtype == saved.dtype:
                    tensor.data.copy_(saved)
                else:
                    tensor.data = saved.to(device, copy=True)
        for tensor, grad in self.grads.values():
            tensor.grad = grad
        for module, training in self.modes:
            module.training = training
        set_rng_state(self.rng)

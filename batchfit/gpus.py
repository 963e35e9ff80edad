"""Known GPUs and the memory their drivers report, for planning without the card.

Totals are `nvidia-smi --query-gpu=memory.total` (MiB) as the driver reports them for each
card (AMD: rocm-smi's VRAM total), not the marketing figure: an "80GB" H100 shows 81559 MiB.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024**2
# Memory the CUDA context takes outside the caching allocator (docs/design.md: ~0.8 GiB measured
# on Hopper cards with CUDA 12); the offline estimate subtracts it from a card's total.
CUDA_CONTEXT_BYTES = int(0.8 * 1024**3)
# cuBLAS/cuBLASLt workspaces, allocated through the caching allocator at the first matmul of
# the forward (the main thread's handle) and of the backward (autograd's device thread), then
# kept: 68,157,440 B (65 MiB) stay allocated after one step on an H200 with torch 2.11
# (docs/design.md). torch's default is 32 MiB a handle on Hopper (CublasHandlePool.cpp); on
# other cards it is 4096*1024*2 + 16*1024*8 B a handle (from the source, not measured here).
HOPPER_WORKSPACES = (32 * MIB, 32 * MIB, 1 * MIB)
OTHER_WORKSPACES = (8 * MIB + 128 * 1024, 8 * MIB + 128 * 1024, 1 * MIB)


@dataclass(frozen=True)
class Gpu:
    name: str
    total_bytes: int
    note: str = ""
    workspaces: tuple[int, ...] = OTHER_WORKSPACES
    # CUDA compute capability (NVIDIA's table, developer.nvidia.com/cuda-gpus): which SDPA
    # kernels the card has. None for AMD cards.
    capability: tuple[int, int] | None = None

    @property
    def bf16(self) -> bool:
        """Whether the card computes in bfloat16 (Ampere and later; not Turing or Volta)."""
        return not self.note.startswith(("Turing", "Volta"))

    @property
    def usable_bytes(self) -> int:
        """What the caching allocator can have: the total less the CUDA context."""
        return self.total_bytes - CUDA_CONTEXT_BYTES


GPUS: dict[str, Gpu] = {
    g.name.lower(): g
    for g in [
        Gpu("T4", 15360 * MIB, "Turing, 16 GB GDDR6", capability=(7, 5)),
        Gpu("V100-16GB", 16384 * MIB, "Volta, HBM2", capability=(7, 0)),
        Gpu("V100-32GB", 32768 * MIB, "Volta, HBM2", capability=(7, 0)),
        Gpu("A10G", 23028 * MIB, "Ampere, AWS g5", capability=(8, 6)),
        Gpu("L4", 23034 * MIB, "Ada, 24 GB GDDR6", capability=(8, 9)),
        Gpu("RTX3090", 24576 * MIB, "Ampere, 24 GB GDDR6X", capability=(8, 6)),
        Gpu("RTX4090", 24564 * MIB, "Ada, 24 GB GDDR6X", capability=(8, 9)),
        Gpu("L40S", 46068 * MIB, "Ada, 48 GB GDDR6", capability=(8, 9)),
        Gpu("A100-40GB", 40960 * MIB, "Ampere, HBM2", capability=(8, 0)),
        Gpu("A100-80GB", 81920 * MIB, "Ampere, HBM2e", capability=(8, 0)),
        Gpu("H100-80GB", 81559 * MIB, "Hopper, HBM3", HOPPER_WORKSPACES, capability=(9, 0)),
        Gpu("H200", 143771 * MIB, "Hopper, 141 GB HBM3e", HOPPER_WORKSPACES, capability=(9, 0)),
        Gpu("B200", 183359 * MIB, "Blackwell, 180 GB HBM3e", HOPPER_WORKSPACES, capability=(10, 0)),
        Gpu("MI300X", 196592 * MIB, "AMD CDNA3, 192 GB HBM3 (ROCm)"),
    ]
}


def find_gpu(name: str) -> Gpu:
    """The catalog entry for `name` (case-insensitive), or a ValueError listing close ones."""
    key = name.strip().lower()
    if key in GPUS:
        return GPUS[key]
    matches = [g.name for k, g in GPUS.items() if key and key in k]
    hint = f"; did you mean {', '.join(matches)}?" if matches else ""
    raise ValueError(f"unknown GPU {name!r}{hint} (see batchfit gpus)")

"""Attention on a card: the SDPA backend each zoo model's calls take, and its memory a sample.

For each zoo text model: one training step at batch 1 on the card, recording for every
scaled_dot_product_attention call the backend torch picks there (`torch._fused_sdp_choice` on
the call's own tensors, after autocast's cast: the choice SDPA itself makes) beside the one the
simulated device's rules pick for the same tensors (batchfit.device.sim.attention.choose); then
the probe's per-sample memory on the card beside the offline estimate's for the same capacity
and compute capability. Run by `gpu_check.py --attention`; on CPU (--smoke) the "card" is the
CPU, which shows only that the script runs.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

import batchfit
from batchfit.device import SimulatedDevice
from batchfit.device.sim.attention import CudaBuild, choose
from batchfit.device.sim.sdpa import as_call
from batchfit.models import build

# name, sequence length, precision: T5 in fp32 is the case the issue is about (a learned bias).
MODELS = (
    ("t5-small", 512, None),
    ("gpt2", 1024, "bf16"),
    ("bert-base", 512, "bf16"),
    ("llama-1b", 2048, "bf16"),
    ("t5-small", 512, "bf16"),
    ("gpt2", 1024, None),
)
_NAMES = {0: "math", 1: "flash", 2: "memory-efficient", 3: "cuDNN", 4: "overrideable"}


class Recorder(TorchFunctionMode):
    """Notes, for every SDPA call, torch's own choice and the simulation's for the same tensors."""

    def __init__(self, build: CudaBuild) -> None:
        super().__init__()
        self.build = build
        self.calls: list[tuple[str, str]] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            call, scale, _ = as_call(args[0].device.type, *args, **kwargs)
            q, k, v = call.qkv
            real = torch._fused_sdp_choice(
                q, k, v, call.mask, call.dropout, call.causal, scale=scale, enable_gqa=call.gqa
            )
            self.calls.append((_NAMES.get(real, str(real)), choose(call, self.build)))
        return func(*args, **kwargs)


def _step_backends(name: str, seq: int, precision: str | None, device: torch.device, rules: CudaBuild) -> Recorder:
    spec = build(name, seq_len=seq)
    model = spec.model.to(device)
    batch = {k: v.unsqueeze(0).to(device) for k, v in spec.sample.items()}
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision or "")
    recorder = Recorder(rules)
    with recorder, torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        loss = model(**batch).loss
    loss.backward()
    del model, batch, loss
    return recorder


def check_model(name: str, seq: int, precision: str | None, deadline: float, smoke: bool) -> dict[str, Any]:
    """One zoo model: backends per call (card vs simulation), per-sample memory (probe vs estimate)."""
    cuda = torch.cuda.is_available() and not smoke
    device = torch.device("cuda" if cuda else "cpu")
    capability = torch.cuda.get_device_capability() if cuda else (9, 0)
    rules = CudaBuild.installed(capability)
    row: dict[str, Any] = {"model": f"{name} seq {seq} {precision or 'fp32'}", "capability": capability}
    recorder = _step_backends(name, seq, precision, device, rules)
    pairs = Counter(recorder.calls)
    row["calls"] = {f"{real} (simulated {sim})": n for (real, sim), n in pairs.items()}
    row["backends_agree"] = all(real == sim for real, sim in recorder.calls)
    options = {"precision": precision, "max_batch_size": 4 if smoke else None}
    if cuda and time.perf_counter() < deadline:
        spec = build(name, seq_len=seq)
        found = batchfit.find_batch_size(spec.model, spec.sample, device="cuda", **options)
        row.update(real_alloc_mib=(found.per_sample_allocated_bytes or 0) / 2**20, capacity=found.capacity_bytes)
    if time.perf_counter() < deadline:
        spec = build(name, seq_len=seq, on_meta=True)
        card = SimulatedDevice(row.get("capacity", 80 * 2**30), capability=capability)
        estimate = batchfit.find_batch_size(spec.model, spec.sample, device=card, **options)
        row["est_alloc_mib"] = (estimate.per_sample_allocated_bytes or 0) / 2**20
        row["est_note"] = next((n for n in estimate.notes if n.startswith("attention:")), None)
    if cuda:
        torch.cuda.empty_cache()
    return row


def attention_rows(deadline: float, smoke: bool = False) -> list[dict[str, Any]]:
    """Every model of MODELS (seq 32, two models, on --smoke) until the deadline."""
    models = [(name, 32, precision) for name, _, precision in MODELS[:2]] if smoke else MODELS
    rows = []
    for name, seq, precision in models:
        if time.perf_counter() > deadline:
            rows.append({"model": f"{name} seq {seq}", "skipped": "time budget"})
            continue
        try:
            rows.append(check_model(name, seq, precision, deadline, smoke))
        except Exception as error:  # one failing model must not hide the others' numbers
            rows.append({"model": f"{name} seq {seq}", "error": f"{type(error).__name__}: {error}"[:300]})
        print(rows[-1], flush=True)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print("| model | backends per call: card (simulated) | agree | MiB a sample, card | estimate | diff |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        real, est = row.get("real_alloc_mib"), row.get("est_alloc_mib")
        diff = f"{(est / real - 1) * 100:+.1f}%" if real and est else "-"
        cells = [
            row["model"],
            ", ".join(f"{n}× {k}" for k, n in row.get("calls", {}).items()) or row.get("error", row.get("skipped")),
            row.get("backends_agree", "-"),
            f"{real:.1f}" if real else "-",
            f"{est:.1f}" if est else "-",
            diff,
        ]
        print("| " + " | ".join(str(c) for c in cells) + " |")

"""Estimate against a real GPU: the simulated device and the limit model on recorded GPU traces.

Reads the real-GPU probe traces in tests/data/calibration/, runs the offline estimate of the
same model and capacity on the simulated device, and writes docs/accuracy.md. With
--derive it also records, for every batch size of each trace, the largest single allocation
the simulated device sees (the traces were recorded before batchfit measured it) into
tests/data/calibration/derived_largest_alloc.json.

    python scripts/accuracy.py [--derive] [--out docs/accuracy.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from batchfit import find_batch_size, predict_limit  # noqa: E402
from batchfit.device import SimulatedDevice  # noqa: E402
from batchfit.limit import before_first_oom  # noqa: E402
from batchfit.memory import GIB, MIB  # noqa: E402
from batchfit.models import build  # noqa: E402
from batchfit.optimizers import OPTIMIZERS  # noqa: E402

DATA = ROOT / "tests" / "data" / "calibration"
DERIVED = DATA / "derived_largest_alloc.json"
# Each recorded probe, the options it ran with, and the exact limit measured on the card
# (GPT-2: the probe's own --exact bisection; ResNet-50: bench_peers' bisection in the same session).
CASES: dict[str, dict[str, Any]] = {
    "h200_resnet50_fp32_sgd.json": {"model": "resnet50", "precision": None, "optimizer": "sgd", "exact": 1710},
    "h200_gpt2_seq1024_bf16_adamw.json": {
        "model": "gpt2",
        "seq_len": 1024,
        "precision": "bf16",
        "optimizer": "adamw",
        "exact": 93,
    },
}


def load_trace(name: str) -> dict[str, Any]:
    """A recorded trace with the derived largest allocations merged into its trials."""
    trace = json.loads((DATA / name).read_text())
    derived = json.loads(DERIVED.read_text()).get(name, {}) if DERIVED.exists() else {}
    for trial in trace["trials"]:
        if not trial.get("largest_alloc_bytes") and str(trial["batch_size"]) in derived:
            trial["largest_alloc_bytes"] = derived[str(trial["batch_size"])]
    return trace


def _simulate(case: dict[str, Any], capacity: int, **options: Any) -> Any:
    spec = build(case["model"], seq_len=case.get("seq_len"), on_meta=True)
    return find_batch_size(
        spec.model,
        spec.sample,
        optimizer=OPTIMIZERS[case["optimizer"]],
        loss_fn=spec.loss_fn,
        device=SimulatedDevice(capacity),
        precision=case["precision"],
        **options,
    )


def derive() -> None:
    """Largest single allocation at every batch size of each trace, from the simulated device."""
    from batchfit.config import ProbeConfig
    from batchfit.session import holding  # one trial at a chosen size

    out: dict[str, dict[str, int]] = {}
    for name, case in CASES.items():
        trace = json.loads((DATA / name).read_text())
        spec = build(case["model"], seq_len=case.get("seq_len"), on_meta=True)
        device = SimulatedDevice(2**62)  # room for every size: only the largest request is wanted
        config = ProbeConfig(precision=case["precision"])
        sizes = sorted({t["batch_size"] for t in trace["trials"]})
        with holding(spec.model, spec.sample, device, OPTIMIZERS[case["optimizer"]], spec.loss_fn, config, None) as p:
            out[name] = {str(b): p.run(b).largest_alloc for b in sizes}
        print(f"{name}: {out[name]}", file=sys.stderr)
    DERIVED.write_text(json.dumps(out, indent=2) + "\n")


def rows() -> list[dict[str, Any]]:
    result = []
    for name, case in CASES.items():
        trace = load_trace(name)
        capacity = trace["capacity_bytes"]
        start = time.perf_counter()
        estimate = _simulate(case, capacity)
        seconds = time.perf_counter() - start
        simulated_exact = _simulate(case, capacity, exact=True).exact_limit
        result.append(
            {
                "model": trace["model"],
                "exact": case["exact"],
                "real_per_sample": trace["per_sample_allocated_bytes"],
                "real_per_sample_reserved": trace["per_sample_bytes"],
                "real_probe_old": trace["predicted_limit"],
                "real_probe_new": predict_limit(before_first_oom(trace["trials"]), capacity),
                "estimate_per_sample": estimate.per_sample_allocated_bytes,
                "estimate_per_sample_reserved": estimate.per_sample_bytes,
                "estimate_limit": estimate.predicted_limit,
                "simulated_exact": simulated_exact,
                "estimate_seconds": seconds,
                "capacity": capacity,
            }
        )
    return result


ATTENTION = """
## Attention backends (issue 21; not yet on a card)

t5-small (T5ForConditionalGeneration, random weights, seq 512, fp32, SGD momentum) on a simulated
H100-80GB: 568.7 MiB a sample allocated before, 472.9 MiB after (-95.8 MiB, -16.8%). 12 of its 18
attention calls (encoder and decoder self-attention) carry T5's learned relative-position bias as
an additive mask that requires grad. CPU's rules sent them to the math path, which keeps the fp32
(B, 8, 512, 512) softmax: 8 MiB a call, 96 MiB a sample. CUDA's rules send all 18 calls to the
memory-efficient kernel (fp32: flash and cuDNN take fp16/bf16 only; a mask: never flash), which
keeps a logsumexp instead (docs/design.md, "Attention"). GPT-2 (bf16, the calibrated case above)
is unchanged: its 12 calls are flash's on the card as they were CPU flash's. Which backend a card
really picks, and its memory a sample, are recorded by `python scripts/gpu_check.py --attention`.

On a card (one H200, torch 2.11, `python scripts/gpu_check.py --attention`; trace in
tests/data/calibration/h200_attention_check.json), allocated a sample, card / estimate: t5-small seq
512 fp32 688.9 / 688.9 MiB (card: 12 calls math, 6 memory-efficient; the rules for torch 2.11
agree call by call); gpt2 seq 1024 bf16 1404.9 / 1404.7 MiB and bert-base seq 512 bf16 198.0 /
198.0 MiB (card: cuDNN for every call, the rules said flash: the choice differs, the memory does
not); llama-1b seq 2048 bf16: cuDNN on both, memory not reached in the time budget.
"""


SHARDED = """
## Sharded training (FSDP2, issue 17)

Per-rank peak of the offline estimate (`batchfit.sharded.estimate_sharded`: torch's fake process
group, the simulated card) against torch's own `FSDPMemTracker` under the same fake group, two
steps of forward, backward and AdamW, `fully_shard` on each block and the root; batchfit's figure
is its allocator model's allocated bytes less the card's cuBLAS workspaces. Written by
`python scripts/sharded_accuracy.py` (x86_64 CPU, torch 2.14.1); `tests/test_sharded.py` holds
each within 2%.

| model | world | FSDP policy | batch | batchfit MiB | FSDPMemTracker MiB | difference |
|---|---|---|---|---|---|---|
| tiny GPT-2 (2 layers, 64 wide, seq 128) | 2 | fp32 | 2 | 185.53 | 182.73 | +1.53% |
| tiny GPT-2 (2 layers, 64 wide, seq 128) | 2 | fp32 | 4 | 333.98 | 333.94 | +0.01% |
| tiny GPT-2 (2 layers, 64 wide, seq 128) | 2 | bf16 | 2 | 177.35 | 174.54 | +1.61% |
| tiny GPT-2 (2 layers, 64 wide, seq 128) | 2 | bf16 | 4 | 323.86 | 323.81 | +0.02% |
| tiny GPT-2 (2 layers, 64 wide, seq 128) | 8 | fp32 | 2 | 171.27 | 168.46 | +1.66% |
| tiny GPT-2 (2 layers, 64 wide, seq 128) | 8 | fp32 | 4 | 319.72 | 319.68 | +0.01% |
| tiny GPT-2 (2 layers, 64 wide, seq 128) | 8 | bf16 | 2 | 163.08 | 160.27 | +1.75% |
| tiny GPT-2 (2 layers, 64 wide, seq 128) | 8 | bf16 | 4 | 309.59 | 309.54 | +0.01% |

The +1.5 to +1.8% at batch 2 is the allocator model, not the tracker: CUDA's allocated bytes count
whole blocks (a large-pool request whose segment remainder is under 1 MiB is not split), which
FSDPMemTracker, summing tensors rounded to 512 B, does not; at batch 4 the two agree to 0.02%.
A real 2-rank gloo run on CPU (`device="cpu"`, real arithmetic, the same tracker) agreed with the
fake run within 2% per rank (tests/test_sharded.py; 0.01% when measured while building it).
`python scripts/gpu_check.py --fsdp` measures the same on a card: world 1, and 2 gloo ranks sharing it.

On a card (one H200, torch 2.11, `python scripts/gpu_check.py --fsdp`; trace in
tests/data/calibration/h200_fsdp_gpt2_seq1024_adamw.json): GPT-2 small, seq 1024, fp32, AdamW,
`fully_shard` on each block and the root, beside the offline estimate for the same world size and
capacity (per rank, allocated):

| world | answer, card / estimate | per sample, card / estimate | fixed, card / estimate | trials (both) |
|---|---|---|---|---|
| 1 (nccl, whole card) | 32 / 32 | 1694.5 / 1694.5 MiB (-0.0%) | 1642.1 / 1641.1 MiB (-0.1%) | 1, 2, 4, 8, 32 |
| 2 (gloo, half the card each) | 16 / 16 | 1694.4 / 1693.1 MiB (-0.1%) | 980.9 / 993.3 MiB (+1.3%) | 1, 2, 4, 8, 16 |
"""


def render(table: list[dict[str, Any]]) -> str:
    def pct(value: float, truth: float) -> str:
        return f"{(value / truth - 1) * 100:+.1f}%"

    lines = [
        "# Accuracy: estimates against a real GPU",
        "",
        "Generated by `python scripts/accuracy.py` from the real H200 traces in `tests/data/calibration/`",
        f"(see its PROVENANCE.md); estimates run on {platform.machine()} CPU, {platform.python_version()}.",
        "`tests/test_calibration.py` holds every number here within 3%.",
        "",
        "Offline estimate (`batchfit estimate`, simulated device at the card's capacity) against the card:",
        "",
        "| model | per sample, real (alloc / reserved) | per sample, estimate (alloc / reserved) "
        "| exact limit, real | exact limit, simulated | estimate's predicted limit | estimate time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['model']} | {r['real_per_sample'] / MIB:.1f} / {r['real_per_sample_reserved'] / MIB:.1f} MiB "
            f"| {r['estimate_per_sample'] / MIB:.1f} / {r['estimate_per_sample_reserved'] / MIB:.1f} MiB "
            f"({pct(r['estimate_per_sample'], r['real_per_sample'])}) | {r['exact']} "
            f"| {r['simulated_exact']} ({pct(r['simulated_exact'], r['exact'])}) "
            f"| {r['estimate_limit']} ({pct(r['estimate_limit'], r['exact'])}) | {r['estimate_seconds']:.1f} s |"
        )
    lines += [
        "",
        "The real probe's predicted limit, from its own trials before its first out-of-memory error",
        "(all below the limit):",
        "",
        "| model | exact limit | reserved line (before) | `predict_limit` (now) |",
        "|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['model']} | {r['exact']} | {r['real_probe_old']} ({pct(r['real_probe_old'], r['exact'])}) "
            f"| {r['real_probe_new']} ({pct(r['real_probe_new'], r['exact'])}) |"
        )
    lines += [
        "",
        f"Capacity: {table[0]['capacity'] / GIB:.1f} GiB, what torch could allocate on the H200 (the CUDA "
        "context excluded).",
        "The traces' largest single allocations were not recorded on the card; they are the simulated",
        "device's (`derived_largest_alloc.json`), which matches the card's allocated bytes within 0.5%.",
        ATTENTION,
        SHARDED,
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--derive", action="store_true", help="Recompute the traces' largest allocations first.")
    parser.add_argument("--out", default=str(ROOT / "docs" / "accuracy.md"))
    args = parser.parse_args()
    if args.derive:
        derive()
    text = render(rows())
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()

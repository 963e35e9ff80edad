"""Benchmark: ResNet-50 (224×224, fp32, SGD momentum) probed on a simulated 24 GiB device.

Target (issue 2): a limit and a recommendation in at most 8 trials and under 60 s on a
2-core CPU. Prints the median of --repeats runs.

    python scripts/bench_probe.py [--repeats 3] [--memory 24GiB]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torchvision

import batchfit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory", default="24GiB")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    sample = torch.randn(3, 224, 224)
    times, result = [], None
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = batchfit.find_batch_size(model, sample, memory=args.memory)
        times.append(time.perf_counter() - start)
    assert result is not None
    print(result)
    print()
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    print("| model | device | trials | OOM trials | recommended | predicted limit | median s | runs |")
    print("|---|---|---|---|---|---|---|---|")
    ooms = sum(not t.ok for t in result.trials)
    print(
        f"| resnet50 fp32 SGD | simulated {args.memory} | {len(result.trials)} | {ooms} | "
        f"{result.recommended_batch_size} | {result.predicted_limit} | "
        f"{statistics.median(times):.1f} | {args.repeats} |"
    )


if __name__ == "__main__":
    main()

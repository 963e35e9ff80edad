"""Which example a probe runs with: the worst input, not the first.

A size found on a short sequence runs out of memory on the long one late in an epoch. When the
user hands over data (a map-style dataset, or a list of examples), the probe looks at up to
`scan_items` of them and takes the largest: most elements over all its tensors, then most bytes.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_flatten


@dataclass(frozen=True)
class Chosen:
    """The example to probe with, and where it came from when it was picked from data."""

    sample: Any
    index: int | None = None
    note: str | None = None


def is_collection(sample: Any) -> bool:
    """Data rather than one example: a map-style dataset, or a list of examples.

    A tuple is always one example (`model(*sample)`, whatever it holds); a list is examples, as the
    README says: token-id tensors of different lengths, or a dataset's `(inputs, target)` items.
    """
    if isinstance(sample, (torch.Tensor, Mapping, tuple, str, bytes)) or callable(sample):
        return False
    if isinstance(sample, list):
        return len(sample) > 0
    return hasattr(sample, "__len__") and hasattr(sample, "__getitem__")


def form_hint(sample: Any, stepped: bool) -> str:
    """What to pass instead, when a model refused the arguments a sample's form gave it."""
    if isinstance(sample, list):
        return (
            "; a list is taken as a list of examples (each item one example): pass one example's "
            "several inputs as a tuple, model(*sample)"
        )
    if isinstance(sample, tuple) and not stepped:
        return (
            "; a tuple is one example's inputs, model(*sample): for a dataset item such as (inputs, target) "
            "pass step=lambda model, batch: loss_fn(model(batch[0]), batch[1])"
        )
    return ""


def _size(item: Any) -> tuple[int, int]:
    leaves = [t for t in tree_flatten(dict(item) if isinstance(item, Mapping) else item)[0]]
    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
    return sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors)


def choose(sample: Any, scan_items: int) -> Chosen:
    """`sample` itself, or the largest of the first `scan_items` items when it is data."""
    if not is_collection(sample):
        return Chosen(sample)
    count = min(len(sample), scan_items)
    if count == 0:
        raise ValueError("sample is an empty dataset: there is no example to probe with")
    sizes = [_size(sample[i]) for i in range(count)]
    index = max(range(count), key=lambda i: sizes[i])
    if sizes[index][0] == 0:
        raise ValueError(f"item {index} of the dataset holds no tensor; items must be tensors, tuples or dicts of them")
    median = statistics.median(s[0] for s in sizes)
    ratio = f"{sizes[index][0] / median:.1f}× the median {median:g}" if median else "the median has none"
    note = (
        f"probed with item {index}, the largest of {count} scanned of {len(sample)} "
        f"({sizes[index][0]} elements, {ratio})"
    )
    return Chosen(sample[index], index, note)

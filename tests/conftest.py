"""Small fixture models shared by the tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from batchfit.gpus import HOPPER_WORKSPACES


def _needs(package: str, extra: str) -> pytest.MarkDecorator:
    """Skip where an optional package is not installed (CI's second torch runs without them)."""
    missing = importlib.util.find_spec(package) is None
    return pytest.mark.skipif(missing, reason=f"needs {package}: pip install 'batchfit[{extra}]'")


needs_vision = _needs("torchvision", "vision")
needs_hf = _needs("transformers", "hf")
needs_plot = _needs("matplotlib", "plot")
needs_peft = _needs("peft", "lora")

# A simulated card holds the cuBLAS workspaces (65 MiB, Hopper's) before any tensor.
WORKSPACES = sum(HOPPER_WORKSPACES)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--overwrite-golden", action="store_true", help="rewrite tests/golden/*.out and the README's blocks"
    )


def run_cli(*args: str):
    """The `batchfit` command through click's CliRunner (stderr kept apart)."""
    from click.testing import CliRunner

    from batchfit.cli import main

    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def module_file(folder: Path, name: str, text: str) -> str:
    """Write a Python file of model factories for `--model path.py:factory`; its path."""
    path = folder / f"{name}.py"
    path.write_text(text)
    return str(path)


def card(mib: int) -> int:
    """Bytes of a simulated card whose 80% budget leaves 0.8 × `mib` MiB beside the workspaces."""
    return mib * 2**20 + int(WORKSPACES / 0.8)


# The keys Result.to_dict() and the CLI's --json share (issue 2).
RESULT_KEYS = (
    "recommended_batch_size",
    "learning_rate",
    "largest_batch_ran",
    "predicted_limit",
    "per_sample_bytes",
    "fixed_bytes",
    "capacity_bytes",
    "margin",
    "device",
    "trials",
    "elapsed_s",
)


def linear_stack(layers: int = 4, width: int = 256) -> nn.Sequential:
    """Bias-free Linear layers: memory known in closed form (see test_probe)."""
    return nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])


class SmallCNN(nn.Module):
    """Conv + BatchNorm + Dropout: BN stats, dropout RNG and train/eval mode all change in a probe."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x)))).flatten(1))


class DictModel(nn.Module):
    """Takes keyword tensors and computes its own loss, like a Hugging Face model."""

    def __init__(self, vocab: int = 100, width: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.head(self.emb(input_ids))
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return {"loss": loss, "logits": logits}


class PairModel(nn.Module):
    """Takes two positional tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 8)
        self.b = nn.Linear(4, 8)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.a(x) * self.b(y)


@pytest.fixture
def cnn() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN()

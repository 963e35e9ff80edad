"""The command line through click's CliRunner, and once through the installed console script."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import RESULT_KEYS, card, module_file, needs_plot, needs_vision, run_cli

from batchfit.cli import main

TINY = textwrap.dedent(
    """
    import torch
    from torch import nn

    def tiny():
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)), torch.randn(64)

    def model_only():
        return nn.Linear(8, 2)

    def broken():
        class Broken(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(64, 10)
            def forward(self, x):
                return self.fc(x[:, :32])  # shape bug
        return Broken(), torch.randn(64)
    """
)


@pytest.fixture
def tiny(tmp_path: Path) -> str:
    return module_file(tmp_path, "tiny", TINY)


invoke = run_cli


@pytest.mark.parametrize("command", [[], ["probe"], ["estimate"], ["check"], ["gpus"], ["lr"]])
def test_every_help(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0
    assert "Usage:" in result.output


def test_help_does_not_import_torch():
    code = (
        "import sys\nfrom batchfit.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_estimate_prints_the_answer(tiny):
    result = invoke(
        "estimate",
        "--model",
        f"{tiny}:tiny",
        "--memory",
        f"{card(64)}B",
        "--base-lr",
        "0.1",
        "--base-batch-size",
        "256",
    )
    assert result.exit_code == 0, result.output
    assert "recommended batch size" in result.output
    assert "learning rate" in result.output
    assert "batch" in result.output and "fitted" in result.output  # live trial lines


def test_json_to_stdout_has_the_result_keys(tiny):
    result = invoke("estimate", "--model", f"{tiny}:tiny", "--gpu", "T4", "--json", "-")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    for key in (*RESULT_KEYS, "throughput_knee", "lr_advice", "global_batch_size", "world_size"):
        assert key in data, key
    assert data["capacity_bytes"] == 15360 * 2**20 - int(0.8 * 2**30)


@needs_plot
def test_plot_writes_a_png(tiny, tmp_path):
    png = tmp_path / "memory.png"
    result = invoke("estimate", "--model", f"{tiny}:tiny", "--memory", f"{card(64)}B", "--plot", str(png), "-q")
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_probe_without_cuda_uses_host_ram_and_says_so(tiny):
    result = invoke("probe", "--model", f"{tiny}:tiny", "--json", "-")
    assert result.exit_code == 0
    assert "no CUDA GPU here" in result.stderr and "--gpu" in result.stderr


@needs_vision
def test_probe_list_models():
    result = invoke("probe", "--list-models")
    assert result.exit_code == 0
    assert "resnet50" in result.output and "gpt2" in result.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        pytest.param(["probe", "--model", "resnet5", "--memory", "1GiB"], "did you mean resnet50", marks=needs_vision),
        (["probe", "--model", "resnet18", "--input-shape", "3,x,224", "--memory", "1GiB"], "not a shape"),
        (["probe", "--model", "resnet18", "--input-shape", "3,0,224", "--memory", "1GiB"], "positive"),
        (["probe", "--model", "resnet18", "--memory", "lots"], "memory size 'lots'"),
        (["probe", "--model", "resnet18", "--memory", "1GiB", "--margin", "1.5"], "--margin"),
        (["probe", "--model", "resnet18", "--memory", "1GiB", "--base-lr", "-0.1"], "--base-lr"),
        (["probe", "--model", "nope.py:make", "--memory", "1GiB"], "does not exist"),
        (["probe", "--model", "{tiny}:absent", "--memory", "1GiB"], "has no function 'absent'"),
        (["probe", "--model", "{tiny}:model_only", "--memory", "1GiB"], "--input-shape"),
        (["probe", "--model", "resnet18", "--gpu", "K80"], "unknown GPU 'K80'"),
        (["estimate", "--model", "resnet18"], "needs --gpu NAME or --memory"),
        (["probe"], "--model is required"),
        (["check", "--model", "resnet18", "--memory", "1GiB", "--batch-size", "0"], "--batch-size"),
        (
            ["lr", "--base-lr", "0.1", "--base-batch-size", "256", "--batch-size", "512", "--rule", "noise"],
            "needs noise_scale",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, needle, tiny):
    result = CliRunner().invoke(main, [a.replace("{tiny}", tiny) for a in args])
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert "Traceback" not in result.output


def test_model_bug_is_exit_3_with_the_batch_size(tiny):
    result = CliRunner().invoke(main, ["estimate", "--model", f"{tiny}:broken", "--memory", f"{card(64)}B"])
    assert result.exit_code == 3
    assert re.search(r"batch_size=\d+ failed with RuntimeError", result.output)  # the search's first size
    assert "Traceback" not in result.output


def test_check_exit_codes(tiny):
    fits = invoke("check", "--model", f"{tiny}:tiny", "--memory", f"{card(64)}B", "--batch-size", "8", "--json", "-")
    assert fits.exit_code == 0
    assert json.loads(fits.stdout)["fits"] is True
    too_big = invoke("check", "--model", f"{tiny}:tiny", "--memory", f"{card(64)}B", "--batch-size", "100000")
    assert too_big.exit_code == 1
    assert "does not fit" in too_big.output and "largest that fits" in too_big.output


def test_lr_command():
    result = invoke("lr", "--base-lr", "0.1", "--base-batch-size", "256", "--batch-size", "8192", "--json", "-")
    data = json.loads(result.stdout)
    assert data["learning_rate"] == pytest.approx(3.2)
    assert data["warmup_epochs"] == 5


def test_gpus_catalog():
    result = invoke("gpus")
    assert result.exit_code == 0
    for name in ["T4", "A100-80GB", "H100-80GB", "H200", "MI300X"]:
        assert name in result.output


@needs_vision
def test_estimate_a_zoo_model():
    result = invoke("estimate", "--model", "resnet18", "--input-shape", "3,64,64", "--memory", "2GiB", "-q")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("recommended batch size")


def test_estimate_a_transformer():
    pytest.importorskip("transformers")
    result = invoke(
        "estimate",
        "--model",
        "gpt2",
        "--seq-len",
        "64",
        "--precision",
        "bf16",
        "--optimizer",
        "adamw",
        "--gpu",
        "T4",
        "--json",
        "-",
    )
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["recommended_batch_size"] >= 1 and "gpt2" in data["model"]


def test_installed_console_script(tmp_path):
    result = subprocess.run(
        ["batchfit", "lr", "--base-lr", "0.1", "--base-batch-size", "256", "--batch-size", "512"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "0.2" in result.stdout
    bad = subprocess.run(
        ["batchfit", "estimate", "--model", "resnet18", "--memory", "x"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_target_global_batch_sets_accumulation(tiny):
    result = invoke(
        "estimate",
        "--model",
        f"{tiny}:tiny",
        "--memory",
        f"{card(64)}B",
        "--target-global-batch",
        "1000000",
        "--base-lr",
        "0.1",
        "--base-batch-size",
        "256",
        "--json",
        "-",
    )
    data = json.loads(result.stdout)
    assert data["global_batch_size"] == 1000000
    assert data["per_device_batch_size"] * data["gradient_accumulation_steps"] == 1000000
    assert data["learning_rate"] == pytest.approx(0.1 * 1000000 / 256)
    assert any("LARS" in a for a in data["lr_advice"]["advice"])


def test_timm_models_when_installed():
    pytest.importorskip("timm")
    result = invoke("estimate", "--model", "timm:resnet18", "--input-shape", "3,64,64", "--memory", "2GiB", "-q")
    assert result.exit_code == 0, result.output
    bad = CliRunner().invoke(main, ["estimate", "--model", "timm:resnt18", "--memory", "2GiB"])
    assert bad.exit_code == 2 and "did you mean timm:resnet18" in bad.output

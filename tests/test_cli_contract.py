"""The CLI's contract with a pipeline: exit codes, one-line errors, checks before any work.

One test per row of issue 10's table. Exit codes: 0 success/fits, 1 does not fit, 2 bad input,
3 the user's model or factory failed, 130 interrupted.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import card, module_file, needs_plot, needs_vision, run_cli

MODELS = textwrap.dedent(
    """
    import os
    import torch
    from torch import nn

    def tiny():
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)), torch.randn(64)

    def raises():
        raise ZeroDivisionError("division by zero in the user's factory")

    class Stops(nn.Module):
        def __init__(self, error):
            super().__init__()
            self.fc, self.error = nn.Linear(64, 10), error
        def forward(self, x):
            if x.shape[0] >= 16:
                raise self.error
            return self.fc(x)

    def interrupted():
        return Stops(KeyboardInterrupt()), torch.randn(64)

    def bug_on_rank_1():
        error = ValueError("shape bug on rank 1") if os.environ.get("RANK") == "1" else None
        return (Stops(error) if error else nn.Linear(64, 10)), torch.randn(64)
    """
)


@pytest.fixture
def models(tmp_path: Path) -> str:
    return module_file(tmp_path, "models", MODELS)


run = run_cli
LR = ("lr", "--base-lr", "0.1", "--base-batch-size", "256", "--batch-size", "512")


def assert_one_line_error(result, code: int, match: str = "") -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    usage = lines and lines[0].startswith("Usage:")
    assert usage or len(lines) == 1, lines  # click's Usage/Error lines, or one line
    assert match in result.stderr


MEMORY = f"{card(64)}B"


@pytest.mark.parametrize(
    ("option", "value", "match"),
    [
        ("--json", "/nonexistent/dir/r.json", "does not exist"),
        ("--plot", "/nonexistent/x.png", "does not exist"),
        ("--plot", "/tmp", "is a directory"),
        ("--json", "/tmp", "is a directory"),
    ],
)
@pytest.mark.parametrize("command", ["probe", "check", "estimate"])
def test_bad_output_paths_fail_before_any_work(command, option, value, match):
    extra = ["--batch-size", "64"] if command == "check" else []
    start = time.perf_counter()
    result = run(command, "--model", "resnet50", "--memory", "24GiB", *extra, option, value)
    assert time.perf_counter() - start < 1.0  # before any model is built
    assert_one_line_error(result, 2, match)


def test_lr_json_to_a_missing_folder():
    assert_one_line_error(run(*LR, "--json", "/no/x.json"), 2, "does not exist")


@needs_plot
def test_plot_is_written_where_asked(models, tmp_path):
    target = tmp_path / "noext"
    result = run("estimate", "--model", f"{models}:tiny", "--memory", MEMORY, "--plot", str(target), "-q")
    assert result.exit_code == 0, result.output
    assert target.read_bytes()[:4] == b"\x89PNG" and not (tmp_path / "noext.png").exists()


def test_a_factory_that_raises_is_exit_3_in_one_line(models):
    result = run("probe", "--model", f"{models}:raises", "--memory", MEMORY)
    assert_one_line_error(result, 3)
    assert "raises failed: ZeroDivisionError: division by zero" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--base-lr", "0.1"],
        ["--base-batch-size", "256"],
    ],
)
def test_base_lr_and_base_batch_size_go_together(args):
    result = run("probe", "--model", "resnet50", "--memory", "24GiB", *args)
    assert_one_line_error(result, 2)
    assert "go together" in result.stderr


def test_goodput_without_noise_scale_is_rejected_before_any_work():
    result = run("probe", "--model", "resnet50", "--memory", "24GiB", "--objective", "goodput")
    assert_one_line_error(result, 2)
    assert "noise_scale" in result.stderr and "probing" not in result.output


@pytest.mark.parametrize(
    ("args", "match"),
    [
        pytest.param(
            ["probe", "--model", "resnet50", "--seq-len", "128"],
            "--seq-len applies to the text models",
            marks=needs_vision,
        ),
        pytest.param(
            ["probe", "--model", "gpt2", "--input-shape", "3,224,224"], "--input-shape applies to image models"
        ),
    ],
)
def test_options_that_do_not_apply_say_what_does(args, match):
    assert_one_line_error(run(*args, "--memory", "24GiB"), 2, match)


def test_lr_with_an_unknown_optimizer_name():
    assert_one_line_error(run(*LR, "--optimizer", "foo"), 2, "optimizer 'foo' is not known")


def test_a_huge_memory_says_too_large():
    result = run("probe", "--model", "resnet50", "--memory", "1e30B")
    assert_one_line_error(result, 2)
    assert "too large" in result.stderr


@pytest.mark.parametrize("command", ["probe", "check"])
def test_ctrl_c_is_exit_130_with_the_trials_done(models, tmp_path, command):
    report = tmp_path / "r.json"
    extra = ["--batch-size", "64"] if command == "check" else []
    result = run(command, "--model", f"{models}:interrupted", "--memory", MEMORY, *extra, "--json", str(report))
    assert result.exit_code == 130
    assert "Traceback" not in result.output and "interrupted" in result.stderr
    data = json.loads(report.read_text())
    assert data["interrupted"] is True
    if command == "probe":  # 4 and 8 ran before the interrupt at 16
        assert [t["batch_size"] for t in data["trials"]] == [4, 8]
        assert "batch      8: fitted" in result.stderr


def test_json_byte_counts_are_integers(models):
    result = run("estimate", "--model", f"{models}:tiny", "--memory", MEMORY, "--json", "-")
    data = json.loads(result.stdout)
    byte_keys = [k for k in data if k.endswith("_bytes")]
    assert byte_keys and all(isinstance(data[k], int) for k in byte_keys if data[k] is not None)
    check = run("check", "--model", f"{models}:tiny", "--memory", MEMORY, "--batch-size", "8", "--json", "-")
    data = json.loads(check.stdout)
    assert all(isinstance(data[k], int) for k in data if k.endswith("_bytes") and data[k] is not None)


@needs_vision
def test_rounding_option_and_what_rounding_cost():
    pow2 = run("estimate", "--model", "resnet50", "--memory", "24GiB")
    assert "rounded down to a power of two" in pow2.stdout and "--rounding mult8" in pow2.stdout
    mult8 = run("estimate", "--model", "resnet50", "--memory", "24GiB", "--rounding", "mult8", "--json", "-")
    answer = json.loads(mult8.stdout)["recommended_batch_size"]
    assert (
        answer % 8 == 0
        and answer
        > json.loads(run("estimate", "--model", "resnet50", "--memory", "24GiB", "--json", "-").stdout)[
            "recommended_batch_size"
        ]
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_under_torchrun_a_model_bug_on_one_rank_is_exit_3_everywhere(models):
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        command = [sys.executable, "-m", "batchfit", "probe", "--model", f"{models}:bug_on_rank_1", "--memory", MEMORY]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [3, 3], outputs
    for _, err in outputs:
        assert "Traceback" not in err and "shape bug on rank 1" in err

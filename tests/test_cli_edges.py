"""Issue 18: what a new user hit: a card too small for the model, sizes without a unit, Ctrl-C at
any moment, output files that cannot be written, plot formats. Each is one line and its exit
code (0 fits, 1 does not fit, 2 bad input, 3 the model failed, 130 interrupted), and no computed
result is lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import card, module_file, needs_plot, run_cli
from test_cli_contract import assert_one_line_error

MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn

    def tiny():
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)), torch.randn(64)

    def slow():  # still building when Ctrl-C comes, with nothing but torch installed
        import time
        time.sleep(60)
        return tiny()

    def wide():  # 64 MiB of weights: a card of 30 MiB cannot hold them
        return nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 10)), torch.randn(4096)

    class StopsUnderAutocast(nn.Module):  # Ctrl-C at the lever table's second row (bf16 autocast)
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)
        def forward(self, x):
            out = self.fc(x)
            if out.dtype == torch.bfloat16:
                raise KeyboardInterrupt
            return out

    def stops_in_levers():
        return StopsUnderAutocast(), torch.randn(64)
    """
)
MEMORY = f"{card(64)}B"
run = run_cli


@pytest.fixture
def models(tmp_path: Path) -> str:
    return module_file(tmp_path, "models", MODELS)


@pytest.mark.parametrize(
    "args",
    [
        ("estimate", "--memory", "30MiB"),
        ("estimate", "--memory", "1MiB"),
        ("check", "--memory", "30MiB", "--batch-size", "8"),
    ],
)
def test_a_card_that_cannot_hold_the_model_is_does_not_fit(models, args):
    """Issue 18 case 1: was a torch.OutOfMemoryError traceback, exit 1."""
    command, *rest = args
    result = run(command, "--model", f"{models}:wide", *rest, "-q")
    assert_one_line_error(result, 1, "the model itself does not fit")
    assert "weights 64.2 MiB, gradients 64.2 MiB, optimizer state 64.2 MiB" in result.stderr
    assert "batchfit check --levers" in result.stderr


def test_a_card_that_cannot_hold_the_model_in_python(models):
    import importlib.util

    import batchfit

    spec = importlib.util.spec_from_file_location("models", models)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model, sample = module.wide()
    for call in (batchfit.find_batch_size, lambda *a, **k: batchfit.preflight(*a, 8, **k)):
        with pytest.raises(batchfit.DoesNotFitError, match="before any batch it needs at least"):
            call(model, sample, device="simulated", memory="30MiB")


@pytest.mark.parametrize("value", ["24", "24.5", "1e9"])
def test_a_memory_without_a_unit_is_refused(value):
    """Issue 18 case 2: '--memory 24' was 24 bytes."""
    assert_one_line_error(run("estimate", "--model", "resnet18", "--memory", value), 2, "give a unit, e.g. 24GiB")


def test_does_not_fit_says_by_how_much(models):
    """Issue 18 case 9: an OOM at the batch asked said nothing of the need (JSON nulls)."""
    check = run("check", "--model", f"{models}:wide", "--memory", "1GiB", "--batch-size", "100000", "--json", "-")
    assert check.exit_code == 1, check.stderr
    data = json.loads(check.stdout)
    assert data["peak_reserved_bytes"] is None and data["needed_bytes"] > data["budget_bytes"]
    assert data["overshoot_bytes"] == data["needed_bytes"] - data["budget_bytes"]
    assert data["needed_basis"] == "the memory line of the trials that ran"
    # Even batch 1 runs out: the need before any batch, against the budget.
    none = run("check", "--model", f"{models}:wide", "--memory", "200MiB", "--batch-size", "4", "--json", "-")
    data = json.loads(none.stdout)
    assert data["largest_fitting"] == 0 and data["needed_basis"].startswith("at least, before any batch")
    estimate = run("estimate", "--model", f"{models}:wide", "--memory", "200MiB", "-q")
    assert_one_line_error(estimate, 1, "before any batch the model needs at least")


def _as_from_a_terminal(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    """The command as a shell runs it in the foreground: Ctrl-C (SIGINT) at its default action.

    A test run started in the background (`cmd &`, as CI may start it) ignores SIGINT, and an
    ignored signal stays ignored across exec: Python then never raises KeyboardInterrupt, as is
    right for a process its user started that way, and the Ctrl-C tests would wait in vain."""
    return subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _interrupted_at(seconds: float, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    proc = _as_from_a_terminal([sys.executable, "-m", "batchfit", *args], env)
    time.sleep(seconds)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("seconds", [0.3, 1.0])
def test_ctrl_c_in_the_first_seconds_is_130(models, seconds):
    """Issue 18 case 4: Ctrl-C while importing or building the model was click's 'Aborted!', exit 1."""
    done = _interrupted_at(seconds, "estimate", "--model", f"{models}:slow", "--memory", "1GiB")
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr and "Aborted" not in done.stderr and "interrupted" in done.stderr


HELD = """
import os, signal, sys, threading
from batchfit.cli.options import import_torch
threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
try:
    import_torch()
except KeyboardInterrupt:
    print("raised once torch was imported:", "torch.nn" in sys.modules)
"""


def test_ctrl_c_while_torch_imports_is_held_until_it_is_imported():
    """A KeyboardInterrupt inside torch's C++ start-up was lost (torch 2.13: the command went on)
    or aborted the process (exit -6): the command imports torch with Ctrl-C held, then raises it."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-c", HELD]
    proc = _as_from_a_terminal(command, env)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and out.strip() == "raised once torch was imported: True", err


def test_ctrl_c_while_pricing_levers_keeps_the_verdict(models, tmp_path):
    """Issue 18 case 5: the check had decided, then Ctrl-C in the lever table lost it."""
    report = tmp_path / "r.json"
    result = run(
        "check", "--model", f"{models}:stops_in_levers", "--memory", MEMORY, "--batch-size", "8", "--levers",
        "--json", str(report),
    )  # fmt: skip
    assert result.exit_code == 130, result.output
    assert "Traceback" not in result.output
    assert "batch_size=8 fits" in result.stdout
    assert "interrupted while pricing the levers: 1 row priced" in result.stderr
    data = json.loads(report.read_text())
    assert data["interrupted"] is True and data["fits"] is True and data["batch_size"] == 8
    assert [row["lever"] for row in data["levers"]["levers"]] == ["as asked"]


def test_an_interrupted_probe_counts_its_trials_in_english(models, tmp_path):
    """Issue 18 case 15: 'interrupted after 1 trials'."""
    from batchfit.cli.run import plural

    assert plural(1, "trial") == "1 trial" and plural(0, "trial") == "0 trials" and plural(3, "row") == "3 rows"


@pytest.mark.parametrize("option", ["--json", "--plot"])
@pytest.mark.parametrize("target", ["/proc/version", "/proc/batchfit.json", "readonly"])
def test_an_output_that_cannot_be_opened_is_refused_before_any_work(models, tmp_path, option, target):
    """Issue 18 case 6: the path passed the folder check, the probe ran, then a traceback lost it."""
    if target == "readonly":
        if os.geteuid() == 0:
            pytest.skip("root writes read-only files")
        path = tmp_path / "r.json"
        path.write_text("")
        path.chmod(0o444)
        target = str(path)
    if option == "--plot":
        pytest.importorskip("matplotlib")
        target = target.replace(".json", ".png").replace("version", "version.png")
    started = time.perf_counter()
    result = run("estimate", "--model", f"{models}:tiny", "--memory", MEMORY, option, target)
    assert_one_line_error(result, 2, "cannot be opened for writing")
    assert time.perf_counter() - started < 5
    assert not Path(tmp_path / "r.png").exists()


def test_a_write_that_still_fails_at_the_end_keeps_the_result(models, tmp_path, monkeypatch):
    """Issue 18 case 6: the file opened at the start, then failed at the end (disk full, removed)."""
    target = tmp_path / "r.json"
    real_open = open

    def failing_open(path, mode="r", *args, **kwargs):
        if str(path) == str(target) and "w" in mode:
            raise OSError(28, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    import batchfit.cli.run as cli_run

    monkeypatch.setattr(cli_run, "open", failing_open, raising=False)
    result = run("estimate", "--model", f"{models}:tiny", "--memory", MEMORY, "--json", str(target), "-q")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.split("recommended batch size")[0])["recommended_batch_size"] > 0
    assert "could not write" in result.stderr and "No space left on device" in result.stderr
    assert "Traceback" not in result.output


@needs_plot
@pytest.mark.parametrize(("suffix", "magic"), [(".pdf", b"%PDF"), (".svg", b"<?xml"), (".png", b"\x89PNG")])
def test_a_plot_is_written_in_the_format_its_suffix_names(models, tmp_path, suffix, magic):
    """Issue 18 case 7: --plot x.pdf wrote PNG bytes."""
    path = tmp_path / f"memory{suffix}"
    result = run("estimate", "--model", f"{models}:tiny", "--memory", MEMORY, "--plot", str(path), "-q")
    assert result.exit_code == 0, result.output
    assert path.read_bytes().startswith(magic)


@needs_plot
@pytest.mark.parametrize(("target", "match"), [("-", "'-' (stdout) is for --json"), ("x.jpg", ".png, .pdf, .svg")])
def test_a_plot_path_it_cannot_write_is_refused(models, tmp_path, target, match):
    """Issue 18 case 7: --plot - made a file named '-'; a suffix matplotlib would not write as named."""
    os.chdir(tmp_path)
    result = run("estimate", "--model", f"{models}:tiny", "--memory", MEMORY, "--plot", target)
    assert_one_line_error(result, 2, match)
    assert not (tmp_path / "-").exists()


@needs_plot
def test_plots_name_the_card_and_show_every_lever(tmp_path, monkeypatch):
    """Issue 18 case 14: no word of a simulated card; levers that do not apply were left out; the
    accumulation bar (its per-step batch) looked like a lever short of the batch asked."""
    import matplotlib
    import torch

    import batchfit
    from batchfit.lever.records import Lever, LeverTable
    from batchfit.plot import plot_levers, plot_result

    monkeypatch.setitem(matplotlib.rcParams, "svg.fonttype", "none")  # text as text, to read it back
    device = "simulated A10G GPU (estimate, no real compute)"
    rows = [
        Lever("as asked", "baseline", "fp32", fits=177, peak_at_batch=2**34),
        Lever("shorter sequences", "sequence", "-", detail="does not apply: not a text sample", applies=False),
        Lever(
            "gradient accumulation", "accumulation", "-", fits=128, detail="2 steps of 128; the peak column is at 128"
        ),
    ]
    plot_levers(LeverTable(256, 2**35, 2**34, device, rows), str(tmp_path / "l.svg"))
    text = (tmp_path / "l.svg").read_text()
    assert device in text and "shorter sequences" in text and "does not apply" in text
    assert "2 steps of 128 = global batch 256" in text
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    result = batchfit.find_batch_size(model, torch.randn(64), memory="256MiB", device="simulated")
    plot_result(result, str(tmp_path / "m.svg"))
    assert result.device in (tmp_path / "m.svg").read_text() and "simulated" in result.device


def test_wording_a_user_read_twice(models, monkeypatch):
    """Issue 18 case 15, each as seen."""
    import batchfit
    from batchfit.device import resolve

    monkeypatch.setattr(resolve, "cuda_available", lambda: False)
    free = resolve.resolve_device(None, batchfit.ProbeConfig())
    assert "simulated GPU the size of this machine's free RAM" in free.description
    lr = run("lr", "--base-lr", "0.1", "--base-batch-size", "256", "--batch-size", "1119")
    assert "learning rate: 0.437109 " in lr.stdout and "to 0.437109 over" in lr.stdout
    both = run("estimate", "--model", f"{models}:tiny", "--memory", MEMORY, "--mode", "both")
    assert "training: probing" in both.stderr and "evaluation (forward only, inference mode): probing" in both.stderr
    check = batchfit.CheckResult(8, False, None, 2**30, 2**31, 0.5, "a card")
    assert "runs out of memory, over the budget of 1.0 GiB (50% of 2.0 GiB)" in str(check)
    import torch

    table = batchfit.levers(torch.nn.Linear(16, 16), torch.randn(16), 2, memory=card(8), groups=("optimizer",))
    sgd = next(row for row in table.levers if row.name == "SGD momentum")
    assert sgd.detail == "the optimizer asked" and "a different optimizer" not in sgd.cost


def _stale_rank(models: str, *extra: str) -> subprocess.Popen:
    """A rank whose torchrun variables name a peer that never comes (a pod's stale environment)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    path = os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
    env["MASTER_PORT"] = str(port)
    command = [sys.executable, "-m", "batchfit", "estimate", "--model", f"{models}:tiny", "--memory", MEMORY, *extra]
    return _as_from_a_terminal(command, env)


def test_stale_distributed_variables_time_out_naming_them(models):
    """Issue 18 case 3: the rendezvous waited 30 minutes (the agreement's timeout), deaf to Ctrl-C."""
    proc = _stale_rank(models, "--rendezvous-timeout", "2")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert "waiting for 2 ranks at 127.0.0.1:" in err and "Traceback" not in err
    assert "RANK=0, WORLD_SIZE=2, MASTER_ADDR=127.0.0.1, MASTER_PORT=" in err and "did not join within 2 s" in err


def test_ctrl_c_ends_the_wait_for_other_ranks(models):
    proc = _stale_rank(models)
    assert "waiting for 2 ranks" in proc.stderr.readline()
    time.sleep(0.5)
    started = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert time.perf_counter() - started < 5 and "Traceback" not in err


def test_the_rendezvous_timeout_is_settable(monkeypatch):
    import batchfit

    assert batchfit.ProbeConfig().rendezvous_timeout_s == 300
    monkeypatch.setenv("BATCHFIT_RENDEZVOUS_TIMEOUT", "20")
    assert batchfit.ProbeConfig().rendezvous_timeout_s == 20
    monkeypatch.setenv("BATCHFIT_RENDEZVOUS_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="BATCHFIT_RENDEZVOUS_TIMEOUT='soon' must be a positive number"):
        batchfit.ProbeConfig()
    with pytest.raises(ValueError, match="rendezvous_timeout_s=0"):
        batchfit.ProbeConfig(rendezvous_timeout_s=0)


def test_a_torchvision_built_for_another_torch_is_one_line(tmp_path, monkeypatch):
    """Issue 18 case 12: it failed at import with 'operator torchvision::nms does not exist', a
    traceback and exit 1 from `batchfit probe --model resnet50`."""
    broken = tmp_path / "torchvision"
    broken.mkdir()
    (broken / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        monkeypatch.delitem(sys.modules, name)
    result = run("probe", "--model", "resnet50", "--memory", "1GiB")
    assert_one_line_error(result, 2, "torchvision is installed but fails to import")
    assert "operator torchvision::nms does not exist" in result.stderr and "pip install torch==" in result.stderr

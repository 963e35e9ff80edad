"""The lever table on two cores (batchfit/lever/parallel.py): the same rows in the same order as
one process, errors where one process raises them, one process where a helper cannot run.

Each case runs in a fresh interpreter: a helper is forked, and a process that has run a backward
pass on the simulated card (as pytest's has, after other tests) cannot fork one that runs another.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

STUB = """
import functools, json, os, sys, time
import torch
from batchfit.lever import parallel
from batchfit.lever.records import Lever

class Stub(parallel.Table):
    '''Rows that say which process priced them (and what first row they read).'''
    def __init__(self, fail_at=None, die_at=None, hang_at=None, count=8):
        self.fail_at, self.die_at, self.hang_at, self.count = fail_at, die_at, hang_at, count
    def units(self, groups):
        return [parallel.Unit(functools.partial(self.row, k), reads_baseline=k % 3 == 0) for k in range(self.count)]
    def row(self, k):
        time.sleep(0.2)
        if k == self.fail_at:
            raise ValueError(f"row {k} failed")
        if k == self.die_at and os.getpid() != PARENT:
            os._exit(1)
        if k == self.hang_at and os.getpid() != PARENT:
            time.sleep(3600)  # a helper stalled mid-row
        read = self.baseline.name if k % 3 == 0 else ""
        return Lever(f"row {k}", "stub", read, detail="parent" if os.getpid() == PARENT else "helper")

def table(**stub):
    stub, heard = Stub(**stub), []
    first = lambda: Lever("as asked", "baseline", "")
    try:
        with parallel.helping(stub) as helper:
            rows = parallel.price(stub, ("stub",), first, lambda row: heard.append(row.name), helper)
        outcome = [[r.name, r.cost, r.detail] for r in rows]
    except ValueError as error:
        outcome = f"{type(error).__name__}: {error}"
    import multiprocessing
    return {"rows": outcome, "heard": heard, "children": len(multiprocessing.active_children())}

def no_fork(table):
    raise BlockingIOError(11, "Resource temporarily unavailable")  # fork at a process limit

PARENT = os.getpid()
parallel.STALL_FLOOR_S = 3.0  # rows of 0.2 s: a helper silent for 3 s is stalled
Helper, got = parallel.Helper, {}
for case, stub in json.loads(sys.argv[1]):  # in this order: the last two leave no helper
    if case == "no fork":
        parallel.Helper = no_fork
    if case == "one core":
        parallel.Helper = Helper
        parallel.cores, cores = (lambda: 1), parallel.cores
    if case == "after a backward":
        parallel.cores = cores
        import batchfit
        batchfit.find_batch_size(torch.nn.Linear(4, 4), torch.randn(4), device="simulated", memory=2**30)
        child = os.fork()  # can a process forked now run a backward? (not where autograd has device threads)
        if child == 0:
            try:
                torch.ones(1, requires_grad=True).sum().backward()
            except RuntimeError:
                os._exit(1)
            os._exit(0)
        got["a child can run a backward"] = os.waitpid(child, 0)[1] == 0
    started = time.monotonic()
    got[json.dumps([case, stub])] = table(**stub)
    got[json.dumps([case, stub])]["seconds"] = time.monotonic() - started
print(json.dumps(got))
"""
CASES = [
    ("two cores", {}),
    ("two cores", {"fail_at": 1}),
    ("two cores", {"fail_at": 6}),
    ("two cores", {"die_at": 7}),
    ("two cores", {"hang_at": 7}),
    ("no fork", {}),
    ("one core", {}),
    ("after a backward", {}),
]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _python(script: str, *args: str) -> dict:
    """What `script` prints last, as JSON, run in a fresh interpreter on this checkout."""
    command = [sys.executable, "-c", script, *args]
    done = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def stubs() -> dict:
    return _python(STUB, json.dumps(CASES))


def _stub(stubs: dict, case: str, **stub: object) -> dict:
    return stubs[json.dumps([case, stub])]


NAMES = ["as asked", *(f"row {k}" for k in range(8))]


def test_rows_come_back_in_table_order_from_both_processes(stubs):
    got = _stub(stubs, "two cores")
    assert [row[0] for row in got["rows"]] == NAMES and got["heard"] == NAMES
    assert {row[2] for row in got["rows"][1:]} == {"parent", "helper"}  # both priced rows
    assert all(row[1] == "as asked" for row in got["rows"][1::3])  # the helper read the first row
    assert got["children"] == 0


@pytest.mark.parametrize("fail_at", [1, 6])
def test_an_error_is_raised_after_the_rows_before_it_wherever_it_ran(stubs, fail_at):
    """Row 6 is the helper's (it prices from the end), row 1 this process's: as one process,
    the rows before the error are heard, then the error itself (type and message) is raised."""
    got = _stub(stubs, "two cores", fail_at=fail_at)
    assert got["rows"] == f"ValueError: row {fail_at} failed"
    assert got["heard"] == NAMES[: fail_at + 1]
    assert got["children"] == 0


def test_a_helper_that_stalls_is_stopped_and_leaves_its_rows_to_this_process(stubs):
    """Silent for longer than parallel.STALL_FLOOR_S (here 3 s) while this process waits: the
    helper is killed (no child left) and the row it held is priced here; the table never hangs."""
    got = _stub(stubs, "two cores", hang_at=7)
    assert [row[0] for row in got["rows"]] == NAMES
    assert got["rows"][-1][2] == "parent" and got["children"] == 0
    assert 3.0 <= got["seconds"] < 30


def test_a_helper_that_dies_leaves_its_rows_to_this_process(stubs):
    got = _stub(stubs, "two cores", die_at=7)
    assert [row[0] for row in got["rows"]] == NAMES
    assert got["rows"][-1][2] == "parent" and got["children"] == 0


@pytest.mark.parametrize("case", ["no fork", "one core"])
def test_one_process_where_a_helper_would_not_help_or_cannot_run(stubs, case):
    """A fork that fails, or one core: no helper, this process prices every row."""
    got = _stub(stubs, case)
    assert [row[0] for row in got["rows"]] == NAMES
    assert {row[2] for row in got["rows"][1:]} == {"parent"} and got["children"] == 0


def test_after_a_backward_the_helper_helps_only_if_it_can_run_one(stubs):
    """After a backward on the simulated card a CUDA build's autograd has device threads, and a
    process forked then cannot run a backward (a CPU build's can): the helper finds out, says so,
    and this process prices every row (never hangs); where it can, it helps as ever."""
    got = _stub(stubs, "after a backward")
    assert [row[0] for row in got["rows"]] == NAMES and got["children"] == 0
    helped = {"parent", "helper"} if stubs["a child can run a backward"] else {"parent"}
    assert {row[2] for row in got["rows"][1:]} == helped


TABLE = """
import json, torch
from torch import nn
import batchfit
from batchfit.lever import parallel

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)
    def forward(self, x):
        return torch.relu(self.fc(x))

class Tiny(nn.Module):  # a text model of repeated blocks with its own loss: every group has a row
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(100, 64), nn.Linear(64, 100)
        self.blocks = nn.ModuleList(Block() for _ in range(4))
    def forward(self, input_ids, labels):
        x = self.emb(input_ids)
        for block in self.blocks:
            x = block(x)
        return {"loss": nn.functional.cross_entropy(self.head(x).flatten(0, 1), labels.flatten())}

ids = torch.randint(0, 100, (128,))
model, sample = Tiny(), {"input_ids": ids, "labels": ids.clone()}
def table():
    heard = []
    rows = batchfit.levers(model, sample, 1024, device="simulated", memory=400 * 2**20, on_lever=heard.append).levers
    assert heard == rows
    return [[r.name, r.fits, r.peak_at_batch, r.predicted_peak, r.detail, [t.to_dict() for t in r.trials]]
            for r in rows]
received, collect = [], parallel._collect
def counting(helper, done, block, **more):
    before = len(done)
    alive = collect(helper, done, block=block, **more)
    received.append(len(done) - before)
    return alive
parallel._collect = counting
two = table()  # first: this process has run no backward yet
parallel.cores = lambda: 1
print(json.dumps({"two": two, "one": table(), "from_helper": sum(received)}))
"""


def test_the_table_on_two_cores_is_the_table_on_one():
    """Row for row, trial for trial; and the helper priced some of them."""
    got = _python(TABLE)
    assert got["two"] == got["one"] and got["from_helper"] >= 2
    assert sum(1 for row in got["one"] if row[5]) >= 9  # rows with trials, not only "does not apply"


def _session(sid: int) -> list[int]:
    """The processes of session `sid` still alive (zombies are gone for good)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


MODEL_FILE = (
    TABLE.split("ids = torch")[0]
    + """
def tiny():
    ids = torch.randint(0, 100, (128,))
    return Tiny(), {"input_ids": ids, "labels": ids.clone()}
"""
)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads sessions from /proc")
def test_ctrl_c_at_the_terminal_stops_the_helper_and_keeps_the_verdict(tmp_path):
    """Ctrl-C goes to the whole foreground group: the command keeps its verdict and the rows
    priced (exit 130), and its helper, which was running, is gone with it."""
    (tmp_path / "models.py").write_text(MODEL_FILE)
    command = ["check", "--model", f"{tmp_path / 'models.py'}:tiny", "--memory", "400MiB", "--batch-size", "1024"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchfit", *command], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
        # SIGINT at its default action, as in a shell's foreground job (a run started with '&' ignores it).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        while "pricing the levers" not in (line := proc.stderr.readline()):
            assert line, "the command ended before pricing the levers"
        time.sleep(1.0)
        assert len(_session(proc.pid)) == 2  # the command and its helper
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "batch_size=1024 does not fit" in out + err and "interrupted while pricing the levers" in err
    assert "Traceback" not in err
    deadline = time.monotonic() + 10
    while _session(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _session(proc.pid)

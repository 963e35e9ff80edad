"""The lever table on two cores (batchfit/lever/parallel.py): the same rows in the same order as
one process, errors where one process raises them, one process where a helper cannot run.

Each case runs in a fresh interpreter: a helper is forked, and a process that has run a backward
pass on the simulated card (as pytest's has, after other tests) cannot fork one that runs another.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import needs_vision

ROOT = Path(__file__).resolve().parent.parent

STUB = """
import functools, json, os, sys, time
import torch
from batchfit.lever import parallel
from batchfit.lever.records import Lever

class Stub(parallel.Table):
    '''Rows that say which process priced them (and what first row they read).'''
    def __init__(self, fail_at=None, die_at=None, count=8):
        self.fail_at, self.die_at, self.count = fail_at, die_at, count
    def units(self, groups):
        return [parallel.Unit(functools.partial(self.row, k), reads_baseline=k % 3 == 0) for k in range(self.count)]
    def row(self, k):
        time.sleep(0.2)
        if k == self.fail_at:
            raise ValueError(f"row {k} failed")
        if k == self.die_at and os.getpid() != PARENT:
            os._exit(1)
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

PARENT = os.getpid()
got = {}
for case, stub in json.loads(sys.argv[1]):  # in this order: the last two leave no helper
    if case == "one core":
        parallel.cores, cores = (lambda: 1), parallel.cores
    if case == "after a backward":
        parallel.cores = cores
        import batchfit
        batchfit.find_batch_size(torch.nn.Linear(4, 4), torch.randn(4), device="simulated", memory=2**30)
    got[json.dumps([case, stub])] = table(**stub)
print(json.dumps(got))
"""
CASES = [
    ("two cores", {}),
    ("two cores", {"fail_at": 1}),
    ("two cores", {"fail_at": 6}),
    ("two cores", {"die_at": 7}),
    ("one core", {}),
    ("after a backward", {}),
]


def _python(script: str, *args: str) -> dict:
    """What `script` prints last, as JSON, run in a fresh interpreter on this checkout."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=600)
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


def test_a_helper_that_dies_leaves_its_rows_to_this_process(stubs):
    got = _stub(stubs, "two cores", die_at=7)
    assert [row[0] for row in got["rows"]] == NAMES
    assert got["rows"][-1][2] == "parent" and got["children"] == 0


@pytest.mark.parametrize("case", ["one core", "after a backward"])
def test_one_process_where_a_helper_would_not_help_or_cannot_run(stubs, case):
    """One core: no helper. After a backward on the simulated card, a forked helper could run
    none: it says so and this process prices every row (it never hangs)."""
    got = _stub(stubs, case)
    assert [row[0] for row in got["rows"]] == NAMES
    assert {row[2] for row in got["rows"][1:]} == {"parent"} and got["children"] == 0


TABLE = """
import json, sys, torch
import batchfit
from batchfit.lever import parallel
from torchvision.models import resnet18
model = resnet18()
sample = torch.randn(3, 32, 32)
def table():
    rows = batchfit.levers(model, sample, 16384, device="simulated", gpu="A10G").levers
    return [[r.name, r.fits, r.peak_at_batch, r.predicted_peak, r.detail, [t.to_dict() for t in r.trials]]
            for r in rows]
two = table()
parallel.cores = lambda: 1
print(json.dumps({"two": two, "one": table()}))
"""


@needs_vision
def test_the_table_on_two_cores_is_the_table_on_one():
    got = _python(TABLE)
    assert got["two"] == got["one"]
    assert sum(1 for row in got["one"] if row[5]) >= 6  # rows with trials, not only "does not apply"

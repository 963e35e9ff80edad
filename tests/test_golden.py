"""What a person reads, compared whole: the CLI's output against tests/golden/*.out.

The README's example outputs are the same files (each block follows a `<!-- golden:NAME -->`
marker), so the README cannot drift from the program. After an intended change of output:
`python -m pytest tests/test_golden.py --overwrite-golden` rewrites the files and the README.
Only the elapsed time is masked in the comparison.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from conftest import needs_hf, needs_vision, run_cli

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).with_name("golden")
README = ROOT / "README.md"
# name -> the command as a user types it (the simulated device: deterministic on any machine)
CASES = {
    "estimate_gpt2_h100": (
        "batchfit estimate --model gpt2 --seq-len 1024 --precision bf16 --optimizer adamw --gpu H100-80GB"
    ),
    "estimate_resnet50_24gib": "batchfit estimate --model resnet50 --memory 24GiB",
    "check_resnet50_a10g": "batchfit check --model resnet50 --gpu A10G --batch-size 256",
    "estimate_resnet18_a10g_compile": "batchfit estimate --model resnet18 --gpu A10G --compile",
    "lr_linear": "batchfit lr --base-lr 0.1 --base-batch-size 256 --batch-size 8192",
}
_ELAPSED = re.compile(r"elapsed: [0-9.]+ s")
_BLOCK = re.compile(r"(<!-- golden:(\w+) -->\n```\n)(.*?)(```)", re.S)


def render(name: str) -> str:
    """`$ command` and what it prints (stdout; stderr too for `check`, which answers there on exit 1)."""
    result = run_cli(*shlex.split(CASES[name])[1:])
    assert result.exit_code in (0, 1), result.output
    shown = result.stdout + (result.stderr if name.startswith("check") else "")
    return f"$ {CASES[name]}\n{shown.rstrip()}\n"


def _mask(text: str) -> str:
    return _ELAPSED.sub("elapsed: N s", text)


# Zoo models need their packages; the lr case needs none.
NEEDS = {
    "estimate_gpt2_h100": needs_hf,
    "estimate_resnet50_24gib": needs_vision,
    "check_resnet50_a10g": needs_vision,
    "estimate_resnet18_a10g_compile": needs_vision,
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=NEEDS.get(n, ())) for n in sorted(CASES)])
def test_output_matches_its_golden_file(name, request):
    actual, path = render(name), GOLDEN / f"{name}.out"
    if request.config.getoption("--overwrite-golden"):
        path.write_text(actual)
    assert _mask(actual) == _mask(path.read_text())


def test_readme_blocks_are_the_golden_files(request):
    text = README.read_text()
    if request.config.getoption("--overwrite-golden"):
        text = _BLOCK.sub(lambda m: m.group(1) + (GOLDEN / f"{m.group(2)}.out").read_text() + m.group(4), text)
        README.write_text(text)
    blocks = {m.group(2): m.group(3) for m in _BLOCK.finditer(text)}
    assert blocks, "the README has no golden blocks"
    for name, block in blocks.items():
        assert block == (GOLDEN / f"{name}.out").read_text(), f"README block {name} differs from tests/golden"

"""The front door: one list of public names, each importable, visible to type checkers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import batchfit


def test_all_lists_exactly_the_lazy_exports():
    assert set(batchfit.__all__) == {"__version__", *batchfit._EXPORTS}
    for name in batchfit.__all__:
        assert getattr(batchfit, name) is not None, name


def test_type_checking_block_names_every_export():
    text = Path(batchfit.__file__).read_text()
    block = text[text.index("if TYPE_CHECKING:") : text.index("try:")]
    for name in batchfit._EXPORTS:
        assert name in block, name


def test_import_does_not_load_torch():
    code = "import sys, batchfit; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

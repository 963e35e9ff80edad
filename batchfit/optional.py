"""The optional packages (torchvision, transformers, timm, peft): missing, or installed but broken."""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS = {"torchvision": "vision", "transformers": "hf", "timm": "timm", "peft": "lora"}


def optional(package: str, needed_for: str) -> ModuleType:
    """`import package`, or a one-line ValueError (exit 2 on the command line) that says what to do.

    A torchvision built for another torch fails at import ("operator torchvision::nms does not
    exist"): that is the environment's fault, not the user's model's, and it has a known fix.
    """
    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise ValueError(f"{needed_for} needs {package}: pip install 'batchfit[{EXTRAS[package]}]'") from error
    except Exception as error:
        import torch

        first = (str(error).strip().splitlines() or [""])[0]
        raise ValueError(
            f"{package} is installed but fails to import ({type(error).__name__}: {first}); it was built for "
            f"another torch than {torch.__version__}: install the {package} release made for it, from the same "
            f"source as torch (e.g. pip install torch=={torch.__version__.split('+')[0]} {package}==<its match>)"
        ) from error

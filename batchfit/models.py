"""Model names the CLI understands, built offline with random weights: (model, sample, loss).

torchvision names, `timm:NAME`, Hugging Face families from configs (no hub), and
`path/to/file.py:factory`. Transformers carry labels and compute their own loss, since the
loss's memory (fp32 logits over the vocabulary) is part of what is measured.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from batchfit.changes import enable_checkpointing, with_lora
from batchfit.optional import optional

IMAGE_SHAPE = (3, 224, 224)


class UserCodeError(RuntimeError):
    """The user's own model file or factory failed: a bug to fix there, not a bad option."""


@dataclass
class ModelSpec:
    """A model ready to probe, with one sample and the loss it trains with."""

    model: nn.Module
    sample: Any
    loss_fn: Callable[[Any, Any], torch.Tensor] | None
    description: str


def _classification_loss(output: torch.Tensor, batch: Any) -> torch.Tensor:
    # Cross-entropy against a constant label: the memory of a real classification step.
    logits = output if isinstance(output, torch.Tensor) else output[0]
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return nn.functional.cross_entropy(logits.float(), target)


def _token_sample(vocab: int, seq_len: int, labels: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (seq_len,))
    # No attention_mask: a full-length batch has no padding, and an all-ones mask on fake
    # tensors makes transformers build a (B, 1, T, T) mask that CUDA never materialises
    # (on a real tensor it sees the ones and passes is_causal to SDPA instead).
    sample = {"input_ids": ids}
    if labels == "lm":
        sample["labels"] = ids.clone()
    elif labels == "class":
        sample["labels"] = torch.tensor(0)
    return sample


def _hf(name: str, seq_len: int | None, place: Any = None) -> ModelSpec:
    hf = optional("transformers", f"model {name!r}")
    family = HF_FAMILIES[name]
    config = getattr(hf, family["config"])(**family.get("kwargs", {}))
    with place or contextlib.nullcontext():
        model = getattr(hf, family["model"])(config)
    seq = seq_len or family["seq_len"]
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if max_pos and seq > max_pos:
        raise ValueError(f"--seq-len {seq} is longer than {name}'s {max_pos} positions")
    if family["labels"] == "lm" and getattr(model, "loss_type", "") is None:
        # The loss transformers falls back to anyway; unset, every forward logs a warning, which
        # is also a graph break under torch.compile.
        model.loss_type = "ForCausalLM"
    sample = _token_sample(config.vocab_size, seq, family["labels"])
    if family["labels"] == "seq2seq":
        sample["labels"] = sample["input_ids"].clone()
    return ModelSpec(model, sample, None, f"{name} ({family['model']}, random weights, seq {seq})")


HF_FAMILIES: dict[str, dict[str, Any]] = {
    "bert-base": {
        "config": "BertConfig",
        "model": "BertForSequenceClassification",
        "labels": "class",
        "seq_len": 512,
    },
    "gpt2": {"config": "GPT2Config", "model": "GPT2LMHeadModel", "labels": "lm", "seq_len": 1024},
    "gpt2-medium": {
        "config": "GPT2Config",
        "model": "GPT2LMHeadModel",
        "labels": "lm",
        "seq_len": 1024,
        "kwargs": {"n_embd": 1024, "n_layer": 24, "n_head": 16},
    },
    "t5-small": {
        "config": "T5Config",
        "model": "T5ForConditionalGeneration",
        "labels": "seq2seq",
        "seq_len": 512,
        "kwargs": {"decoder_start_token_id": 0},  # T5 starts decoding from its pad token, id 0
    },
    # Llama 3.2 1B's published shape.
    "llama-1b": {
        "config": "LlamaConfig",
        "model": "LlamaForCausalLM",
        "labels": "lm",
        "seq_len": 2048,
        "kwargs": {
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 128256,
            "max_position_embeddings": 131072,
            "tie_word_embeddings": True,
        },
    },
    # Llama 2 7B's published shape (config.json of meta-llama/Llama-2-7b-hf).
    "llama-7b": {
        "config": "LlamaConfig",
        "model": "LlamaForCausalLM",
        "labels": "lm",
        "seq_len": 4096,
        "kwargs": {
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "vocab_size": 32000,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": False,
        },
    },
    # Llama 3.1 8B's published shape (config.json of meta-llama/Llama-3.1-8B).
    "llama-8b": {
        "config": "LlamaConfig",
        "model": "LlamaForCausalLM",
        "labels": "lm",
        "seq_len": 8192,
        "kwargs": {
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 128256,
            "max_position_embeddings": 131072,
            "rope_theta": 500000.0,
            "tie_word_embeddings": False,
        },
    },
}


def torchvision_names() -> list[str]:
    try:
        torchvision = optional("torchvision", "torchvision models")
    except ValueError as error:
        if isinstance(error.__cause__, ImportError):
            return []
        raise
    return sorted(torchvision.models.list_models(module=torchvision.models))


def list_models() -> list[str]:
    """Every name `build` accepts (timm: and file.py: forms aside)."""
    return sorted(HF_FAMILIES) + torchvision_names()


def _image_shape(input_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    return tuple(input_shape) if input_shape else IMAGE_SHAPE


def _from_file(reference: str, input_shape: tuple[int, ...] | None) -> ModelSpec:
    path_text, _, factory_name = reference.rpartition(":")
    path = Path(path_text)
    if not path.is_file():
        raise ValueError(f"model file {path_text!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"batchfit_user_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"model file {path_text!r} cannot be imported as Python")
    module = importlib.util.module_from_spec(spec)
    # Importable by name, as an imported module is: torch.compile looks modules up in sys.modules.
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[spec.name]
        raise UserCodeError(f"model file {path_text!r} failed to import: {_one_line(error)}") from error
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ValueError(f"model file {path_text!r} has no function {factory_name!r}")
    try:
        made = factory()
    except Exception as error:
        raise UserCodeError(f"model factory {reference} failed: {_one_line(error)}") from error
    if isinstance(made, tuple) and len(made) == 2:
        if input_shape:
            raise ValueError(f"{reference} returns its own sample: --input-shape does not apply to it")
        model, sample = made
    elif isinstance(made, nn.Module):
        if not input_shape:
            raise ValueError(f"{reference} returned a model only; give --input-shape, or return (model, sample)")
        model, sample = made, torch.randn(*input_shape)
    else:
        raise ValueError(f"{reference} returned {type(made).__name__}; return a model or (model, sample)")
    if not isinstance(model, nn.Module):
        raise ValueError(f"{reference} returned {type(model).__name__}, not a torch.nn.Module")
    return ModelSpec(model, sample, None, reference)


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"


def _text_only(name: str, input_shape: tuple[int, ...] | None) -> None:
    if input_shape:
        raise ValueError(f"--input-shape applies to image models; {name} is a text model: give --seq-len")


def _image_only(name: str, seq_len: int | None) -> None:
    if seq_len:
        raise ValueError(
            f"--seq-len applies to the text models ({', '.join(sorted(HF_FAMILIES))}); {name} takes --input-shape"
        )


def build(
    name: str, *, input_shape: tuple[int, ...] | None = None, seq_len: int | None = None, on_meta: bool = False
) -> ModelSpec:
    """Build `name` offline with random weights; ValueError naming close matches when unknown.

    `on_meta` builds zoo models without memory or initialisation (for the simulated device,
    which reads only shapes): a 1B-parameter model then costs nothing to build.
    """
    torch.manual_seed(0)
    place = torch.device("meta") if on_meta else contextlib.nullcontext()
    if name.endswith(".py") or ".py:" in name:
        if ":" not in name:
            raise ValueError(f"model file {name!r} needs a factory: path/to/file.py:factory")
        _image_only(name, seq_len)
        return _from_file(name, input_shape)
    if name in HF_FAMILIES:
        _text_only(name, input_shape)
        return _hf(name, seq_len, place)
    if name.startswith("timm:"):
        _image_only(name, seq_len)
        timm = optional("timm", f"model {name!r}")
        try:
            with place:
                model = timm.create_model(name[5:], pretrained=False)
        except RuntimeError as error:
            close = difflib.get_close_matches(name[5:], timm.list_models(), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
            raise ValueError(f"timm has no model {name[5:]!r}{hint}") from error
        cfg: dict[str, Any] = getattr(model, "pretrained_cfg", None) or {}  # timm's default input size
        shape = _image_shape(input_shape or cfg.get("input_size"))
        return ModelSpec(model, torch.randn(*shape), _classification_loss, f"{name} (random weights)")
    names = torchvision_names()
    if name in names:
        _image_only(name, seq_len)
        import torchvision

        with place:
            model = torchvision.models.get_model(name, weights=None)
        shape = _image_shape(input_shape)
        return ModelSpec(
            model,
            torch.randn(*shape),
            _classification_loss,
            f"{name} (torchvision, random weights, input {'×'.join(map(str, shape))})",
        )
    close = difflib.get_close_matches(name, list_models(), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see batchfit probe --list-models"
    raise ValueError(f"unknown model {name!r}{hint}")


def variant(spec: ModelSpec, *, checkpointing: bool = False, lora: int | None = None) -> ModelSpec:
    """The zoo model changed by a lever, for probe, estimate and check to measure it as trained:
    LoRA adapters of rank `lora` (peft; Hugging Face models) and activation checkpointing."""

    model, description = spec.model, spec.description
    if lora is not None:
        model = with_lora(model, lora)
        description += f", LoRA r={lora}"
    if checkpointing:
        wrapped, _ = enable_checkpointing(model)  # the zoo's own model: it stays checkpointed
        description += f", checkpointed ({wrapped})"
    return replace(spec, model=model, description=description)

"""One call that turns any checkpoint directory this kit understands into a ready-to-generate model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.config import GPTConfig
from model.formats.checkpoint import CheckpointError, load_fp32, read_config
from model.formats.hf import is_hf_dir, load_hf
from model.tokenizer import Tokenizer, load_tokenizer


@dataclass
class Loaded:
    """A model in eval mode with its tokenizer; kind says which checkpoint format it came from."""

    model: torch.nn.Module
    tokenizer: Tokenizer
    config: GPTConfig
    kind: str  # "fp32" or "int8"
    meta: dict[str, Any]  # the checkpoint's config.json


def load(path: str | Path, device: str = "cpu") -> Loaded:
    """Load a checkpoint directory (fp32, int8, or a Hugging Face GPT-2 directory) and its tokenizer."""
    path = Path(path)
    if is_hf_dir(path):  # a Hugging Face GPT-2 directory, converted on load to our fp32 GPT
        kind = "fp32"
        model, meta = load_hf(path)
    else:
        kind = read_config(path).get("kind", "fp32")
        if kind == "fp32":
            model, meta = load_fp32(path)
        elif kind == "int8":
            from model.formats.int8 import load_int8  # imported only when needed: it pulls in torch.ao.quantization

            if torch.device(device).type != "cpu":
                raise CheckpointError(f"{path} is an int8 checkpoint, which runs on CPU only: load it with device='cpu'.")
            model, meta = load_int8(path)
        else:
            raise CheckpointError(f"{path} holds a checkpoint of kind {kind!r}, which this version cannot load.")
    return Loaded(model=model.to(device), tokenizer=load_tokenizer(meta["tokenizer"]), config=model.config, kind=kind, meta=meta)

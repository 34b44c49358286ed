"""Helpers shared by the training-area tests: a 256-token byte tokenizer (fast, offline) and tiny configs."""

from __future__ import annotations

import tiktoken

from model.config import GPTConfig
from model.tokenizer import Tokenizer


def byte_tokenizer() -> Tokenizer:
    """One token per UTF-8 byte: a vocabulary of 256, so tiny test models stay tiny."""
    enc = tiktoken.Encoding(name="bytes", pat_str=r"(?s).", mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={})
    return Tokenizer(enc, {"name": "bytes"}, None)


def tiny_config(**kw) -> GPTConfig:
    """A 2-layer, 32-wide GPT over 256 tokens with a context of 16."""
    return GPTConfig(**{"block_size": 16, "vocab_size": 256, "n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.0, **kw})


TEXT = ("First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. "
        "First Citizen: You are all resolved rather to die than to famish? All: Resolved. resolved. "
        "First Citizen: First, you know Caius Marcius is chief enemy to the people. All: We know't, we know't.\n") * 2

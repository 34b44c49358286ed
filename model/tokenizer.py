"""Tokenizers: tiktoken encodings, described by a small JSON-able spec saved with every checkpoint."""

from __future__ import annotations

from typing import Any

import tiktoken

# GPT-2's BPE. tiktoken's "r50k_base" has exactly GPT-2's ranks, pattern and <|endoftext|> (50256),
# and unlike "gpt2" it loads offline from a single cached ranks file (TIKTOKEN_CACHE_DIR).
GPT2_ENCODING = "r50k_base"


class TokenizerError(RuntimeError):
    """A tokenizer could not be loaded; the message says what to do."""


class Tokenizer:
    """A tiktoken encoding plus the spec that rebuilds it. Special tokens in text are plain text."""

    def __init__(self, enc: tiktoken.Encoding, spec: dict[str, Any], eot_token: int | None):
        self.enc = enc
        self.spec = spec
        self.eot_token = eot_token

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def n_vocab(self) -> int:
        return self.enc.n_vocab

    def encode(self, text: str) -> list[int]:
        """Token ids of text; a literal "<|endoftext|>" in user text is encoded as ordinary text."""
        return self.enc.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids, errors="replace")

    def decode_bytes(self, ids: list[int]) -> bytes:
        """Raw bytes of ids: streaming decoders use this to hold back a split UTF-8 character."""
        return self.enc.decode_bytes(ids)


def _base_encoding(name: str) -> tiktoken.Encoding:
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # tiktoken raises network, file and value errors alike
        raise TokenizerError(
            f"Could not load the tiktoken vocabulary {name!r} ({type(e).__name__}); set TIKTOKEN_CACHE_DIR "
            "to a folder holding its cached ranks file (for example ../shared/tiktoken-cache) or go online once."
        ) from e


def gpt2() -> Tokenizer:
    """GPT-2 BPE (50257 tokens)."""
    enc = _base_encoding(GPT2_ENCODING)
    return Tokenizer(enc, {"name": "gpt2"}, enc.eot_token)


def load_tokenizer(spec: dict[str, Any] | str) -> Tokenizer:
    """Rebuild a tokenizer from its spec (as saved in config.json) or its name."""
    if isinstance(spec, str):
        spec = {"name": spec}
    name = spec.get("name")
    if name == "gpt2":
        return gpt2()
    raise TokenizerError(f"Unknown tokenizer {name!r}; this version knows: gpt2.")


def padded_vocab_size(n_vocab: int, multiple: int = 64) -> int:
    """Vocabulary size rounded up to a multiple of 64, which matmul kernels prefer."""
    return ((n_vocab + multiple - 1) // multiple) * multiple

"""Tokenizers: tiktoken encodings, described by a small JSON-able spec saved with every checkpoint.

Three kinds, all able to encode any text:
  gpt2          GPT-2's BPE as is (50257 tokens).
  gpt2-compact  the GPT-2 tokens one training text uses (at least min_count times), the pieces BPE passes through
                to build them and the 256 single bytes, renumbered densely in GPT-2 rank order; with min_count 1 it
                encodes the training text into exactly GPT-2's tokens, with a far smaller (cheaper) output layer;
                a higher min_count spells rare words with shorter, better-trained pieces. The spec lists the kept ranks.
  bytes         256 single-byte tokens, no merges: char-level for ASCII text, needs no vocabulary file.

GPT-2's BPE ranks ship inside this package (gpt2.tiktoken, from OpenAI's MIT-licensed GPT-2), so no tokenizer
needs the network or a tiktoken cache.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

import tiktoken

# GPT-2's BPE ranks (the same file, and hash, as tiktoken's "r50k_base"); its <|endoftext|> comes after them.
VOCAB_FILE = Path(__file__).resolve().parent / "gpt2.tiktoken"
VOCAB_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_EOT = 50256
EOT = "<|endoftext|>"
NAMES = ("gpt2", "gpt2-compact", "bytes")
# GPT-2's pre-tokenisation pattern (contractions, letters, numbers, other symbols, whitespace).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


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


@functools.cache
def _gpt2_from(path: Path) -> tiktoken.Encoding:
    """GPT-2's BPE built from the ranks file at path, checked against VOCAB_SHA256 (once per file and process)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TokenizerError(f"Could not read GPT-2's vocabulary file {path} ({e}); "
                             "restore it (git checkout model/gpt2.tiktoken) or reinstall smallgpt.") from e
    if hashlib.sha256(data).hexdigest() != VOCAB_SHA256:
        raise TokenizerError(f"GPT-2's vocabulary file {path} is damaged (its sha256 is not {VOCAB_SHA256[:16]}...); "
                             "restore it (git checkout model/gpt2.tiktoken) or reinstall smallgpt.")
    # tiktoken's format, one "base64(token) rank" per line. Not tiktoken.load.load_tiktoken_bpe: it copies every file it
    # reads into its cache folder ($TIKTOKEN_CACHE_DIR, else a temp folder), and skips the hash check when that is off.
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}
    return tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: GPT2_EOT},
                             explicit_n_vocab=GPT2_EOT + 1)


def _gpt2_encoding() -> tiktoken.Encoding:
    """GPT-2's BPE from the packaged vocabulary file."""
    return _gpt2_from(VOCAB_FILE)


def gpt2() -> Tokenizer:
    """GPT-2 BPE (50257 tokens)."""
    enc = _gpt2_encoding()
    return Tokenizer(enc, {"name": "gpt2"}, enc.eot_token)


def byte_level() -> Tokenizer:
    """256 single-byte tokens plus <|endoftext|> (256): any text, tiny output layer, no vocabulary file."""
    ranks = {bytes([i]): i for i in range(256)}
    enc = tiktoken.Encoding("bytes", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: 256})
    return Tokenizer(enc, {"name": "bytes"}, 256)


def _gpt2_ranks(enc: tiktoken.Encoding) -> dict[bytes, int]:
    """GPT-2's mergeable tokens as {bytes: rank}, read through tiktoken's public API."""
    return {enc.decode_single_token_bytes(r): r for r in range(enc.eot_token)}


def bpe_merge(token: bytes, ranks: dict[bytes, int], limit: int | None = None) -> tuple[list[bytes], set[bytes]]:
    """Byte-pair merging of token's bytes (the lowest-rank pair first; only ranks below limit, when given) until no
    pair merges: the parts left, and every piece passed through on the way (the single bytes included)."""
    parts = [token[i:i + 1] for i in range(len(token))]
    seen = set(parts)
    while len(parts) > 1:
        best, best_rank = -1, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (limit is None or r < limit) and (best_rank is None or r < best_rank):
                best, best_rank = i, r
        if best < 0:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
        seen.add(parts[best])
    return parts, seen


def _merge_path(token: bytes, ranks: dict[bytes, int]) -> set[bytes]:
    """Every piece byte-pair merging passes through to build `token`."""
    return bpe_merge(token, ranks)[1]


def compact_ranks(text: str, min_count: int = 1) -> list[int]:
    """GPT-2 ranks a compact vocabulary for `text` keeps: tokens used at least min_count times, their merge
    paths, all 256 bytes. Rarer tokens are then spelled with their (better trained) pieces."""
    enc = _gpt2_encoding()
    ranks = _gpt2_ranks(enc)
    keep = {ranks[bytes([i])] for i in range(256)}
    counts = Counter(enc.encode_ordinary(text))
    for rank in (r for r, n in counts.items() if n >= min_count):
        keep.update(ranks[piece] for piece in _merge_path(enc.decode_single_token_bytes(rank), ranks))
    return sorted(keep)


def gpt2_compact(kept_ranks: list[int]) -> Tokenizer:
    """GPT-2 BPE restricted to kept_ranks, renumbered densely in rank order, <|endoftext|> last."""
    enc = _gpt2_encoding()
    kept = sorted(set(int(r) for r in kept_ranks))
    ranks = {enc.decode_single_token_bytes(r): new for new, r in enumerate(kept) if 0 <= r < enc.eot_token}
    if len(ranks) != len(kept) or any(bytes([i]) not in ranks for i in range(256)):
        raise TokenizerError("The gpt2-compact spec is damaged (ranks out of range or single bytes missing); "
                             "retrain the model or restore its config.json.")
    eot = len(ranks)
    compact = tiktoken.Encoding("gpt2-compact", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: eot})
    return Tokenizer(compact, {"name": "gpt2-compact", "ranks": kept}, eot)


def build_tokenizer(name: str, train_text: str, min_count: int = 1) -> Tokenizer:
    """A new tokenizer of kind `name` for training on train_text (only gpt2-compact depends on the text)."""
    if name == "gpt2-compact":
        return gpt2_compact(compact_ranks(train_text, min_count))
    return load_tokenizer(name)


def load_tokenizer(spec: dict[str, Any] | str) -> Tokenizer:
    """Rebuild a tokenizer from its spec (as saved in config.json) or its name."""
    if isinstance(spec, str):
        spec = {"name": spec}
    name = spec.get("name")
    if name == "gpt2":
        return gpt2()
    if name == "bytes":
        return byte_level()
    if name == "gpt2-compact":
        if not isinstance(spec.get("ranks"), list):
            raise TokenizerError("The gpt2-compact spec lacks its list of kept ranks; retrain the model or restore its config.json.")
        return gpt2_compact(spec["ranks"])
    raise TokenizerError(f"Unknown tokenizer {name!r}; this version knows: {', '.join(NAMES)}.")


def padded_vocab_size(n_vocab: int, multiple: int = 64) -> int:
    """Vocabulary size rounded up to a multiple of 64, which matmul kernels prefer."""
    return ((n_vocab + multiple - 1) // multiple) * multiple

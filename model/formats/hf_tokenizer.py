"""Our tiktoken vocabularies written as Hugging Face GPT-2 tokenizer files (vocab.json, merges.txt), so an export is usable offline.

A tiktoken encoding stores {token bytes: rank}; GPT-2's files store each token as printable characters (one per byte)
plus the ordered list of merges. The merge that makes a token is found by running byte-pair merging over its bytes
with only lower-ranked tokens allowed: exactly two pieces remain.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from model import atomic
from model.tokenizer import Tokenizer, TokenizerError, bpe_merge, load_tokenizer

EOT_TEXT = "<|endoftext|>"
VOCAB = "vocab.json"
MERGES = "merges.txt"
TOKENIZER_CONFIG = "tokenizer_config.json"
PLACEHOLDER = "<|unused_{}|>"  # vocab.json's name for an embedding row past the tokenizer's tokens


def byte_chars() -> list[str]:
    """GPT-2's reversible byte -> character table: printable Latin-1 bytes stand for themselves, the rest map above U+00FF."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shifted = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


def merge_pair(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two pieces byte-pair merging joins last to build `token` (lowest-rank pair first, ranks below the token's own)."""
    parts, _ = bpe_merge(token, ranks, limit=ranks[token])
    if len(parts) != 2:
        raise TokenizerError(f"Token {token!r} cannot be built by merging lower-ranked tokens; this vocabulary is not a BPE.")
    return parts[0], parts[1]


@functools.lru_cache(maxsize=4)
def vocab_and_merges(spec_json: str) -> tuple[str, str]:
    """vocab.json and merges.txt contents of the tokenizer with this JSON spec (cached: GPT-2's 50,000 merges take a second)."""
    tokenizer = load_tokenizer(json.loads(spec_json))
    enc = tokenizer.enc
    ranks = {enc.decode_single_token_bytes(i): i for i in range(tokenizer.n_vocab) if i != tokenizer.eot_token}
    chars = byte_chars()
    text = lambda piece: "".join(chars[b] for b in piece)
    vocab = {text(piece): rank for piece, rank in ranks.items()}
    if tokenizer.eot_token is not None:
        vocab[EOT_TEXT] = tokenizer.eot_token
    merges = [merge_pair(piece, ranks) for piece, _ in sorted(ranks.items(), key=lambda kv: kv[1]) if len(piece) > 1]
    return json.dumps(vocab, ensure_ascii=False), "#version: 0.2\n" + "".join(f"{text(a)} {text(b)}\n" for a, b in merges)


def padded_vocab(vocab_json: str, size: int) -> str:
    """vocab.json with placeholder tokens "<|unused_ID|>" for the ids from its length up to size (the embedding's rows,
    padded for matmul speed), so converters that want one string per row (CTranslate2) take it. No merge builds a
    placeholder, so it never comes out of encoding."""
    vocab = json.loads(vocab_json)
    vocab.update({PLACEHOLDER.format(i): i for i in range(len(vocab), size)})
    return json.dumps(vocab, ensure_ascii=False)


def write_tokenizer_files(tokenizer: Tokenizer, out_dir: str | Path, max_length: int, vocab_size: int) -> None:
    """Write vocab.json (vocab_size entries, one per embedding row), merges.txt and tokenizer_config.json that make
    transformers.GPT2Tokenizer(Fast) encode as ours."""
    out_dir = Path(out_dir)
    vocab, merges = vocab_and_merges(json.dumps(tokenizer.spec, sort_keys=True))
    vocab = padded_vocab(vocab, vocab_size)
    specials = {}
    if tokenizer.eot_token is not None:
        specials = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    atomic.write_text(out_dir / VOCAB, vocab)
    atomic.write_text(out_dir / MERGES, merges)
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": max_length, "add_prefix_space": False, **specials}
    atomic.write_text(out_dir / TOKENIZER_CONFIG, json.dumps(config, indent=2) + "\n")


def token_strings(hf_dir: str | Path) -> list[str]:
    """The strings of an export's vocab.json in id order: how tools that take tokens as text (CTranslate2) spell our ids."""
    vocab = json.loads((Path(hf_dir) / VOCAB).read_text(encoding="utf-8"))
    return sorted(vocab, key=vocab.__getitem__)

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
TOKENIZER_JSON = "tokenizer.json"  # the tokenizers library's one-file format (transformers, transformers.js, tokenizers.js)
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


def tokenizer_json(tokenizer: Tokenizer, vocab_size: int) -> str:
    """tokenizer.json (the tokenizers library's format) that encodes as tokenizer.encode does: GPT-2's byte-level
    pre-tokenizer (its regex matches tiktoken's pattern piece for piece), a BPE over vocab.json's tokens and merges.txt's
    merges. <|endoftext|> has its id in the vocabulary but is no added token, so that text in a prompt is plain text,
    as in tiktoken's encode_ordinary."""
    vocab, merges = vocab_and_merges(json.dumps(tokenizer.spec, sort_keys=True))
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "", "end_of_word_suffix": "",
             "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
             "vocab": json.loads(padded_vocab(vocab, vocab_size)), "merges": merges.splitlines()[1:]}
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": byte_level, "post_processor": {**byte_level, "trim_offsets": False}, "decoder": byte_level,
            "model": model}
    return json.dumps(spec, ensure_ascii=False)


def write_tokenizer_files(tokenizer: Tokenizer, out_dir: str | Path, max_length: int, vocab_size: int) -> None:
    """Write vocab.json (vocab_size entries, one per embedding row), merges.txt, tokenizer.json and tokenizer_config.json
    that make transformers.GPT2Tokenizer(Fast) (and transformers.js) encode as ours."""
    out_dir = Path(out_dir)
    vocab, merges = vocab_and_merges(json.dumps(tokenizer.spec, sort_keys=True))
    vocab = padded_vocab(vocab, vocab_size)
    atomic.write_text(out_dir / VOCAB, vocab)
    atomic.write_text(out_dir / MERGES, merges)
    atomic.write_text(out_dir / TOKENIZER_JSON, tokenizer_json(tokenizer, vocab_size))
    atomic.write_text(out_dir / TOKENIZER_CONFIG, json.dumps(tokenizer_config(tokenizer, max_length), indent=2) + "\n")


def tokenizer_config(tokenizer: Tokenizer, max_length: int) -> dict:
    """tokenizer_config.json: GPT-2's tokenizer class, the context length, <|endoftext|> as its special tokens."""
    specials = {}
    if tokenizer.eot_token is not None:
        specials = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    return {"tokenizer_class": "GPT2Tokenizer", "model_max_length": max_length, "add_prefix_space": False, **specials}


def token_strings(hf_dir: str | Path) -> list[str]:
    """The strings of an export's vocab.json in id order: how tools that take tokens as text (CTranslate2) spell our ids."""
    vocab = json.loads((Path(hf_dir) / VOCAB).read_text(encoding="utf-8"))
    return sorted(vocab, key=vocab.__getitem__)

"""Training data: read and check the user's text, tokenise it once into cached token files, draw batches.

What text can be trained on is decided here, for train.py and the app alike: UTF-8 text (not empty, no NUL bytes, at
most 1% control characters) long enough that its validation split, the last 10%, holds one training window plus one
token (so the training split holds about nine windows).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model import atomic
from model.paths import what_is
from model.tokenizer import Tokenizer, build_tokenizer, load_tokenizer

BUNDLED = "the bundled Tiny Shakespeare (input.txt)"  # what to train on instead: offline, and one click in the app
VAL_FRACTION = 0.1  # the last 10% of the text is the validation split, as in nanoGPT
CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")  # control characters other than tab, newlines and form feed
MAX_CONTROL_SHARE = 0.01  # text with more of them than this is taken for a binary file
SURE_CHARS_PER_TOKEN = 6  # the kit's tokenizers average fewer characters a token on real text (English: 3 to 4)


class DataError(ValueError):
    """The training text cannot be used; the message says why and what to do."""


def read_text(path: str | Path) -> str:
    """The text of a UTF-8 file, or a DataError naming the problem (missing, empty, not UTF-8)."""
    path = Path(path)
    problem = what_is(path)
    if problem == "does not exist":
        raise DataError(f"No training text at {path}: pass --data PATH of a UTF-8 text file, or train on {BUNDLED}.")
    if problem:
        raise DataError(f"The training text {path} {problem}: pass --data PATH of a UTF-8 text file.")
    raw = path.read_bytes()
    return decode_text(raw, str(path))


def decode_text(raw: bytes, where: str = "The text") -> str:
    """Decode UTF-8 bytes, or raise a DataError: not UTF-8 (giving the offset of the first bad byte), empty, or
    binary (NUL bytes, or more than 1% control characters)."""
    binary = "{} looks like a binary file, not text (it holds {}): use a plain-text (.txt) file saved as UTF-8."
    if b"\x00" in raw:
        raise DataError(binary.format(where, "NUL bytes"))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{where} is not valid UTF-8: byte 0x{raw[e.start]:02x} at offset {e.start} cannot be decoded; "
            "convert the file to UTF-8 (e.g. iconv -t UTF-8)."
        ) from None
    if not text.strip():
        raise DataError(f"{where} is empty: put some text in it, or train on {BUNDLED}.")
    controls = len(CONTROL.findall(text))
    if controls > MAX_CONTROL_SHARE * len(text):
        raise DataError(binary.format(where, f"{controls:,} control characters in {len(text):,}"))
    return text


def sure_length(window: int) -> int:
    """The characters from which a text surely holds enough tokens to train with windows of `window` tokens."""
    return math.ceil((window + 1) * SURE_CHARS_PER_TOKEN / VAL_FRACTION)


def too_short(chars: int, val_tokens: int, window: int) -> DataError:
    """The error of a text whose validation split holds fewer than window + 1 tokens, saying how much more text to add:
    enough for sure_length(window) characters, or more where this text's own tokens are longer than usual."""
    need = max(sure_length(window), math.ceil(chars * (window + 1) / max(val_tokens, 1)))
    more = need - chars
    size = f"{more / 1000:.1f} KB" if more < 1_000_000 else f"{more / 1_000_000:.1f} MB"  # a character of plain text: a byte
    return DataError(f"The text has {chars:,} characters, too few to train on: add {more:,} more characters "
                     f"(about {size}) of text.")


def check_length(text: str, window: int, tokenizer: str, min_count: int) -> None:
    """Raise the DataError TokenData.check would for a text too short to train with windows of `window` tokens and a
    tokenizer of this name (built as training_tokenizer builds it); a text of sure_length(window) characters or more
    passes without being tokenised. For the app, which answers before it starts train.py."""
    if len(text) >= sure_length(window):
        return
    val_tokens = len(text_tokenizer(tokenizer, text, min_count).encode(split_text(text)[1]))
    if val_tokens < window + 1:
        raise too_short(len(text), val_tokens, window)


def split_text(text: str, val_fraction: float = VAL_FRACTION) -> tuple[str, str]:
    """Train and validation text: the last val_fraction of the characters is validation."""
    n = int(len(text) * (1.0 - val_fraction))
    return text[:n], text[n:]


@dataclass
class TokenData:
    """Token ids of both splits (memory-mapped) and how many characters each split holds."""

    train: np.ndarray
    val: np.ndarray
    train_chars: int
    val_chars: int

    def check(self, block_size: int) -> None:
        """Raise a DataError when a split is too short to train or validate on with this context."""
        if len(self.val) < block_size + 1:
            raise too_short(self.train_chars + self.val_chars, len(self.val), block_size)
        if len(self.train) < block_size + 1:
            raise DataError(
                f"The training split has {len(self.train)} tokens, fewer than one window of "
                f"{block_size + 1}: use a longer text or a smaller --block-size."
            )

    def short_val_warning(self, block_size: int) -> str | None:
        """A warning when the validation split is shorter than one context window: its loss then rests on few tokens."""
        if len(self.val) - 1 >= block_size:
            return None
        return (f"the validation split is only {len(self.val)} tokens ({self.val_chars} characters), shorter than one "
                f"{block_size}-token context window, so its validation number means little; use a longer text to measure it.")


def _dtype_for(n_vocab: int) -> np.dtype:
    return np.dtype(np.uint16) if n_vocab <= 65536 else np.dtype(np.uint32)


def prepare(text_path: str | Path, cache_dir: str | Path, tokenizer: Tokenizer) -> TokenData:
    """Tokenise the text into cache_dir/{train,val}.bin once; re-tokenise when text or tokenizer change."""
    text_path, cache_dir = Path(text_path), Path(cache_dir)
    if not text_path.is_file():
        read_text(text_path)  # raises the missing-file error
    raw = text_path.read_bytes()
    key = {"sha256": hashlib.sha256(raw).hexdigest(), "tokenizer": tokenizer.spec}
    meta_path = cache_dir / "meta.json"
    dtype = _dtype_for(tokenizer.n_vocab)
    meta = None
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            meta = None
    if not (meta and meta.get("key") == key and all((cache_dir / f"{s}.bin").is_file() for s in ("train", "val"))):
        meta_path.unlink(missing_ok=True)  # until the new meta is written, the cache is not valid for anything
        text = decode_text(raw, str(text_path))
        train_text, val_text = split_text(text)
        sizes = {}
        for split, part in (("train", train_text), ("val", val_text)):
            ids = np.array(tokenizer.encode(part), dtype=dtype)
            atomic.write_bytes(cache_dir / f"{split}.bin", ids.tobytes())
            sizes[split] = len(ids)
        meta = {"key": key, "dtype": dtype.name, "train_chars": len(train_text), "val_chars": len(val_text),
                "train_tokens": sizes["train"], "val_tokens": sizes["val"]}
        atomic.write_text(meta_path, json.dumps(meta, indent=2))

    def load(split: str) -> np.ndarray:
        path = cache_dir / f"{split}.bin"
        if path.stat().st_size == 0:
            return np.zeros(0, dtype=np.dtype(meta["dtype"]))
        return np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")

    return TokenData(load("train"), load("val"), int(meta["train_chars"]), int(meta["val_chars"]))


def batch_starts(n_tokens: int, batch_size: int, block_size: int, generator: torch.Generator) -> list[int]:
    """The starts of batch_size random windows of block_size (+1 target) tokens in a split of n_tokens."""
    return torch.randint(n_tokens - block_size, (batch_size,), generator=generator).tolist()


def get_batch(data: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator,
              device: str | torch.device = "cpu", starts: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """batch_size random windows (or those of starts): inputs and the next-token targets, each (batch_size, block_size)."""
    ix = batch_starts(len(data), batch_size, block_size, generator) if starts is None else starts
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def val_windows(data: np.ndarray, block_size: int, max_windows: int | None = None) -> list[tuple[int, int]]:
    """(start, length) windows that cover the whole split once: every token after the first is predicted.

    With max_windows, only that many evenly spaced ones of them (a quick estimate)."""
    n_pred = len(data) - 1
    windows = [(s, min(block_size, n_pred - s)) for s in range(0, n_pred, block_size)]
    if max_windows is not None and len(windows) > max_windows:
        pick = np.linspace(0, len(windows) - 1, max_windows).round().astype(int)
        windows = [windows[i] for i in sorted(set(pick.tolist()))]
    return windows


def training_tokenizer(name: str, text_path: str | Path, min_count: int = 1) -> Tokenizer:
    """The tokenizer a new run trains with: gpt2-compact is built from the training split of text_path (read only
    then); the others are loaded by name."""
    return text_tokenizer(name, read_text(text_path) if name == "gpt2-compact" else "", min_count)


def text_tokenizer(name: str, text: str, min_count: int = 1) -> Tokenizer:
    """The tokenizer a new run on this text trains with (gpt2-compact: built from its training split)."""
    if name == "gpt2-compact":  # its spec lists the GPT-2 ranks the training split uses
        return build_tokenizer(name, split_text(text)[0], min_count)
    return load_tokenizer(name)

"""Training data: text checks with actionable messages, the train/val split, the token cache, batches, windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from train_support import TEXT, byte_tokenizer

from model.training.data import DataError, TokenData, decode_text, get_batch, prepare, read_text, split_text, val_windows


def test_split_is_last_tenth():
    train, val = split_text("abcdefghij" * 10)
    assert len(train) == 90 and len(val) == 10
    assert train + val == "abcdefghij" * 10


def test_missing_empty_and_non_utf8_text(tmp_path):
    with pytest.raises(DataError, match="No training text at .*curl -o input.txt https://"):
        read_text(tmp_path / "input.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="is empty"):
        read_text(tmp_path / "empty.txt")
    with pytest.raises(DataError, match="byte 0xff at offset 3 cannot be decoded"):
        decode_text(b"abc\xffdef", "x.txt")


def test_prepare_caches_tokens_and_reuses_them(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT)
    tok = byte_tokenizer()
    data = prepare(tmp_path / "t.txt", tmp_path / "cache", tok)
    train, val = split_text(TEXT)
    assert data.train_chars == len(train) and data.val_chars == len(val)
    assert bytes(data.train.astype(np.uint8)).decode() == train and bytes(data.val.astype(np.uint8)).decode() == val
    stamp = (tmp_path / "cache" / "train.bin").stat().st_mtime_ns
    prepare(tmp_path / "t.txt", tmp_path / "cache", tok)
    assert (tmp_path / "cache" / "train.bin").stat().st_mtime_ns == stamp  # unchanged text: not re-tokenised
    (tmp_path / "t.txt").write_text(TEXT + "more")
    assert prepare(tmp_path / "t.txt", tmp_path / "cache", tok).train_chars == len(split_text(TEXT + "more")[0])


def test_splits_too_short(tmp_path):
    (tmp_path / "t.txt").write_text("x" * 50)
    data = prepare(tmp_path / "t.txt", tmp_path / "c1", byte_tokenizer())
    with pytest.raises(DataError, match="fewer than one window of 65: use a longer text or a smaller --block-size"):
        data.check(64)
    (tmp_path / "u.txt").write_text("y" * 10)
    data = prepare(tmp_path / "u.txt", tmp_path / "c2", byte_tokenizer())
    with pytest.raises(DataError, match="validation split .* too few to measure"):
        data.check(4)


def test_batches_are_next_token_windows():
    data = np.arange(100, dtype=np.uint16)
    x, y = get_batch(data, 5, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 8) and x.dtype == torch.int64
    assert torch.equal(y, x + 1)  # consecutive ids: each target is the next token


def test_val_windows_predict_every_token_once():
    windows = val_windows(np.zeros(21), 8)
    assert windows == [(0, 8), (8, 8), (16, 4)]
    assert sum(n for _, n in windows) == 20


def test_a_validation_split_shorter_than_one_window_is_flagged():
    one_window = TokenData(np.zeros(100), np.zeros(17), 100, 17)  # 16 predicted tokens: one window of 16
    assert one_window.short_val_warning(16) is None
    short = TokenData(np.zeros(100), np.zeros(16), 100, 40).short_val_warning(16)
    assert short.startswith("the validation split is only 16 tokens (40 characters), shorter than one 16-token context window")

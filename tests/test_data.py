"""Training data: text checks with actionable messages, the train/val split, the token cache, batches, windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from train_support import TEXT, byte_tokenizer

from model.training.data import (
    DataError,
    TokenData,
    check_length,
    decode_text,
    get_batch,
    prepare,
    read_text,
    split_text,
    sure_length,
    too_short,
    val_windows,
)
from model.training.plan import resolve
from model.webapp.training_job import JobError, check_text


def test_split_is_last_tenth():
    train, val = split_text("abcdefghij" * 10)
    assert len(train) == 90 and len(val) == 10
    assert train + val == "abcdefghij" * 10


def test_missing_empty_and_non_utf8_text(tmp_path):
    with pytest.raises(DataError) as missing:
        read_text(tmp_path / "input.txt")
    assert str(missing.value) == (f"No training text at {tmp_path / 'input.txt'}: pass --data PATH of a UTF-8 text file, "
                                  "or train on the bundled Tiny Shakespeare (input.txt).")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError) as empty:
        read_text(tmp_path / "empty.txt")
    assert str(empty.value) == (f"{tmp_path / 'empty.txt'} is empty: put some text in it, or train on the bundled Tiny "
                                "Shakespeare (input.txt).")  # no address to fetch it from: it ships with the project
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
    with pytest.raises(DataError) as short:
        data.check(64)
    assert str(short.value) == "The text has 50 characters, too few to train on: add 3,850 more characters (about 3.9 KB) of text."
    data.check(4)  # the validation split holds one window of 4 plus one token


def test_one_rule_for_what_text_is_trainable():
    """Binary (NUL bytes, over 1% control characters) is refused; text is refused below the length whose validation split
    holds a window plus one token, in tokens of the run's tokenizer: the app's early check says what the trainer would."""
    with pytest.raises(DataError) as nul:
        decode_text(b"abc\x00" * 1000, "x.txt")
    assert str(nul.value) == ("x.txt looks like a binary file, not text (it holds NUL bytes): use a plain-text (.txt) file "
                              "saved as UTF-8.")
    with pytest.raises(DataError, match=r"^x.txt looks like a binary file, not text \(it holds 2,000 control characters in "
                                        r"5,000\): use a plain-text"):
        decode_text(b"\x01\x1babc" * 1000, "x.txt")
    assert decode_text(b"\t\f\x1b" + b"a" * 300, "x.txt")  # tabs, form feeds and a rare escape are text
    assert sure_length(128) == 7_740 and sure_length(16) == 1_020
    with pytest.raises(DataError, match=r"^The text has 300 characters, too few to train on: add 7,440 more characters \(about "
                                        r"7.4 KB\) of text.$"):  # 7,740 in all: enough for any text of usual tokens
        check_length(TEXT[:300], 128, "bytes", 1)
    check_length(TEXT[:300], 16, "bytes", 1)  # 30 validation bytes hold a window of 16 plus one
    with pytest.raises(DataError, match="The text has 100 characters, too few to train on: add 920 more characters"):
        check_length(TEXT[:100], 16, "bytes", 1)
    check_length("\x01" * 7_740, 128, "bytes", 1)  # long enough: not tokenised (decode_text refuses it as binary)


def test_a_text_of_unusually_long_tokens_is_told_to_grow_by_its_own_measure():
    """Past sure_length the text's own characters per validation token say how much more it needs: never 0 or less."""
    assert "add 12,640 more characters (about 12.6 KB)" in str(too_short(8_000, 50, 128))  # 8,000 x 129 / 50 in all
    assert "add 1,016,000 more characters (about 1.0 MB)" in str(too_short(8_000, 0, 127))  # no validation token: 128 times as much


def test_batches_are_next_token_windows():
    data = np.arange(100, dtype=np.uint16)
    x, y = get_batch(data, 5, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 8) and x.dtype == torch.int64
    assert torch.equal(y, x + 1)  # consecutive ids: each target is the next token


def test_val_windows_predict_every_token_once():
    windows = val_windows(np.zeros(21), 8)
    assert windows == [(0, 8), (8, 8), (16, 4)]
    assert sum(n for _, n in windows) == 20


def test_a_validation_split_shorter_than_the_model_s_context_is_flagged():
    """Finetuning a long-context model on windows of fewer tokens: validation is still scored in its context."""
    one_window = TokenData(np.zeros(100), np.zeros(17), 100, 17)  # 16 predicted tokens: one window of 16
    assert one_window.short_val_warning(16) is None
    short = TokenData(np.zeros(100), np.zeros(16), 100, 40).short_val_warning(16)
    assert short.startswith("the validation split is only 16 tokens (40 characters), shorter than one 16-token context window")


@pytest.mark.parametrize("size", [300, 1500, 2000, 7740])
@pytest.mark.parametrize("damage", ["", "nul", "control"])
def test_train_py_and_the_app_agree_on_what_text_is_trainable(size, damage, shakespeare_path, tmp_path):
    """The same text gets the same answer from train.py's data preparation (default run) and the app's Train tab."""
    text = shakespeare_path.read_text(encoding="utf-8")[:size]
    text = {"": text, "nul": text[:-1] + "\0", "control": "\x1b" * (size // 50) + text[size // 50:]}[damage]
    path = tmp_path / "input.txt"
    path.write_text(text, encoding="utf-8")
    answers = []
    try:
        check_text(text.encode("utf-8"))
        answers.append(None)
    except JobError as e:
        answers.append(str(e).replace("The text looks", "PATH looks"))
    try:
        resolve({"data": str(path), "out_dir": str(tmp_path / "out"), "device": "cpu"})
        answers.append(None)
    except DataError as e:
        answers.append(str(e).replace(f"{path} looks", "PATH looks"))
    assert answers[0] == answers[1], answers
    assert (answers[0] is None) == (size >= 2000 and not damage), answers

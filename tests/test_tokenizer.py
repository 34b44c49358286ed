"""Tokenizers: GPT-2, the compact GPT-2 vocabulary of one text, byte level; specs rebuild them offline."""

from __future__ import annotations

import json
import shutil

import pytest

from model import tokenizer as tk
from model.training.data import read_text, split_text

SAMPLE = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
          "MENENIUS: I'll tell you; we're 2,000 strong -- aren't we? 'Tis so.\n")
UNICODE = "naïve café – 日本語 🌍👩‍👩‍👧 Ωμέγα\t\r\n\x00 <|endoftext|> \U0010ffff" + "z" * 300


def test_compact_encodes_text_exactly_as_gpt2(gpt2_tokenizer):
    tok = tk.build_tokenizer("gpt2-compact", SAMPLE)
    kept = tok.spec["ranks"]
    assert tok.n_vocab == len(kept) + 1 < 1000
    assert [kept[i] for i in tok.encode(SAMPLE)] == gpt2_tokenizer.encode(SAMPLE)


def test_compact_round_trips_any_text_and_rebuilds_from_json_spec(gpt2_tokenizer):
    tok = tk.build_tokenizer("gpt2-compact", SAMPLE)
    assert tok.decode(tok.encode(UNICODE)) == UNICODE
    rebuilt = tk.load_tokenizer(json.loads(json.dumps(tok.spec)))
    assert rebuilt.encode(UNICODE) == tok.encode(UNICODE)
    assert rebuilt.eot_token == tok.eot_token == tok.n_vocab - 1


def test_merge_path_keeps_intermediate_pieces(gpt2_tokenizer):
    ranks = tk._gpt2_ranks(gpt2_tokenizer.enc)
    path = tk._merge_path(b" Citizen", ranks)
    assert b" Citizen" in path and b" " in path and b"C" in path
    assert len(path) > len(b" Citizen")  # intermediate merges, not just the bytes and the result


def test_compact_of_whole_corpus_matches_gpt2(gpt2_tokenizer, shakespeare_path):
    train, val = split_text(read_text(shakespeare_path))
    tok = tk.build_tokenizer("gpt2-compact", train)
    kept = tok.spec["ranks"]
    assert 256 < tok.n_vocab < 15000
    assert [kept[i] for i in tok.encode(train)] == gpt2_tokenizer.encode(train)
    assert tok.decode(tok.encode(val)) == val


def test_compact_min_count_drops_rare_tokens_and_still_encodes_everything(gpt2_tokenizer, shakespeare_path):
    train, val = split_text(read_text(shakespeare_path))
    full = tk.build_tokenizer("gpt2-compact", train)
    frequent = tk.build_tokenizer("gpt2-compact", train, min_count=5)
    assert 256 < frequent.n_vocab < full.n_vocab * 0.6
    assert set(frequent.spec["ranks"]) < set(full.spec["ranks"])
    ids = frequent.encode(train)
    assert len(full.encode(train)) < len(ids) < 1.1 * len(full.encode(train))  # rare words take a few more pieces
    assert frequent.decode(ids) == train and frequent.decode(frequent.encode(val)) == val
    assert frequent.decode(frequent.encode(UNICODE)) == UNICODE
    rebuilt = tk.load_tokenizer(json.loads(json.dumps(frequent.spec)))
    assert rebuilt.encode(val) == frequent.encode(val)


def test_byte_level_round_trip_and_char_level_on_ascii():
    tok = tk.load_tokenizer("bytes")
    assert tok.n_vocab == 257 and tok.eot_token == 256
    ids = tok.encode(UNICODE)
    assert ids == list(UNICODE.encode("utf-8"))
    assert tok.decode(ids) == UNICODE
    assert len(tok.encode(SAMPLE)) == len(SAMPLE)
    assert tok.decode([0xF0, 0x9F]) == "\ufffd"  # a split UTF-8 character decodes with a replacement mark


@pytest.mark.parametrize("name", ["gpt2", "gpt2-compact", "bytes"])
def test_endoftext_in_text_is_plain_text(name, gpt2_tokenizer):
    tok = tk.build_tokenizer(name, SAMPLE)
    ids = tok.encode("a <|endoftext|> b")
    assert tok.eot_token not in ids
    assert tok.decode(ids) == "a <|endoftext|> b"


def test_unknown_or_damaged_spec_says_what_to_do():
    with pytest.raises(tk.TokenizerError, match="this version knows: gpt2, gpt2-compact, bytes"):
        tk.load_tokenizer({"name": "llama"})
    with pytest.raises(tk.TokenizerError, match="lacks its list of kept ranks"):
        tk.load_tokenizer({"name": "gpt2-compact"})


def test_gpt2_is_built_offline_from_the_packaged_vocabulary(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    copy = tmp_path / "gpt2.tiktoken"
    shutil.copyfile(tk.VOCAB_FILE, copy)
    monkeypatch.setattr(tk, "VOCAB_FILE", copy)  # a path not loaded before in this process
    tok = tk.gpt2()
    assert tok.n_vocab == 50257 and tok.eot_token == 50256
    assert tok.encode("Hello world") == [15496, 995] and tok.encode(" ROMEO:") == [21224, 4720, 25]  # GPT-2's ids
    assert not cache.exists()  # tiktoken's cache is neither read nor written


def test_damaged_or_missing_vocabulary_says_what_to_do(tmp_path, monkeypatch):
    damaged = tmp_path / "gpt2.tiktoken"
    data = bytearray(tk.VOCAB_FILE.read_bytes())
    data[100] ^= 1  # one flipped bit: the sha256 no longer matches
    damaged.write_bytes(bytes(data))
    monkeypatch.setattr(tk, "VOCAB_FILE", damaged)
    with pytest.raises(tk.TokenizerError, match=r"gpt2.tiktoken is damaged \(its sha256 is not 306cd27f03c1a714"):
        tk.gpt2()
    with pytest.raises(tk.TokenizerError, match="is damaged"):
        tk.load_tokenizer({"name": "gpt2-compact", "ranks": list(range(300))})
    monkeypatch.setattr(tk, "VOCAB_FILE", tmp_path / "missing.tiktoken")
    with pytest.raises(tk.TokenizerError, match=r"Could not read GPT-2's vocabulary file .*missing.tiktoken \(.*No such file"):
        tk.build_tokenizer("gpt2-compact", SAMPLE)
    assert tk.load_tokenizer("bytes").n_vocab == 257  # needs no vocabulary file

"""What a user gets wrong at an entry point is one sentence and exit status 2, before anything is allocated or written:
a seed out of range, and a model shape, from flags or a config.json, too big for this machine's memory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from train_support import TEXT, tiny_config

import app as app_cli
import generate as generate_cli
import quantize as quantize_cli
import train as train_cli
from model.formats import checkpoint
from model.gpt import GPT

SMALL_RUN = ["--preset", "tiny", "--tokenizer", "bytes", "--n-embd", "32", "--block-size", "16", "--batch-size", "4",
             "--dtype", "fp32", "--device", "cpu", "--max-minutes", "0", "--max-iters", "2", "--threads", "1"]


@pytest.fixture
def text(tmp_path) -> Path:
    path = tmp_path / "input.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def one_error(capsys) -> str:
    """The one line a refused command wrote to stderr."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and err[0].endswith("."), err
    return err[0]


@pytest.mark.parametrize("seed", ["1180591620717411303424", str(2**64), "-1"])
def test_train_refuses_a_seed_out_of_range_before_writing_anything(seed, text, tmp_path, capsys):
    out = tmp_path / "out"
    assert train_cli.main([*SMALL_RUN, "--data", str(text), "--out-dir", str(out), "--seed", seed]) == 2
    assert f"--seed must be an integer from 0 to {2**64 - 1}" in one_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize("seed", ["1180591620717411303424", "-1"])
def test_generate_refuses_a_seed_out_of_range(seed, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    checkpoint.save_model(ckpt, GPT(tiny_config()), {"name": "bytes"}, {}, step=0)
    assert generate_cli.main(["--ckpt", str(ckpt), "--prompt", "hi", "--seed", seed]) == 2
    assert f"seed must be an integer from 0 to {2**64 - 1}" in one_error(capsys)


def test_train_accepts_the_largest_seed(text, tmp_path):
    assert train_cli.main([*SMALL_RUN, "--data", str(text), "--out-dir", str(tmp_path / "out"), "--seed", str(2**64 - 1)]) == 0


def test_train_refuses_a_shape_too_big_for_this_machine_before_writing_anything(text, tmp_path, capsys):
    out = tmp_path / "out"
    assert train_cli.main(["--data", str(text), "--out-dir", str(out), "--n-embd", "100000", "--n-head", "4", "--n-layer", "1"]) == 2
    assert "GB of memory" in one_error(capsys)
    assert not out.exists()


@pytest.fixture(params=[("vocab_size", 10**12), ("block_size", 10**10)], ids=["vocab", "context"])
def huge(request, tmp_path) -> Path:
    """A checkpoint of a tiny model whose config.json claims a shape no machine holds."""
    ckpt = tmp_path / "huge"
    model = GPT(tiny_config())
    checkpoint.save_model(ckpt, model, {"name": "bytes"}, {}, step=0)
    cfg = json.loads((ckpt / checkpoint.CONFIG).read_text())
    cfg["model"][request.param[0]] = request.param[1]
    (ckpt / checkpoint.CONFIG).write_text(json.dumps(cfg))
    return ckpt


@pytest.mark.parametrize("entry", ["generate", "quantize", "train --init-from", "app"])
def test_a_config_too_big_for_this_machine_is_one_sentence_at_every_entry_point(entry, huge, text, tmp_path, capsys,
                                                                                 monkeypatch):
    out = tmp_path / "out"
    if entry == "generate":
        rc = generate_cli.main(["--ckpt", str(huge), "--prompt", "hi", "--max-new-tokens", "2"])
    elif entry == "quantize":
        rc = quantize_cli.main(["--ckpt", str(huge), "--out", str(out)])
    elif entry == "train --init-from":
        rc = train_cli.main([*SMALL_RUN[4:], "--init-from", str(huge), "--data", str(text), "--out-dir", str(out)])
    else:
        monkeypatch.setattr(sys, "argv", ["app.py", "--ckpt", str(huge), "--no-train"])
        rc = app_cli.main()
    assert rc == 2
    assert "GB of memory to load and run, more than this machine's" in one_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize("what", ["loop", "broken link"])
def test_train_names_an_out_dir_that_is_a_bad_link(what, text, tmp_path, capsys):
    out = tmp_path / "out"
    out.symlink_to("out" if what == "loop" else "nowhere")
    assert train_cli.main([*SMALL_RUN, "--data", str(text), "--out-dir", str(out)]) == 2
    assert f"--out-dir {out} is a {'symbolic link that loops' if what == 'loop' else 'broken symbolic link'}" in one_error(capsys)
    assert not (tmp_path / "nowhere").exists()


def test_train_resume_names_a_folder_where_the_state_should_be(text, tmp_path, capsys):
    out = tmp_path / "out"
    (out / checkpoint.TRAIN_STATE).mkdir(parents=True)
    assert train_cli.main([*SMALL_RUN, "--data", str(text), "--out-dir", str(out), "--resume"]) == 2
    assert f"Cannot resume: {out / checkpoint.TRAIN_STATE} is a folder, not a file" in one_error(capsys)

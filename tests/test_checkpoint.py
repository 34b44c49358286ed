"""Checkpoint I/O: weights round trip to identical logits, the resume state never unpickles objects, writes are atomic."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from train_support import tiny_config

from model import atomic, checkpoint
from model.checkpoint import CheckpointError
from model.gpt import GPT


def test_weights_round_trip_gives_identical_logits(tmp_path):
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    checkpoint.save_weights(tmp_path / checkpoint.WEIGHTS, model)
    checkpoint.save_config(tmp_path, model.config, {"name": "bytes"}, {"lr": 0.1})
    assert checkpoint.TIED_KEY not in load_file(tmp_path / checkpoint.WEIGHTS)  # the tied head is stored once
    loaded, cfg = checkpoint.load_fp32(tmp_path)
    assert cfg["train"] == {"lr": 0.1} and cfg["tokenizer"] == {"name": "bytes"}
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    x = torch.randint(0, 256, (2, 16))
    assert torch.equal(model(x)[0], loaded(x)[0])


def test_weights_of_another_shape_are_refused(tmp_path):
    checkpoint.save_weights(tmp_path / checkpoint.WEIGHTS, GPT(tiny_config()))
    checkpoint.save_config(tmp_path, tiny_config(n_embd=64), {"name": "bytes"})
    with pytest.raises(CheckpointError, match="do not match its config"):
        checkpoint.load_fp32(tmp_path)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="No checkpoint at"):
        checkpoint.load_fp32(tmp_path / "nope")
    checkpoint.save_config(tmp_path, tiny_config(), {"name": "bytes"})
    with pytest.raises(CheckpointError, match="missing"):
        checkpoint.load_fp32(tmp_path)
    (tmp_path / checkpoint.WEIGHTS).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        checkpoint.load_fp32(tmp_path)


def test_train_state_round_trip(tmp_path):
    model = GPT(tiny_config())
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    opt.step()
    state = {"step": 3, "model": model.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "t": None}
    checkpoint.save_train_state(tmp_path / "s.pt", state)
    back = checkpoint.load_train_state(tmp_path / "s.pt")
    assert back["step"] == 3 and back["t"] is None
    assert torch.equal(back["rng"], state["rng"])
    torch.optim.AdamW(model.parameters()).load_state_dict(back["optimizer"])


class Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').touch()",))


def test_train_state_never_unpickles_objects(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"step": 1, "x": Evil()}, tmp_path / "s.pt")
    with pytest.raises(CheckpointError, match="damaged or not a training state"):
        checkpoint.load_train_state(tmp_path / "s.pt")
    assert not (tmp_path / "PWNED").exists()
    with pytest.raises(CheckpointError, match="train without --resume first"):
        checkpoint.load_train_state(tmp_path / "missing.pt")


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "f.json"
    atomic.write_text(target, "old")
    with pytest.raises(RuntimeError), atomic.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]

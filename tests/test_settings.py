"""Training settings: one dataclass makes the CLI, presets layer in one order, the cpu preset sizes itself by the text
and caps its passes over it, and a run resolves once into a frozen plan."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
from train_support import TEXT, byte_tokenizer

import train
from model.config import CPU_SIZES, GPTConfig, cpu_row
from model.training.plan import resolve, settings_for
from model.training.settings import FINETUNE, PRESETS, SHAPE, ArgError, TrainSettings, layered


def test_every_setting_is_a_flag_with_its_help_and_default(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(TrainSettings):
        assert f"--{f.name.replace('_', '-')}" in out, f.name
        assert " ".join(f.metadata["help"].replace("%%", "%").split()) in out, f.name
    assert "--max-minutes MAX_MINUTES total wall-clock budget" in out and "(default 9.5)" in out
    assert "--rotary, --no-rotary" in out and "--optimizer {adamw,muon}" in out


def test_only_given_flags_are_parsed_and_typed():
    assert train.parse_args([]) == {}
    given = train.parse_args(["--n-layer", "3", "--lr", "1e-3", "--no-rotary", "--mlp", "relu2", "--compile"])
    assert given == {"n_layer": 3, "lr": 1e-3, "rotary": False, "mlp": "relu2", "compile": True}


def test_layers_in_order_defaults_preset_saved_given():
    assert layered({}).n_layer is None and layered({}).rotary is PRESETS["cpu"]["rotary"]  # cpu: depth sized by the text
    tiny = layered({"preset": "tiny"})
    assert (tiny.n_layer, tiny.tokenizer, tiny.lr) == (PRESETS["tiny"]["n_layer"], "gpt2", TrainSettings.lr)
    assert layered({"preset": "tiny", "n_layer": 3}).n_layer == 3
    assert layered({"init_from": "x"}).lr == FINETUNE["lr"]
    saved = layered({"preset": "tiny", "lr": 1e-4}).to_dict()
    resumed = layered({"resume": True, "max_iters": 7}, saved)
    assert (resumed.preset, resumed.lr, resumed.max_iters) == ("tiny", 1e-4, 7)
    with pytest.raises(ArgError, match="Unknown training settings: colour"):
        layered({"colour": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        resumed.lr = 1.0  # type: ignore[misc]


def test_settings_are_checked_in_one_sentence(tmp_path):
    with pytest.raises(ArgError, match="--patience must not be negative, got -1"):
        settings_for({"patience": -1})
    with pytest.raises(ArgError, match="--optimizer must be one of adamw, muon, got 'sgd'"):
        settings_for({"optimizer": "sgd"})


def test_cpu_preset_is_sized_by_the_training_tokens():
    assert [row.tokens for row in CPU_SIZES] == sorted(row.tokens for row in CPU_SIZES)
    small, large = cpu_row(10_000).size, cpu_row(10**9).size
    assert small["n_embd"] * small["n_layer"] < large["n_embd"] * large["n_layer"]  # more text, more capacity
    assert small["dropout"] > large["dropout"]  # less text, more regularisation
    assert GPTConfig.from_name("cpu").n_embd == cpu_row(317_000).size["n_embd"]  # Tiny Shakespeare's size
    assert all(set(row.size) <= set(SHAPE) for row in CPU_SIZES)


@pytest.fixture
def bytes_tok(monkeypatch):
    monkeypatch.setattr(importlib.import_module("model.training.data"), "load_tokenizer", lambda spec: byte_tokenizer())


def test_a_run_resolves_once_into_a_frozen_plan(tmp_path, bytes_tok):
    data = tmp_path / "input.txt"
    data.write_text(TEXT * 3, encoding="utf-8")
    plan = resolve({"data": str(data), "out_dir": str(tmp_path / "out"), "tokenizer": "bytes", "device": "cpu"})
    s = plan.settings
    assert plan.sized_by_text and all(getattr(s, k) is not None for k in SHAPE)  # nothing left to decide
    assert (s.n_layer, s.n_embd, s.dropout) == tuple(cpu_row(len(plan.data.train)).size[k] for k in ("n_layer", "n_embd", "dropout"))
    assert plan.config.n_embd == s.n_embd and plan.config.rotary == s.rotary and plan.config.block_size == s.block_size
    assert s.eval_interval == 25  # a tiny text: an evaluation about every epoch, at least 25 steps apart
    assert s.grad_accum == 1 and plan.weights is None and plan.state is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.settings = s  # type: ignore[misc]
    given = resolve({"data": str(data), "out_dir": str(tmp_path / "o2"), "tokenizer": "bytes", "device": "cpu", "n_embd": 64,
                     "n_layer": 2, "dropout": 0.0, "eval_interval": 7})
    assert (given.settings.n_embd, given.settings.n_layer, given.settings.eval_interval) == (64, 2, 7)
    assert not given.sized_by_text


def test_the_cpu_preset_caps_its_steps_at_the_passes_its_size_learns_from(tmp_path, bytes_tok):
    """A faster machine or a longer budget must not stretch the schedule over passes that only overfit (the last column
    of CPU_SIZES); --max-iters, a shape given by flags, or a text whose row has no cap leave max_iters alone."""
    data = tmp_path / "input.txt"
    data.write_text((TEXT * (200_000 // len(TEXT) + 1))[:200_000], encoding="utf-8")  # 180k training tokens: the capped row
    plan = resolve({"data": str(data), "out_dir": str(tmp_path / "a"), "tokenizer": "bytes", "device": "cpu"})
    train_tokens, per_step = len(plan.data.train), plan.settings.batch_size * plan.settings.block_size * plan.settings.grad_accum
    epochs = cpu_row(train_tokens).cap
    assert epochs and plan.max_epochs == epochs
    assert plan.settings.max_iters == -(-int(epochs * train_tokens) // per_step) < TrainSettings.max_iters
    for flags in ({"max_iters": 5000}, {"n_layer": 2, "n_embd": 64, "dropout": 0.0}):
        other = resolve({"data": str(data), "out_dir": str(tmp_path / "b"), "tokenizer": "bytes", "device": "cpu", **flags})
        assert other.max_epochs is None and other.settings.max_iters == flags.get("max_iters", TrainSettings.max_iters)
    small = tmp_path / "small.txt"
    small.write_text(TEXT * 3, encoding="utf-8")  # the smallest row: no cap measured, none applied
    assert resolve({"data": str(small), "out_dir": str(tmp_path / "c"), "tokenizer": "bytes", "device": "cpu"}).settings.max_iters \
        == TrainSettings.max_iters


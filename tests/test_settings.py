"""Training settings: one dataclass makes the CLI, presets layer in one order, the cpu preset sizes itself by the text
and by the compute a probe measures, and a run resolves once into a frozen plan."""

from __future__ import annotations

import dataclasses
import importlib
import math

import pytest
from train_support import TEXT, byte_tokenizer

import train
from model.config import CPU_SIZES, GPTConfig, cpu_row, sized_by_compute
from model.formats import checkpoint
from model.training import probe
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


def test_cpu_preset_is_sized_by_the_training_tokens_and_the_compute():
    assert [row.tokens for row in CPU_SIZES] == sorted(row.tokens for row in CPU_SIZES)
    small, large = cpu_row(10_000).size, cpu_row(10**9).size
    assert small["n_embd"] * small["n_layer"] < large["n_embd"] * large["n_layer"]  # more text, more capacity
    assert small["dropout"] > large["dropout"]  # less text, more regularisation
    assert GPTConfig.from_name("cpu").n_embd == cpu_row(317_000).size["n_embd"]  # Tiny Shakespeare's size
    assert all(set(row.size) <= set(SHAPE) for row in CPU_SIZES)
    assert sized_by_compute(317_000) and not sized_by_compute(10_000)
    # Within a group, more compute never buys a smaller model, and needs more passes to get a larger one.
    for limit in {row.tokens for row in CPU_SIZES}:
        group = [row for row in CPU_SIZES if row.tokens == limit]
        assert group[0].passes == 0 and [r.passes for r in group] == sorted({r.passes for r in group})
        params = [r.size["n_layer"] * r.size["n_embd"] ** 2 for r in group]
        assert params == sorted(params)
    rows = [cpu_row(317_000, passes) for passes in (0, 1, 5, 10, 20, 50, 1e6)]
    assert rows[0] == CPU_SIZES[1] and rows[-1] == [r for r in CPU_SIZES if r.tokens == CPU_SIZES[1].tokens][-1]


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
    epochs = cpu_row(train_tokens, plan.compute.budget_passes).cap
    assert epochs and plan.max_epochs == epochs
    assert plan.settings.max_iters == -(-int(epochs * train_tokens) // per_step) < TrainSettings.max_iters
    for flags in ({"max_iters": 5000}, {"n_layer": 2, "n_embd": 64, "dropout": 0.0}):
        other = resolve({"data": str(data), "out_dir": str(tmp_path / "b"), "tokenizer": "bytes", "device": "cpu", **flags})
        assert other.max_epochs is None and other.settings.max_iters == flags.get("max_iters", TrainSettings.max_iters)
    small = tmp_path / "small.txt"
    small.write_text(TEXT * 3, encoding="utf-8")  # the smallest row: no cap measured, none applied
    assert resolve({"data": str(small), "out_dir": str(tmp_path / "c"), "tokenizer": "bytes", "device": "cpu"}).settings.max_iters \
        == TrainSettings.max_iters


def test_the_compute_a_probe_measures_chooses_the_size(tmp_path, bytes_tok, monkeypatch, capsys):
    """A faster machine, a GPU or a longer budget trains a larger model: the probe's tokens/s (set here, as a GPU would
    measure it) times the budget gives the passes over the text that choose the row. Flags override every choice."""
    data = tmp_path / "input.txt"
    data.write_text((TEXT * (200_000 // len(TEXT) + 1))[:200_000], encoding="utf-8")  # 180k training tokens
    probed: list[str] = []
    speed = {"rate": 0.0}

    def fake_probe(config, s, train_split, device, dtype):
        probed.append(f"{config.n_layer}x{config.n_embd}")
        return speed["rate"]

    monkeypatch.setattr(probe, "tokens_per_second", fake_probe)
    base = [r for r in CPU_SIZES if r.tokens == cpu_row(180_000).tokens]
    flags = {"data": str(data), "tokenizer": "bytes", "device": "cpu", "max_minutes": 10}
    plans = {}
    for rate in (500.0, 200_000.0):  # a slow laptop; a GPU
        speed["rate"] = rate
        plan = resolve({**flags, "out_dir": str(tmp_path / f"r{rate:g}")})
        train_tokens = len(plan.data.train)
        passes = min(rate * 600, TrainSettings.max_iters * 16 * 128) / train_tokens  # --max-iters bounds it too
        assert plan.compute.tokens_per_s == rate and plan.compute.budget_passes == pytest.approx(passes)
        row = cpu_row(train_tokens, passes)
        assert (plan.config.n_layer, plan.config.n_embd, plan.config.n_head, plan.config.dropout) == \
            tuple(row.size[k] for k in ("n_layer", "n_embd", "n_head", "dropout"))
        per_step = plan.settings.batch_size * plan.settings.block_size
        assert plan.settings.max_iters == min(TrainSettings.max_iters, -(-int(row.cap * train_tokens) // per_step))
        plans[rate] = plan
    assert probed == [f"{base[0].size['n_layer']}x{base[0].size['n_embd']}"] * 2  # the group's first size is probed
    assert plans[500.0].config.n_embd == base[0].size["n_embd"] and plans[200_000.0].config.n_embd == base[-1].size["n_embd"]
    # Without a time budget only --max-iters bounds the compute: nothing is probed.
    plan = resolve({**flags, "max_minutes": 0, "max_iters": 100, "out_dir": str(tmp_path / "n")})
    assert plan.compute.tokens_per_s is None and plan.compute.budget_passes == pytest.approx(100 * 16 * 128 / len(plan.data.train))
    assert plan.config.n_embd == base[0].size["n_embd"] and len(probed) == 2
    # A size flag decides by hand: no probe, the text's row for the rest.
    plan = resolve({**flags, "n_layer": 2, "out_dir": str(tmp_path / "f")})
    assert plan.compute is None and plan.config.n_layer == 2 and len(probed) == 2
    # The first lines say what was measured and what was chosen.
    from model.training.trainer import Trainer
    Trainer(plans[200_000.0]).announce()
    out = capsys.readouterr().out
    probe_shape = f"{base[0].size['n_layer']}x{base[0].size['n_embd']}"
    assert f"compute: a probe measured 200,000 training tokens/s of a {probe_shape} model here, so the 10-minute budget buys" in out
    assert f"{base[-1].size['n_layer']}x{base[-1].size['n_embd']}" in out and "passes of compute" in out


def test_the_probe_times_real_steps():
    """The probe trains a throwaway model for a few steps and leaves the global RNG as it was."""
    import numpy as np
    import torch
    config = GPTConfig(block_size=32, vocab_size=64, n_layer=1, n_head=2, n_embd=32)
    s = dataclasses.replace(TrainSettings(), block_size=32, batch_size=4, optimizer="muon")
    before = torch.get_rng_state()
    rate = probe.tokens_per_second(config, s, np.arange(5000, dtype=np.uint16) % 64, torch.device("cpu"), torch.float32)
    assert rate > 0 and torch.equal(before, torch.get_rng_state())


def test_a_run_sized_by_compute_resumes_the_same_shape_without_probing(tmp_path, bytes_tok, monkeypatch):
    from model.training.trainer import train
    data = tmp_path / "input.txt"
    data.write_text((TEXT * (200_000 // len(TEXT) + 1))[:200_000], encoding="utf-8")
    probed: list[int] = []
    monkeypatch.setattr(probe, "tokens_per_second", lambda *a: probed.append(1) or 10**6)  # a GPU's speed: the largest row
    flags = {"data": str(data), "out_dir": str(tmp_path / "out"), "tokenizer": "bytes", "device": "cpu",
             "dtype": "fp32"}
    first = train(flags, stop_after=1)
    assert first.interrupted and probed == [1]
    largest = cpu_row(180_000, math.inf)
    state = checkpoint.load_train_state(tmp_path / "out" / checkpoint.TRAIN_STATE)
    assert (state["model_config"]["n_layer"], state["model_config"]["n_embd"]) == (largest.size["n_layer"], largest.size["n_embd"])
    max_iters = state["args"]["max_iters"]
    resumed = train({"resume": True, "out_dir": str(tmp_path / "out")}, stop_after=2)
    assert resumed.step == 2 and probed == [1]  # the saved shape and max_iters, not a new probe
    state = checkpoint.load_train_state(tmp_path / "out" / checkpoint.TRAIN_STATE)
    assert state["model_config"]["n_embd"] == largest.size["n_embd"] and state["args"]["max_iters"] == max_iters


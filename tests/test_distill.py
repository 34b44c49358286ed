"""Distillation and the rounds a budget buys: the teachers' soft targets, the student's loss, --teacher, and train.py's
teachers and student after a first model that its cap ended early."""

from __future__ import annotations

import importlib
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from train_support import TEXT, byte_tokenizer, tiny_config

import model.config
import model.training.rounds as rounds
from model.config import CpuSize
from model.formats import checkpoint
from model.formats.checkpoint import CheckpointError
from model.formats.load import load
from model.gpt import GPT
from model.training.distill import distill_loss, teach, teaching_windows
from model.training.trainer import train as train_one

pytestmark = pytest.mark.usefixtures("one_thread")
# A cpu-preset run of a 1-layer model over bytes, capped at 2 passes: it ends in a few seconds, long before its budget.
CAPPED = CpuSize(math.inf, {"n_layer": 1, "n_embd": 32, "n_head": 2, "dropout": 0.0}, 2.0)
FLAGS = {"block_size": 16, "batch_size": 4, "dtype": "fp32", "device": "cpu", "eval_windows": 8, "log_interval": 1,
         "tokenizer": "bytes"}


@pytest.fixture
def bytes_tok(monkeypatch):
    """Make the runs and the loader use the 256-token byte tokenizer, so test models stay tiny."""
    for name in ("model.training.plan", "model.training.data", "model.formats.load"):
        monkeypatch.setattr(importlib.import_module(name), "load_tokenizer", lambda spec: byte_tokenizer())


@pytest.fixture
def capped(monkeypatch, bytes_tok):
    monkeypatch.setattr(model.config, "CPU_SIZES", (CAPPED,))


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text(TEXT * 3, encoding="utf-8")
    return path


@pytest.mark.parametrize(("n_pred", "block"), [(10, 4), (11, 4), (4, 8), (100, 16), (17, 16), (16, 16)])
def test_teaching_windows_predict_every_position_once_with_half_a_window_of_context(n_pred, block):
    length = min(block, n_pred)
    kept = [(s + k, k) for s, k in teaching_windows(n_pred, length) for k in range(k, length)]
    assert [p for p, _ in kept] == list(range(n_pred))
    assert all(offset >= length // 2 for p, offset in kept if p >= length)


def test_teach_keeps_the_mean_distribution_of_the_teachers_over_each_window():
    torch.manual_seed(0)
    a, b = GPT(tiny_config()).eval(), GPT(tiny_config()).eval()
    data = np.random.default_rng(0).integers(0, 256, 70).astype(np.uint16)
    targets = teach([a, b], data, 16, torch.device("cpu"), top_k=5)
    assert targets.tokens.shape == targets.probs.shape == (69, 5)
    for s, keep in teaching_windows(69, 16):
        x = torch.from_numpy(data[s:s + 16].astype(np.int64))[None]
        with torch.no_grad():
            mean = (torch.softmax(a(x)[0][0], -1) + torch.softmax(b(x)[0][0], -1)) / 2
        top_p, top_i = mean.topk(5, -1)
        torch.testing.assert_close(targets.probs[s + keep:s + 16].float(), top_p[keep:], atol=1e-3, rtol=1e-3)
        assert torch.equal(targets.tokens[s + keep:s + 16].long(), top_i[keep:])
    tokens, probs = targets.at([3, 40], 8, torch.device("cpu"))
    assert torch.equal(tokens[1], targets.tokens[40:48].long()) and probs.shape == (2, 8, 5)


def test_distill_loss_mixes_the_text_and_the_teachers():
    torch.manual_seed(0)
    logits, y = torch.randn(2, 6, 11), torch.randint(0, 11, (2, 6))
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    one_hot = (y[..., None], torch.ones(2, 6, 1))  # a teacher sure of the text's next token
    for weight in (0.0, 0.5, 1.0):
        loss, shown = distill_loss(logits, y, *one_hot, weight=weight)
        torch.testing.assert_close(loss, ce)
        torch.testing.assert_close(shown, ce)
    uniform = (torch.arange(11).expand(2, 6, 11), torch.full((2, 6, 11), 1 / 11))
    loss, _ = distill_loss(logits, y, *uniform, weight=1.0)
    torch.testing.assert_close(loss, -F.log_softmax(logits, -1).mean(-1).mean())
    # a teacher that keeps one token at 0.6: the other 0.4 goes to the bucket of every other token
    q = torch.softmax(logits, -1).gather(-1, y[..., None])[..., 0]
    loss, _ = distill_loss(logits, y, y[..., None], torch.full((2, 6, 1), 0.6), weight=1.0)
    torch.testing.assert_close(loss, -(0.6 * q.log() + 0.4 * (1 - q).log()).mean())


def test_a_student_trains_from_teachers_and_a_teacher_of_another_tokenizer_is_refused(tmp_path, text, bytes_tok):
    common = {**FLAGS, "preset": "tiny", "n_embd": 32, "max_minutes": 0, "eval_interval": 10, "data": str(text)}
    train_one({**common, "out_dir": str(tmp_path / "t"), "max_iters": 20})
    result = train_one({**common, "out_dir": str(tmp_path / "s"), "max_iters": 20, "teacher": [str(tmp_path / "t")]})
    assert result.metrics is not None and math.isfinite(result.metrics["val_nats_per_char"])
    assert checkpoint.read_config(tmp_path / "s")["train"]["teacher"] == [str(tmp_path / "t")]
    other = load(tmp_path / "t")
    checkpoint.save_model(tmp_path / "other", GPT(tiny_config(vocab_size=300)), {"name": "other"}, {}, 0)
    with pytest.raises(CheckpointError, match="another tokenizer"):
        train_one({**common, "out_dir": str(tmp_path / "s2"), "max_iters": 2, "teacher": [str(tmp_path / "other")]})
    assert other.config.vocab_size == 256


@pytest.mark.parametrize(("left", "expected"), [(50, None), (118, 0), (221, 0), (223, 1), (328, 2), (433, 3), (10_000, 3)])
def test_the_time_left_decides_the_teachers(left, expected):
    assert rounds.extra_teachers(left, 100.0) == expected


def test_a_budget_left_after_the_cap_trains_teachers_and_a_student(tmp_path, text, capped, capsys):
    out = tmp_path / "out"
    result = rounds.train({**FLAGS, "data": str(text), "out_dir": str(out), "max_minutes": 2.0, "eval_interval": 10})
    said = capsys.readouterr().out
    extra = int(re.search(r"training (\d+) more teachers? with other seeds, then a student distilled from all", said).group(1))
    assert extra == rounds.MAX_TEACHERS - 1  # a capped run of seconds leaves time for them all in 2 minutes
    teachers = range(1, extra + 2)
    for i in teachers:
        assert (out / "rounds" / f"teacher-{i}" / checkpoint.WEIGHTS).is_file()
    first = checkpoint.read_json(out / "rounds" / "teacher-1" / checkpoint.METRICS)["val_nats_per_char"]
    student = checkpoint.read_json(out / "rounds" / "student" / checkpoint.METRICS)["val_nats_per_char"]
    kept = checkpoint.read_json(out / checkpoint.METRICS)
    assert kept["val_nats_per_char"] == min(first, student) == result.metrics["val_nats_per_char"]
    served = load(out)  # whichever won, out/ is one complete, consistent checkpoint
    assert checkpoint.weights_step(out / checkpoint.WEIGHTS) == kept["best_step"]
    assert isinstance(served.model, GPT)
    if student < first:
        assert "holds the student" in said and not (out / checkpoint.TRAIN_STATE).exists()
        assert kept["teachers"] == extra + 1 and kept["first_model_val_nats_per_char"] == first
        assert kept["command_seconds"] > kept["total_seconds"]
    seeds = {checkpoint.read_config(out / "rounds" / f"teacher-{i}")["train"]["seed"] for i in teachers}
    assert len(seeds) == len(teachers)
    student_config = checkpoint.read_config(out / "rounds" / "student")["train"]
    assert student_config["teacher"] == [str(out / "rounds" / f"teacher-{i}") for i in teachers]


def test_no_rounds_when_the_budget_ended_the_run_or_steps_were_given(tmp_path, text, capped, capsys):
    (tmp_path / "a" / "rounds" / "teacher-9").mkdir(parents=True)  # an earlier run's rounds: stale once a new model is in a/
    rounds.train({**FLAGS, "data": str(text), "out_dir": str(tmp_path / "a"), "max_minutes": 2.0, "max_iters": 5,
                  "eval_interval": 5})
    rounds.train({**FLAGS, "data": str(text), "out_dir": str(tmp_path / "b"), "max_minutes": 0.05, "eval_interval": 5})
    assert "student" not in capsys.readouterr().out
    assert not (tmp_path / "a" / "rounds").exists() and not (tmp_path / "b" / "rounds").exists()


def test_rounds_that_run_late_give_up_the_student_and_keep_the_first_model(tmp_path, text, capped, capsys, monkeypatch):
    monkeypatch.setattr(rounds, "SHORTEST_ROUND", 1e9)  # as if the first model had taken far less than the rounds do
    out = tmp_path / "out"
    result = rounds.train({**FLAGS, "data": str(text), "out_dir": str(out), "max_minutes": 1.0, "eval_interval": 10})
    assert "too little for a student" in capsys.readouterr().out
    assert not (out / "rounds" / "student").exists() and not (out / "rounds" / "teacher-2").exists()
    assert checkpoint.read_json(out / checkpoint.METRICS)["val_nats_per_char"] == result.metrics["val_nats_per_char"]


def test_an_interrupted_student_resumes_with_its_teachers(tmp_path, text, bytes_tok):
    common = {**FLAGS, "preset": "tiny", "n_embd": 32, "max_minutes": 0, "eval_interval": 5, "data": str(text)}
    train_one({**common, "out_dir": str(tmp_path / "t"), "max_iters": 10})
    student = {**common, "max_iters": 10, "teacher": [str(tmp_path / "t")]}
    straight = train_one({**student, "out_dir": str(tmp_path / "a")})
    assert train_one({**student, "out_dir": str(tmp_path / "b")}, stop_after=4).interrupted
    resumed = train_one({"resume": True, "out_dir": str(tmp_path / "b")})
    assert resumed.metrics is not None and resumed.step == straight.step == 10
    assert resumed.last_loss == pytest.approx(straight.last_loss, abs=1e-5)  # the same teachers' targets, the same batches

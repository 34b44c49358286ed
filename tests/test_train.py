"""The training loop: LR schedule, clipping, overfitting, exact resume, time budget, init-from, bad input, the CLI."""

from __future__ import annotations

import dataclasses
import importlib
import io
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_support import TEXT, byte_tokenizer, tiny_config

import model.plot
import model.progress
import model.training.budget
import model.training.trainer
import train
from model.formats import checkpoint
from model.generation.trace import traces
from model.gpt import GPT
from model.training.budget import minutes_text
from model.training.data import DataError
from model.training.optim import clip_grads, lr_at, make_optimizer, set_lr, warmup_frac
from model.training.plan import resolve
from model.training.rounds import whole_seconds
from model.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
# A 2-layer 32-wide model over bytes, fp32, no time budget: a few steps take well under a second.
SMALL = {"preset": "tiny", "n_embd": 32, "block_size": 16, "batch_size": 4, "dtype": "fp32", "device": "cpu", "max_minutes": 0,
         "eval_windows": 4, "log_interval": 1}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def bytes_tok(monkeypatch):
    """Make the trainer and the loader use the 256-token byte tokenizer, so test models stay tiny."""
    monkeypatch.setattr(importlib.import_module("model.training.plan"), "load_tokenizer", lambda spec: byte_tokenizer())  # resumed runs
    monkeypatch.setattr(importlib.import_module("model.training.data"), "load_tokenizer", lambda spec: byte_tokenizer())  # new runs
    monkeypatch.setattr(importlib.import_module("model.formats.load"), "load_tokenizer", lambda spec: byte_tokenizer())


@pytest.fixture
def text(tmp_path) -> Path:
    path = tmp_path / "input.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def cli(flags: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]


def test_lr_schedule():
    kw = {"lr": 1e-3, "min_lr": 1e-4}
    assert lr_at(warmup_frac(0, 10), 0.0, **kw) == pytest.approx(1e-3 / 11)  # step 0
    assert lr_at(warmup_frac(5, 10), 0.0, **kw) == pytest.approx(6e-3 / 11)
    assert lr_at(warmup_frac(10, 10), 0.0, **kw) == pytest.approx(1e-3)  # end of warmup: the peak
    assert lr_at(1.0, 0.5, **kw) == pytest.approx(5.5e-4)  # midpoint of the cosine
    assert lr_at(1.0, 1.0, **kw) == pytest.approx(1e-4)  # the end: min_lr
    assert lr_at(1.0, 1.7, **kw) == pytest.approx(1e-4)
    assert lr_at(warmup_frac(0, 0), 0.0, **kw) == pytest.approx(1e-3)  # no warmup


def test_trainer_decay_fraction_by_steps(tmp_path, text, bytes_tok):
    t = Trainer(resolve({**SMALL, "data": str(text), "out_dir": str(tmp_path / "o"), "max_iters": 110, "warmup_iters": 10}))
    for step, frac in ((10, 0.0), (60, 0.5), (110, 1.0)):
        assert t.budget.decay_frac(step) == pytest.approx(frac)
        assert t.budget.warm_frac(step) == 1.0


def test_a_slow_first_step_does_not_use_up_the_warmup(monkeypatch):
    """A first step that compiles the model (a minute of a 10-minute budget) must not end the time-based warmup."""
    now = [0.0]
    monkeypatch.setattr(model.training.budget.time, "perf_counter", lambda: now[0])
    b = model.training.budget.Budget(max_minutes=10, max_iters=10_000, warmup_iters=50)
    warm, _ = b.fractions(0)
    now[0] = 60.0  # the compiling first step
    b.took(60.0)
    warm, _ = b.fractions(1)
    assert warm == pytest.approx(2 / 51)  # by steps: the time-based share starts after the first step
    now[0] = 60.0 + 0.05 * 540 / 2  # half of the warmup's time share of what is left
    assert b.fractions(2)[0] == pytest.approx(0.5)


def test_muon_lr_scale_scales_only_muons_rate_and_keeps_its_decay_per_step():
    gpt = GPT(tiny_config())
    opt = make_optimizer(gpt, 1e-3, 0.1, (0.9, 0.99), kind="muon", muon_lr_scale=4.0)
    set_lr(opt, 5e-4)
    muon, adamw = opt.optimizers
    assert [g["lr"] for g in muon.param_groups] == [pytest.approx(2e-3)]
    assert all(g["lr"] == pytest.approx(5e-4) for g in adamw.param_groups)
    assert muon.param_groups[0]["lr"] * muon.param_groups[0]["weight_decay"] == pytest.approx(5e-4 * 0.1)


def test_weight_decay_only_on_matrices():
    gpt = GPT(tiny_config())
    decay, no_decay = make_optimizer(gpt, 1e-3, 0.1, (0.9, 0.99)).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(gpt.parameters()))


def test_clipping_bounds_the_norm():
    gpt = GPT(tiny_config())
    x = torch.randint(0, 256, (2, 16))
    (gpt(x, x)[1] * 1000).backward()
    norm = clip_grads(gpt, 1.0)
    assert norm > 10
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in gpt.parameters()]))
    assert float(after) == pytest.approx(1.0, rel=1e-4)
    assert clip_grads(gpt, 0) == pytest.approx(1.0, rel=1e-4)  # 0: measure only


def test_tiny_model_overfits_tiny_corpus(tmp_path, text, bytes_tok):
    out = tmp_path / "out"
    result = model.training.trainer.train({**SMALL, "data": str(text), "out_dir": str(out), "max_iters": 150, "eval_interval": 75,
                                  "batch_size": 16, "lr": 1e-2, "min_lr": 1e-3, "warmup_iters": 5})
    losses = [r["train_loss"] for r in records(out) if "train_loss" in r]
    assert len(losses) == 150
    assert sum(losses[-10:]) / 10 < 0.5 * losses[0], (losses[0], losses[-10:])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 150 and metrics["tokens_seen"] == 150 * 16 * 16
    val_chars = json.loads((out / "tokens" / "meta.json").read_text())["val_chars"]
    total_nats = metrics["val_nats_per_token"] * metrics["val_tokens"]
    assert metrics["val_nats_per_char"] * val_chars == pytest.approx(total_nats)  # nats/char: the same total over characters
    assert result.metrics["val_nats_per_token"] == metrics["val_nats_per_token"]
    assert [r["step"] for r in records(out) if "val_nats_per_token" in r and not r.get("final")] == [0, 75, 150]
    samples = [r["sample"] for r in records(out) if "sample" in r]
    assert len(samples) == 3 and all(isinstance(t, str) and t for t in samples)  # what the model writes, at each evaluation
    train_chars = json.loads((out / "tokens" / "meta.json").read_text())["train_chars"]
    train_tokens = (out / "tokens" / "train.bin").stat().st_size // 2  # uint16 ids
    first = next(r for r in records(out) if "train_loss" in r)
    assert first["train_nats_per_char"] == pytest.approx(first["train_loss"] * train_tokens / train_chars)
    for name in ("model.safetensors", "config.json", "train_state.pt", "loss.png", "tokens/train.bin"):
        assert (out / name).is_file(), name


def test_the_evaluation_sample_leaves_training_as_it_was(tmp_path, text, bytes_tok):
    trainer = Trainer(resolve({**SMALL, "data": str(text), "out_dir": str(tmp_path / "out"), "max_iters": 2}))
    trainer.raw_model.train()
    rng = torch.get_rng_state()
    weights = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
    assert trainer.sample() == trainer.sample()  # a fixed seed: the same text every time
    assert torch.equal(torch.get_rng_state(), rng)  # dropout and batches draw as if no sample had been made
    assert trainer.raw_model.training
    for _ in range(12):  # past the engine's tracing threshold: the sample's steps are traced...
        trainer.sample()
    made = dict(traces(trainer.sampler))  # on the twin that writes the samples over the training weights
    trainer.sample()
    assert made and traces(trainer.sampler) == made  # ...once, not again at every evaluation
    assert all(torch.equal(v, weights[k]) for k, v in trainer.raw_model.state_dict().items())


def test_the_training_model_carries_no_kv_cache_after_its_evaluation_samples(tmp_path, text, bytes_tok):
    """The samples' KV caches go on a twin over the same weights: the model being trained keeps only its own buffers
    (DDP then sees the same buffers on every rank), and the twin samples with the weights as they are now."""
    trainer = Trainer(resolve({**SMALL, "data": str(text), "out_dir": str(tmp_path / "out"), "max_iters": 2, "preset": "cpu",
                               "n_layer": 1, "n_head": 2, "dropout": 0.0}))
    before = {name for name, _ in trainer.raw_model.named_buffers()}
    assert before == {"rope_cos", "rope_sin"}  # the rotary tables only
    trainer.evaluate(None, write=False)  # scores, then writes a sample
    first = trainer.sample()
    assert {name for name, _ in trainer.raw_model.named_buffers()} == before
    assert any("kv_cache" in name for name, _ in trainer.sampler.named_buffers())  # the caches are the twin's
    with torch.no_grad():
        for p in trainer.raw_model.parameters():
            p.mul_(-1.0)  # an optimizer step changes the weights in place: the twin's next sample follows
    assert trainer.sample() != first


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path, text, bytes_tok):
    common = {**SMALL, "data": str(text), "max_iters": 12, "eval_interval": 4, "grad_accum": 2, "warmup_iters": 3}
    straight = model.training.trainer.train({**common, "out_dir": str(tmp_path / "a")})
    first = model.training.trainer.train({**common, "out_dir": str(tmp_path / "b")}, stop_after=5)
    assert first.interrupted and first.step == 5 and first.metrics is None
    resumed = model.training.trainer.train({"resume": True, "out_dir": str(tmp_path / "b")})
    assert resumed.step == 12
    assert abs(resumed.last_loss - straight.last_loss) < 1e-5
    assert resumed.metrics["val_nats_per_token"] == pytest.approx(straight.metrics["val_nats_per_token"], abs=1e-5)
    assert [r["step"] for r in records(tmp_path / "b")] == [r["step"] for r in records(tmp_path / "a")]
    state = checkpoint.load_train_state(tmp_path / "b" / checkpoint.TRAIN_STATE)
    assert state["step"] == 12 and state["best_step"] == straight.metrics["best_step"]


@pytest.mark.slow
def test_time_budget_ends_the_cosine_at_the_budget(tmp_path, text, bytes_tok):
    out = tmp_path / "out"
    metrics = model.training.trainer.train({**SMALL, "data": str(text), "out_dir": str(out), "max_iters": 100000, "max_minutes": 0.1,
                                   "warmup_iters": 10**6, "eval_interval": 1000, "lr": 1e-3, "min_lr": 1e-4}).metrics
    assert 2 < metrics["step"] < 100000
    lrs = [r["lr"] for r in records(out) if "lr" in r]
    assert max(lrs) > 0.9e-3  # warmup (far too long for the budget) was ended by time
    assert lrs[-1] < 1e-4 + 0.25 * 9e-4  # and the cosine was nearly done when time ran out
    assert json.loads((out / "metrics.json").read_text())["total_seconds"] < 6 + 4  # 6 s budget, slack for a busy machine


@pytest.mark.slow
def test_one_stalled_step_does_not_end_a_timed_run_early(tmp_path, text, bytes_tok, monkeypatch):
    """A step the machine stalls for 1.5 s, at about a third of a 6 s budget: training goes on past it."""
    real, stalled = model.training.trainer.Trainer.train_step, []

    def train_step(self):
        if not stalled and self.budget.elapsed() > 2.0:
            stalled.append(self.state.step)
            time.sleep(1.5)
        return real(self)

    monkeypatch.setattr(model.training.trainer.Trainer, "train_step", train_step)
    out = tmp_path / "out"
    metrics = model.training.trainer.train({**SMALL, "data": str(text), "out_dir": str(out), "max_iters": 100000, "max_minutes": 0.1,
                                   "warmup_iters": 10, "eval_interval": 1000, "lr": 1e-3, "min_lr": 1e-4}).metrics
    assert stalled and metrics["step"] > stalled[0] + 20
    lrs = [r["lr"] for r in records(out) if "lr" in r]
    assert lrs[-1] < 1e-4 + 0.25 * 9e-4  # the cosine still ran to (nearly) its end


def test_init_from_finetunes_with_a_shorter_window(tmp_path, text, bytes_tok):
    src = tmp_path / "src"
    torch.manual_seed(1)
    base = GPT(tiny_config(block_size=32))
    checkpoint.save_weights(src / checkpoint.WEIGHTS, base)
    checkpoint.save_config(src, base.config, {"name": "bytes"})
    out = tmp_path / "ft"
    plan = resolve({"init_from": str(src), "data": str(text), "out_dir": str(out), "block_size": 8, "n_embd": 999,
                    "max_iters": 3, "eval_interval": 3, "device": "cpu", "dtype": "fp32", "max_minutes": 0})
    assert plan.settings.lr == 3e-5 and plan.settings.preset == "cpu"
    trainer = Trainer(plan)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in trainer.raw_model.state_dict().items())  # n_embd ignored
    trainer.run()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == base.config.to_dict()  # the full context of 32 positions is kept
    assert cfg["train"]["block_size"] == 8 and cfg["train"]["init_from"] == str(src)
    assert json.loads((out / "metrics.json").read_text())["eval_block_size"] == 32
    assert records(out)[0]["val_nats_per_token"] == pytest.approx(5.55, abs=0.2)  # untrained source: about ln(256)


BAD = [  # (flags, text bytes or None for no file, expected message)
    ([], None, r"No training text at .*: pass --data PATH of a UTF-8 text file, or train on the bundled Tiny Shakespeare \(input.txt\)\.$"),
    ([], b" \n", "is empty"),
    ([], b"abc\xe9def", "not valid UTF-8: byte 0xe9 at offset 3"),
    ([], b"x" * 50, r"The text has 50 characters, too few to train on: add 3,850 more characters \(about 3.9 KB\) of text\.$"),
    (["--block-size", "4"], b"y" * 10, "10 characters, too few to train on: add 290 more characters"),
    ([], b"x" * 700 + b"\0", r"input.txt looks like a binary file, not text \(it holds NUL bytes\): use a plain-text"),
    (["--n-embd", "33"], TEXT.encode(), r"n_embd \(33\) must be divisible by n_head \(2\)"),
    (["--block-size", "0"], TEXT.encode(), "--block-size must be at least 1, got 0"),
    (["--min-lr", "1"], TEXT.encode(), r"--min-lr \(1.0\) must not exceed --lr"),
    (["--threads", "0"], TEXT.encode(), "--threads must be at least 1, got 0"),
    (["--lr", "inf"], TEXT.encode(), "--lr must be a finite number, got inf"),
    (["--max-minutes", "nan"], TEXT.encode(), "--max-minutes must be a finite number, got nan"),
    (["--beta2", "1"], TEXT.encode(), r"--beta2 must be in \[0, 1\), got 1.0"),
    (["--max-minutes", "0.0001"], TEXT.encode() * 3, r"--max-minutes 0.0001 \(0.006 s in all\) is too short to train a single step"),
    (["--resume"], TEXT.encode(), "Cannot resume: .* does not exist; train without --resume first"),
]


@pytest.mark.parametrize("flags,content,message", BAD)
def test_bad_input_ends_in_one_clear_sentence(tmp_path, capsys, bytes_tok, flags, content, message):
    data = tmp_path / "input.txt"
    if content is not None:
        data.write_bytes(content)
    out = tmp_path / "out"
    code = train.main(["--data", str(data), "--out-dir", str(out), "--preset", "tiny", "--max-iters", "2", *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not out.exists()  # nothing written


def test_resume_with_another_architecture_is_refused(tmp_path, text, capsys, bytes_tok):
    out = tmp_path / "out"
    model.training.trainer.train({**SMALL, "data": str(text), "out_dir": str(out), "max_iters": 2}, stop_after=1)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert train.main(["--resume", "--out-dir", str(out), "--preset", "cpu"]) == 2
    assert "trained with preset='tiny', not 'cpu' (another architecture)" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


@pytest.mark.slow
def test_cli_end_to_end_on_tiny_shakespeare(tmp_path, shakespeare_path, gpt2_tokenizer):
    out = tmp_path / "out"
    cmd = [sys.executable, "train.py", "--data", str(shakespeare_path), "--out-dir", str(out), "--preset", "tiny", "--n-layer", "1",
           "--n-embd", "16", "--n-head", "2", "--block-size", "32", "--batch-size", "4", "--max-iters", "4", "--eval-interval", "2",
           "--eval-windows", "4", "--max-minutes", "0", "--dtype", "fp32"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "parameters" in run.stdout and "step 4: val" in run.stdout
    assert "step/s" in run.stderr or "s/step" in run.stderr  # the tqdm bar
    for name in ("model.safetensors", "config.json", "metrics.json", "train_state.pt", "log.jsonl", "loss.png", "tokens/meta.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 4 and metrics["tokens_seen"] == 4 * 4 * 32 and metrics["train_seconds"] > 0
    val_tokens = json.loads((out / "tokens" / "meta.json").read_text())["val_tokens"]
    assert metrics["val_tokens"] == val_tokens - 1  # the whole split was scored
    assert 2.0 < metrics["val_nats_per_char"] < 4.0 and metrics["val_nats_per_token"] > metrics["val_nats_per_char"]
    loaded = model.load(out)
    assert loaded.tokenizer.name == "gpt2" and loaded.config.n_embd == 16

    missing = subprocess.run([sys.executable, "train.py", "--data", str(tmp_path / "nope.txt"), "--out-dir", str(tmp_path / "o2")],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.startswith("error: No training text at") and not (tmp_path / "o2").exists()


def test_out_dir_that_is_a_file_is_refused(tmp_path, text, capsys, bytes_tok):
    out = tmp_path / "out"
    out.write_text("not a directory")
    code = train.main(cli({**SMALL, "data": text, "out_dir": out, "max_iters": 2}))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: --out-dir {out} is a file, not a directory; pass the path of a directory"), err
    assert out.read_text() == "not a directory"


def test_a_diverged_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, text, capsys, bytes_tok, monkeypatch):
    real = model.training.trainer.Trainer.train_step

    def train_step(self):
        if self.state.step == 6:  # the weights blow up before step 7
            with torch.no_grad():
                for p in self.raw_model.parameters():
                    p.fill_(math.nan)
        return real(self)

    monkeypatch.setattr(model.training.trainer.Trainer, "train_step", train_step)
    out = tmp_path / "out"
    code = train.main(cli({**SMALL, "data": text, "out_dir": out, "max_iters": 20, "eval_interval": 4}))
    captured = capsys.readouterr()
    assert code == 1 and "done in" not in captured.out and "Traceback" not in captured.err
    last = captured.err.splitlines()[-1]  # after the progress bar
    assert last.startswith("error: training diverged at step 7 (the training loss is nan)") and captured.err.count("error") == 1
    assert "the best weights, of step 4" in last and "continue from step 4 with --resume --lr LOWER" in last
    state = checkpoint.load_train_state(out / checkpoint.TRAIN_STATE)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())  # the state of the last eval
    weights = checkpoint.load_state_dict(out / checkpoint.WEIGHTS)
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert not (out / "metrics.json").exists()
    assert max(r["step"] for r in records(out)) == 4


def test_non_finite_initial_weights_write_nothing(tmp_path, text, capsys, bytes_tok, monkeypatch):
    """A model whose very first validation loss is NaN (e.g. broken weights) leaves no good checkpoint: nothing is written."""
    nan = {"val_nats_per_token": math.nan, "val_nats_per_char": math.nan, "val_tokens": 54}
    monkeypatch.setattr(model.training.trainer, "evaluate", lambda *args, **kwargs: nan)
    out = tmp_path / "out"
    code = train.main(cli({**SMALL, "data": text, "out_dir": out, "max_iters": 3}))
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith("error: the validation loss of the initial weights is nan") and "nothing was written" in err
    assert not out.exists()


def test_interim_validation_is_the_whole_split_and_the_plot_ends_at_metrics(tmp_path, bytes_tok, monkeypatch):
    """The default --eval-windows scores the whole split of a small text, so the best checkpoint is chosen on the number
    metrics.json reports; the final evaluation is the last point of log.jsonl and of loss.png."""
    data = tmp_path / "input.txt"
    data.write_text(TEXT * 12, encoding="utf-8")  # a 656-token validation split: 41 windows of 16, more than the old default of 32
    plotted = []

    def save_figure(fig, path, dpi=100):
        plotted.append([(list(line.get_xdata()), list(line.get_ydata())) for line in fig.axes[1].lines])
        model.plot.plt.close(fig)

    monkeypatch.setattr(model.plot, "save_figure", save_figure)
    scored = []  # one entry per evaluation of the validation split
    evaluate = model.training.trainer.evaluate
    monkeypatch.setattr(model.training.trainer, "evaluate", lambda *a, **kw: scored.append(1) or evaluate(*a, **kw))
    flags = {k: v for k, v in SMALL.items() if k != "eval_windows"}
    out = tmp_path / "out"
    model.training.trainer.train({**flags, "data": str(data), "out_dir": str(out), "max_iters": 20, "eval_interval": 10})
    assert len(scored) == 3  # steps 0, 10 and 20: the final score is the best one's, not a fourth pass over the split
    metrics = json.loads((out / "metrics.json").read_text())
    interim = {r["step"]: r for r in records(out) if "val_nats_per_char" in r and not r.get("final")}
    assert sorted(interim) == [0, 10, 20]
    assert interim[metrics["best_step"]]["val_tokens"] == metrics["val_tokens"] == 656 - 1  # the whole split
    assert abs(interim[metrics["best_step"]]["val_nats_per_char"] - metrics["val_nats_per_char"]) < 0.005
    last = records(out)[-1]
    assert last["final"] and last["step"] == 20 and last["best_step"] == metrics["best_step"]
    assert last["val_nats_per_char"] == metrics["val_nats_per_char"]
    points = [(x, y) for xs, ys in plotted[-1] for x, y in zip(xs, ys, strict=True)]
    assert max(points)[0] == 20 and (20, metrics["val_nats_per_char"]) in points
    assert all(y == metrics["val_nats_per_char"] for x, y in points if x == 20)  # the plot ends at metrics.json's value


def test_progress_bar_total_never_changes(tmp_path, text, bytes_tok, monkeypatch):
    """A budgeted run counts seconds out of its budget; a run bounded only by --max-iters counts steps."""
    seen = []

    update = model.progress.Progress.update

    def spy(self, n, status=""):
        seen.append((self.unit, self.total))
        return update(self, n, status)

    monkeypatch.setattr(model.progress.Progress, "update", spy)
    common = {**SMALL, "data": str(text), "max_iters": 20, "eval_interval": 100}
    model.training.trainer.train({**common, "out_dir": str(tmp_path / "a"), "max_minutes": 0.1})
    assert len(seen) > 1 and all(unit == "s" and total == pytest.approx(6.0) for unit, total in seen), seen
    seen.clear()
    model.training.trainer.train({**common, "out_dir": str(tmp_path / "b")})
    assert len(seen) == 20 and set(seen) == {("step", 20)}


def test_a_validation_split_shorter_than_one_window_is_refused(tmp_path, text, capsys, bytes_tok):
    model.training.trainer.train({**SMALL, "data": str(text), "out_dir": str(tmp_path / "a"), "max_iters": 2})  # windows of 16
    assert "warning" not in capsys.readouterr().err
    with pytest.raises(DataError, match=r"^The text has 546 characters, too few to train on: add 3,354 more characters"):
        model.training.trainer.train({**SMALL, "block_size": None, "data": str(text), "out_dir": str(tmp_path / "b"), "max_iters": 2})
    assert not (tmp_path / "b").exists()


def test_the_log_follows_training_between_evaluations(tmp_path, text, bytes_tok, monkeypatch):
    monkeypatch.setattr(model.training.trainer, "LOG_EVERY_S", 0.0)
    seen = []  # (last step in log.jsonl, whether loss.png exists) at each write between evaluations
    write_log = model.training.trainer.RunFiles.write_log

    def spy(self, plot=True):
        write_log(self, plot)
        if not plot:
            seen.append(records(self.out)[-1]["step"])

    monkeypatch.setattr(model.training.trainer.RunFiles, "write_log", spy)
    out = tmp_path / "out"
    model.training.trainer.train({**SMALL, "data": str(text), "out_dir": str(out), "max_iters": 8, "eval_interval": 8})
    assert seen == list(range(1, 9))  # a live view (the app's Train tab) sees every step's record, not only the evaluations'


def test_patience_stops_a_run_whose_validation_stopped_improving(tmp_path, text, capsys, bytes_tok, monkeypatch):
    """Validation that gets worse after step 4 ends the run after --patience evaluations without a new best, says so in
    one line, and keeps step 4's weights as the result."""
    evaluate = model.training.trainer.evaluate
    worse = iter(range(1, 1000))

    def scores(*a, **kw):
        val = evaluate(*a, **kw)
        if model_step() > 4:  # from step 8 on, every evaluation is worse than the last
            bump = next(worse)
            val = {**val, "val_nats_per_token": 9.0 + bump, "val_nats_per_char": 3.0 + bump}
        return val

    trainers = []
    real_init = model.training.trainer.Trainer.__init__
    monkeypatch.setattr(model.training.trainer.Trainer, "__init__",
                        lambda self, *a, **kw: trainers.append(self) or real_init(self, *a, **kw))

    def model_step():
        return trainers[-1].state.step

    monkeypatch.setattr(model.training.trainer, "evaluate", scores)
    out = tmp_path / "out"
    metrics = model.training.trainer.train({**SMALL, "data": str(text), "out_dir": str(out), "max_iters": 100, "eval_interval": 4,
                                   "patience": 3}).metrics
    printed = capsys.readouterr().out
    assert metrics["step"] == 16 and metrics["best_step"] == 4 and metrics["stopped_early"]  # evaluations at 8, 12, 16
    assert printed.count("stopping early") == 1
    assert "stopping early at step 16: validation has not improved for 3 evaluations (12 steps)" in printed
    assert json.loads((out / "metrics.json").read_text())["stopped_early"] is True


@pytest.mark.slow
def test_resume_continues_a_muon_run_exactly(tmp_path, text, bytes_tok):
    common = {**SMALL, "data": str(text), "max_iters": 8, "eval_interval": 4, "warmup_iters": 2, "optimizer": "muon",
              "rotary": True, "mlp": "relu2"}
    straight = model.training.trainer.train({**common, "out_dir": str(tmp_path / "a")})
    model.training.trainer.train({**common, "out_dir": str(tmp_path / "b")}, stop_after=3)
    resumed = model.training.trainer.train({"resume": True, "out_dir": str(tmp_path / "b")})
    assert resumed.step == 8 and abs(resumed.last_loss - straight.last_loss) < 1e-5
    with pytest.raises(checkpoint.CheckpointError, match="trained with optimizer='muon', not 'adamw'"):
        model.training.trainer.train({"resume": True, "out_dir": str(tmp_path / "b"), "optimizer": "adamw"})
    with pytest.raises(checkpoint.CheckpointError, match="trained with muon_lr_scale=1.0, not 3.0"):  # the saved state's
        model.training.trainer.train({"resume": True, "out_dir": str(tmp_path / "b"), "muon_lr_scale": 3.0})  # scale would win


def test_without_a_terminal_progress_is_a_plain_line_now_and_then(tmp_path, text, capsys, bytes_tok):
    """`python train.py > log 2>&1`: no \\r redraws piling up, a plain line at the start, every few seconds and at the end,
    and with a budget one clock, the budget's."""
    out = tmp_path / "out"
    assert train.main(cli({**SMALL, "data": text, "out_dir": out, "max_iters": 30, "eval_interval": 100})) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("train: ")]
    assert len(lines) == 2 and lines[-1].startswith("train: 30/30 step (100%), ") and " step/s, step=30" not in lines[-1]
    assert re.search(r"\d step/s, loss=\d", lines[-1])
    assert train.main(cli({**SMALL, "data": text, "out_dir": tmp_path / "timed", "max_iters": 30, "eval_interval": 100,
                           "max_minutes": 0.5})) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    line = next(line for line in err.splitlines() if line.startswith("train: "))
    assert re.match(r"train: \d+/30 s of the budget \(\d+%\), step=\d+, loss=", line), line
    assert not re.search(r"\d\d:\d\d", err)  # no second clock (tqdm's elapsed<remaining)


def test_on_a_terminal_the_budget_bar_shows_the_budgets_clock_only():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    bar = model.progress.Progress(30, "s", "train", initial=9, budget=True, stream=stream)
    bar.update(12, "step=3")
    bar.close()
    shown = stream.getvalue()
    assert "12/30 s of the budget, step=3" in shown and not re.search(r"\d\d:\d\d", shown)


def test_plain_progress_lines_come_every_few_seconds(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(model.progress.time, "perf_counter", lambda: now[0])
    stream = io.StringIO()
    bar = model.progress.Progress(100, "step", "train", stream=stream)
    for n in range(1, 101):
        now[0] = n * 0.5  # a step every half second: 50 s in all
        bar.update(n, f"loss={n}")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert model.progress.PLAIN_EVERY_S == 10.0  # the first at 0.5 s, then one every 10 s, and the last at the end
    assert [int(line.split()[1].split("/")[0]) for line in lines] == [1, 21, 41, 61, 81, 100]
    assert lines[0] == "train: 1/100 step (1%), 2.00 step/s, loss=1" and lines[-1].startswith("train: 100/100 step (100%)")


def test_a_short_budgeted_run_draws_its_curves(tmp_path, bytes_tok, monkeypatch):
    """A run of a few seconds (the app's 1-minute runs, scaled down): the initial weights are scored on a few windows, not
    the whole split; validation is estimated often enough for a curve (log.jsonl marks those estimates), the final point
    is the whole split; and a train line exists even when --log-interval is never reached."""
    clock = [1000.0]  # a clock that only steps move, 10 ms a step: the run is the same however busy the machine is
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    real_step = model.training.trainer.Trainer.train_step

    def train_step(self):
        clock[0] += 0.01
        return real_step(self)

    monkeypatch.setattr(model.training.trainer.Trainer, "train_step", train_step)
    monkeypatch.setattr(model.training.trainer, "LOG_EVERY_S", 0.5)
    data = tmp_path / "input.txt"
    data.write_text(TEXT * 12, encoding="utf-8")  # a validation split of 41 windows of 16 tokens
    scored = []
    evaluate = model.training.trainer.evaluate
    monkeypatch.setattr(model.training.trainer, "evaluate", lambda *a, **kw: scored.append(kw.get("max_windows")) or evaluate(*a, **kw))
    flags = {k: v for k, v in SMALL.items() if k not in ("eval_windows", "log_interval")}
    out = tmp_path / "out"
    metrics = model.training.trainer.train({**flags, "data": str(data), "out_dir": str(out), "max_iters": 10**6, "max_minutes": 0.05,
                                            "eval_interval": 10**6, "log_interval": 10**6}).metrics
    val = [r for r in records(out) if "val_nats_per_char" in r]
    assert scored[0] == model.training.trainer.ESTIMATE_WINDOWS and val[0]["step"] == 0 and val[0]["estimate"]
    assert val[0]["val_tokens"] <= model.training.trainer.ESTIMATE_WINDOWS * 16 < 656 - 1
    assert len(val) >= 8 and all(r.get("estimate") for r in val[:-2]), [(r["step"], r.get("estimate")) for r in val]
    assert [r["step"] for r in val] == sorted(r["step"] for r in val)
    last = val[-1]
    assert last["final"] and "estimate" not in last and last["val_tokens"] == metrics["val_tokens"] == 656 - 1
    train_points = [r["step"] for r in records(out) if "train_loss" in r]
    assert len(train_points) >= 5 and train_points[0] <= 55  # one every LOG_EVERY_S (50 steps)


def test_threads_are_chosen_once_by_the_plan_not_by_the_trainer(tmp_path, text, bytes_tok):
    """The plan sets torch's threads once, when the run is resolved; building a trainer sets nothing global."""
    before = torch.get_num_threads()
    plan = resolve({**SMALL, "data": str(text), "out_dir": str(tmp_path / "out"), "max_iters": 1, "threads": before + 1})
    assert torch.get_num_threads() == before + 1
    torch.set_num_threads(before)
    Trainer(plan)
    assert torch.get_num_threads() == before


def test_the_run_state_is_saved_and_restored_from_one_field_list(tmp_path, text, bytes_tok, capsys):
    out = tmp_path / "out"
    model.training.trainer.train({**SMALL, "data": str(text), "out_dir": str(out), "max_iters": 6, "eval_interval": 2,
                                  "patience": 9}, stop_after=5)
    state = checkpoint.load_train_state(out / checkpoint.TRAIN_STATE)
    # The layout train_state.pt has always had (flat, plain data), so states saved before still resume.
    assert set(state) == {"version", "args", "model_config", "tokenizer", "model", "optimizer", "scaler", "rng", "step",
                          "tokens_seen", "best_val", "best_step", "evals_since_best", "elapsed", "t_loop", "t_warm",
                          "eval_sec_per_token"}
    run = model.training.trainer.RunState.from_saved(state)
    assert dataclasses.asdict(run) == {k: state[k] for k in dataclasses.asdict(run)} and run.step == 5
    del state["evals_since_best"]  # as the oldest states were written
    checkpoint.save_train_state(out / checkpoint.TRAIN_STATE, state)
    assert model.training.trainer.train({"resume": True, "out_dir": str(out)}).step == 6
    del state["best_step"]
    checkpoint.save_train_state(out / checkpoint.TRAIN_STATE, state)
    capsys.readouterr()
    assert train.main(["--resume", "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Cannot resume: ") and "is incomplete or from another setup (KeyError: 'best_step')" in err
    assert err.count("\n") == 1


def test_a_rounds_budget_of_whole_seconds_is_announced_in_minutes_and_seconds(tmp_path, text, bytes_tok, capsys):
    minutes = whole_seconds(1796.4) / 60  # a round's budget (model/training/rounds.py): 29.9333... minutes
    trainer = Trainer(resolve({**SMALL, "data": str(text), "out_dir": str(tmp_path / "out"), "max_minutes": minutes}))
    trainer.announce()
    assert "time budget: 29 min 56 s in total" in capsys.readouterr().out
    assert [minutes_text(m) for m in (9.5, 0.1, 30, 50 / 60, 61 / 60)] == ["9.5 min", "0.1 min", "30 min", "50 s", "1 min 1 s"]


def earlier_session_took(out: Path, seconds: float) -> None:
    """Make the resume state of out say that the run's earlier sessions took this long."""
    state = checkpoint.load_train_state(out / checkpoint.TRAIN_STATE)
    checkpoint.save_train_state(out / checkpoint.TRAIN_STATE, {**state, "elapsed": seconds})


def test_resuming_a_finished_run_says_it_only_evaluated_again_not_the_runs_time(tmp_path, text, bytes_tok, capsys):
    out = tmp_path / "out"
    model.training.trainer.train({**SMALL, "data": str(text), "out_dir": str(out), "max_iters": 2})
    earlier_session_took(out, 104.0)
    capsys.readouterr()
    assert model.training.trainer.train({"resume": True, "out_dir": str(out)}).step == 2
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.match(r"nothing left to train \(the run had finished at step 2\); evaluated again in \d s: val ", last), last


def test_a_resumed_run_says_its_time_and_this_sessions(tmp_path, text, bytes_tok, capsys):
    out = tmp_path / "out"
    model.training.trainer.train({**SMALL, "data": str(text), "out_dir": str(out), "max_iters": 3}, stop_after=1)
    earlier_session_took(out, 104.0)
    capsys.readouterr()
    assert model.training.trainer.train({"resume": True, "out_dir": str(out)}).step == 3
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.match(r"done in 10\d s, \d s of them in this session: val ", last), last

"""Data-parallel training under torchrun on the CPU (gloo): checkpoint, equivalence with one process, resume, a killed rank."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_support import TEXT

import model.training.trainer
import train
from model.training import distributed
from model.training.plan import settings_for

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# A 1-layer, 16-wide GPT-2-vocabulary model: 2 processes x batch 2 = a global micro-batch of 4 windows of 16 tokens
# (no --grad-accum: under torchrun each process takes one micro-batch per step).
FLAGS = {"preset": "tiny", "n_layer": 1, "n_embd": 16, "n_head": 2, "block_size": 16, "batch_size": 2,
         "max_iters": 4, "eval_interval": 2, "eval_windows": 2, "log_interval": 1, "max_minutes": 0, "dtype": "fp32", "device": "cpu",
         "lr": 0.01, "warmup_iters": 100}  # still warming up at the end: the LR of a step does not depend on --max-iters
# The default block (the cpu preset: rotary positions, Muon), as small: rank 0 alone writes a sample at each evaluation,
# and DDP syncs the model's buffers at every forward; the samples' KV caches must not become buffers of rank 0's model.
DEFAULT = {"preset": "cpu", "n_layer": 1, "n_embd": 16, "n_head": 2, "block_size": 16, "dropout": 0.0, "batch_size": 2,
           "max_iters": 4, "eval_interval": 2, "eval_windows": 2, "log_interval": 1, "max_minutes": 0, "dtype": "fp32",
           "device": "cpu"}
# Measured: after 6 steps the 2-process losses differ from one process with batch 4 by at most 5e-7 (float summation order).
TOL = 1e-5


def cli(flags: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]


def torchrun(tmp: Path, *args: str, nproc: int = 2, **popen) -> subprocess.Popen:
    """torchrun --standalone (a free rendezvous port) with each rank's stdout and stderr in its own file under tmp/logs."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "--redirects=3",
           f"--log-dir={tmp / 'logs'}", "train.py", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, (out + err)[-3000:]
    return out + err


def rank_log(tmp: Path, rank: int, stream: str) -> str:
    """What one rank printed in the latest torchrun run under tmp/logs."""
    paths = sorted((tmp / "logs").glob(f"*/attempt_*/{rank}/{stream}.log"), key=lambda p: p.stat().st_mtime)
    return paths[-1].read_text()


def records(out: Path, key: str) -> dict[int, float]:
    """The values of key per step in log.jsonl, without the final evaluation's record (the best weights, not the step's)."""
    return {r["step"]: r[key] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if key in r and not r.get("final")}


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ddp") / "input.txt"
    path.write_text(TEXT * 3, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def two_procs(tmp_path_factory, text) -> Path:
    """Four steps of 2 ranks x batch 2 (no --grad-accum: one micro-step each) with the offline GPT-2 vocabulary."""
    tmp = tmp_path_factory.mktemp("ddp2")
    out = tmp / "out"
    finish(torchrun(tmp, *cli({**FLAGS, "data": text, "out_dir": out})))
    return out


@pytest.fixture(scope="module")
def one_proc(tmp_path_factory, text, gpt2_tokenizer) -> Path:
    """The reference: six steps of one process with batch 4, the same global batch, in this process."""
    out = tmp_path_factory.mktemp("ddp1") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.training.trainer.train({**FLAGS, "data": str(text), "out_dir": str(out), "batch_size": 4, "grad_accum": 1, "max_iters": 6})
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.slow
def test_two_processes_write_a_checkpoint_generate_py_reads(two_procs):
    tmp = two_procs.parent
    rank0, rank1 = rank_log(tmp, 0, "stdout"), rank_log(tmp, 1, "stdout")
    assert "2 processes x batch 2 x 1 micro-steps x 16 tokens = global batch of 64 tokens per step" in rank0
    assert "step 4: val" in rank0 and "done in" in rank0
    assert rank1 == "" and "step/s" not in rank_log(tmp, 1, "stderr")  # rank 1 neither prints nor draws the bar
    assert "step/s" in rank_log(tmp, 0, "stderr")
    metrics = json.loads((two_procs / "metrics.json").read_text())
    assert metrics["step"] == 4 and metrics["tokens_seen"] == 4 * 2 * 2 * 16  # both ranks' tokens count
    assert all(r > 0 for r in records(two_procs, "tokens_per_s").values())
    assert not list(two_procs.glob("*.tmp*"))
    gen = subprocess.run([sys.executable, "generate.py", "--ckpt", str(two_procs), "--prompt", "First Citizen:", "--max-new-tokens", "5",
                          "--seed", "1"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert gen.stdout.startswith("First Citizen:") and len(gen.stdout.strip()) > len("First Citizen:")


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(two_procs, one_proc):
    ddp, ref = records(two_procs, "train_loss"), records(one_proc, "train_loss")
    assert sorted(ddp) == [1, 2, 3, 4]
    assert all(abs(ddp[s] - ref[s]) < TOL for s in ddp), (ddp, ref)
    assert len({round(v, 3) for v in ddp.values()}) > 1  # the steps saw different batches
    ddp_val, ref_val = records(two_procs, "val_nats_per_token"), records(one_proc, "val_nats_per_token")
    assert all(abs(ddp_val[s] - ref_val[s]) < TOL for s in ddp_val) and ddp_val[4] < ddp_val[0]


@pytest.mark.slow
def test_resume_under_torchrun_continues_the_steps(tmp_path, two_procs, one_proc):
    out = tmp_path / "out"
    shutil.copytree(two_procs, out)
    finish(torchrun(tmp_path, "--resume", f"--out-dir={out}", "--max-iters=6"))
    assert "step 6: val" in rank_log(tmp_path, 0, "stdout")
    losses, ref = records(out, "train_loss"), records(one_proc, "train_loss")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert all(abs(losses[s] - ref[s]) < TOL for s in losses), (losses, ref)  # as if never interrupted
    assert json.loads((out / "metrics.json").read_text())["tokens_seen"] == 6 * 4 * 16


@pytest.mark.slow
def test_the_default_block_trains_and_resumes_under_torchrun(tmp_path, text):
    """torchrun with the cpu preset's block (rotary, Muon): evaluations with their samples on rank 0 only, then a resume."""
    out = tmp_path / "out"
    finish(torchrun(tmp_path, *cli({**DEFAULT, "data": text, "out_dir": out})))
    rank0 = rank_log(tmp_path, 0, "stdout")
    assert "step 2: val" in rank0 and "step 4: val" in rank0 and "done in" in rank0
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["rotary"] and saved["train"]["optimizer"] == "muon"
    finish(torchrun(tmp_path, "--resume", f"--out-dir={out}", "--max-iters=6"))
    assert "step 6: val" in rank_log(tmp_path, 0, "stdout")
    assert sorted(records(out, "train_loss")) == [1, 2, 3, 4, 5, 6]
    assert json.loads((out / "metrics.json").read_text())["step"] == 6


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _rank_of(pid: int) -> str | None:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next((v.decode().split("=", 1)[1] for v in env if v.startswith(b"RANK=")), None)


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_with_an_error(tmp_path, text):
    out = tmp_path / "out"
    proc = torchrun(tmp_path, *cli({**FLAGS, "data": text, "out_dir": out, "max_iters": 10**6, "eval_interval": 10**6}))
    try:
        deadline = time.monotonic() + 120
        while not (out / "train_state.pt").is_file():  # written after the step-0 evaluation: both ranks are training
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        victim = next(p for p in _children(proc.pid) if _rank_of(p) == "1")
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)
        assert proc.returncode != 0
        assert time.monotonic() - t0 < 60
        assert "exitcode" in err and "-9" in err  # torchrun names the rank that died and why
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.slow
def test_without_the_agent_a_dead_peer_ends_in_one_clear_error(tmp_path, text):
    """Without torchrun's agent (e.g. a node lost in a multi-node run) the surviving rank stops itself."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    cmd = [sys.executable, "train.py", *cli({**FLAGS, "data": text, "out_dir": out, "max_iters": 10**6, "eval_interval": 10**6})]
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen(cmd, cwd=ROOT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        deadline = time.monotonic() + 120
        while not (out / "train_state.pt").is_file():
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
            time.sleep(0.2)
        procs[1].kill()
        t0 = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        assert procs[0].returncode == 1 and time.monotonic() - t0 < 60
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: another training process died or stopped answering (") and last.endswith("--resume.")
        assert "Traceback" not in err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()


def test_grad_accum_must_split_evenly_over_the_processes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    data = tmp_path / "input.txt"
    data.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "out"
    assert train.main(cli({**FLAGS, "data": data, "out_dir": out, "grad_accum": 3})) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --grad-accum 3 (micro-batches per optimizer step, all processes together) cannot be split")
    assert "use a multiple of 2" in err and err.count("\n") == 1 and not out.exists()


def test_without_grad_accum_each_process_takes_one_micro_batch_per_step(monkeypatch):
    """torchrun --nproc_per_node=N train.py works with the defaults: an unset --grad-accum becomes a multiple of N."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert settings_for({"preset": "tiny", "device": "cpu"}).grad_accum == 2  # 2 processes x batch 16 x 1 micro-step
    assert settings_for({"preset": "gpt2", "device": "cpu"}).grad_accum == 8  # the preset's 8 splits as 4 per process
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert settings_for({"preset": "gpt2", "device": "cpu"}).grad_accum == 9  # rounded up to a multiple of 3
    assert settings_for({"preset": "tiny", "device": "cpu", "grad_accum": 6}).grad_accum == 6  # a given value is kept


def test_without_torchrun_there_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = distributed.setup(torch.device("cpu"))
    assert (info.rank, info.world_size, info.master, info.enabled) == (0, 1, True, False)
    assert info.mean(2.5, torch.device("cpu")) == 2.5 and info.from_master([1.0, 0.5], torch.device("cpu")) == [1.0, 0.5]
    assert distributed.Dist(rank=1, local_rank=1, world_size=2).device(torch.device("cuda")) == torch.device("cuda", 1)

"""model/webapp/zerogpu.py's GpuTrainer, the Train tab's handle on a training inside a @spaces.GPU call, with the call
replaced by a stand-in: what training_job needs of it (poll, wait with a timeout, Stop, kill), the request's context
carried into the call (ZeroGPU charges that visitor), and ZeroGPU's refusals becoming the job's one sentence. The
real call, in spaces' forked worker, is tested in tests/test_space.py."""

from __future__ import annotations

import contextvars
import os
import signal
import subprocess
import sys
import threading

import pytest

from model.webapp import zerogpu
from model.webapp.training_job import _failure, _log_tail

VISITOR = contextvars.ContextVar("visitor", default=None)


@pytest.fixture
def gpu_call(monkeypatch):
    """train_on_gpu replaced: it records the visitor it runs for and waits for the Stop file (or `release`)."""
    seen, release = {}, threading.Event()

    def fake(script, argv, log_path, minutes):
        seen.update(visitor=VISITOR.get(), argv=argv, minutes=minutes)
        stop = os.path.join(os.path.dirname(log_path), zerogpu.STOP_FILE)
        while not release.wait(0.05):
            if os.path.exists(stop):
                return 130
        return 0

    monkeypatch.setattr(zerogpu, "train_on_gpu", fake)
    yield seen, release
    release.set()


def test_duration_is_the_budget_plus_overhead():
    assert zerogpu.gpu_seconds("train.py", [], "log", 2) == 120 + zerogpu.OVERHEAD_S


def test_runs_in_the_starting_requests_context_and_stops(gpu_call, tmp_path):
    seen, _ = gpu_call
    VISITOR.set("session-1")  # as Gradio sets its request variable while a handler runs
    job = zerogpu.GpuTrainer(tmp_path / "train.py", ["--max-minutes", "2"], tmp_path / "train.log", 2)
    with pytest.raises(subprocess.TimeoutExpired):
        job.wait(timeout=0.3)
    assert job.poll() is None and seen == {"visitor": "session-1", "argv": ["--max-minutes", "2"], "minutes": 2}
    job.send_signal(signal.SIGINT)
    assert job.wait(timeout=10) == 130 and (tmp_path / zerogpu.STOP_FILE).exists()


def test_kill_ends_the_job_at_once_and_kills_the_worker(gpu_call, tmp_path):
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / zerogpu.PID_FILE).write_text(str(worker.pid), encoding="utf-8")
        job = zerogpu.GpuTrainer(tmp_path / "train.py", [], tmp_path / "train.log", 1)
        job.send_signal(signal.SIGKILL)
        assert job.wait(timeout=1) == -signal.SIGKILL
        assert worker.wait(timeout=10) == -signal.SIGKILL
    finally:
        if worker.poll() is None:
            worker.kill()


def test_a_zerogpu_refusal_becomes_the_jobs_sentence(monkeypatch, tmp_path):
    def refuse(*args):
        raise RuntimeError("You have exceeded your free ZeroGPU quota (100s requested vs. 60s left).\nTry again in 0:30:00.")

    monkeypatch.setattr(zerogpu, "train_on_gpu", refuse)
    job = zerogpu.GpuTrainer(tmp_path / "train.py", [], tmp_path / "train.log", 1)
    assert job.wait(timeout=10) == 1
    sentence = _failure(_log_tail(tmp_path / "train.log"), 1, "Training")
    assert sentence == ("ZeroGPU: You have exceeded your free ZeroGPU quota (100s requested vs. 60s left). "
                        "Try again in 0:30:00.")

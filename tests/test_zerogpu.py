"""model/webapp/zerogpu.py's GpuTrainer, the Train tab's handle on a training inside a @spaces.GPU call, with the call
replaced by a stand-in: what training_job needs of it (poll, wait with a timeout, Stop, kill), the request's context
carried into the call (ZeroGPU charges that visitor), and ZeroGPU's refusals becoming the job's one sentence. The
real call, in spaces' forked worker, is tested in tests/test_space.py."""

from __future__ import annotations

import contextvars
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from importlib import resources

import pytest
from train_support import TEXT

from model.training.data import split_text, text_tokenizer
from model.training.settings import TrainSettings
from model.webapp import zerogpu
from model.webapp.training_job import _failure, _log_tail

VISITOR = contextvars.ContextVar("visitor", default=None)


@pytest.fixture
def gpu_call(monkeypatch):
    """train_on_gpu replaced: it records the visitor it runs for and waits for the Stop file (or `release`)."""
    seen, release = {}, threading.Event()

    def fake(script, argv, log_path, request_s):
        seen.update(visitor=VISITOR.get(), argv=argv, request_s=request_s)
        stop = os.path.join(os.path.dirname(log_path), zerogpu.STOP_FILE)
        while not release.wait(0.05):
            if os.path.exists(stop):
                return 130
        return 0

    monkeypatch.setattr(zerogpu, "train_on_gpu", fake)
    yield seen, release
    release.set()


def _spaces_configs() -> list[dict]:
    """The GPUs spaces 0.51.3 knows, with their duration_factor (spaces/zero/configs.json)."""
    return json.loads(resources.files("spaces.zero").joinpath("configs.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("tokens", [0, 50_000, 300_000, 5_000_000])  # sizes without a cap, and one with (Tiny Shakespeare's)
def test_the_default_fits_an_anonymous_quota_and_the_largest_a_free_one_on_every_gpu(monkeypatch, tokens):
    """What spaces' own client would send to /schedule (get_duration_seconds, rounded as schedule() rounds), on each GPU
    of its configs.json, the Blackwell card's duration_factor of 1.5 included."""
    from spaces.zero import client, config

    configs = _spaces_configs()
    assert max(c["duration_factor"] for c in configs) == zerogpu.DURATION_FACTOR_MAX == 1.5
    for gpu in configs:
        monkeypatch.setattr(config, "get_config", lambda gpu=gpu: gpu)
        for minutes, quota in ((zerogpu_minutes("default"), zerogpu.ANONYMOUS_QUOTA_S), (zerogpu_minutes("max"), zerogpu.FREE_QUOTA_S)):
            request = zerogpu.request_seconds(tokens, minutes)
            sent = round(client.get_duration_seconds(timedelta(seconds=request), None))
            assert sent == zerogpu.charged(request, gpu["duration_factor"]) <= quota, (gpu["model"], minutes, request, sent)
    assert (zerogpu.ANONYMOUS_QUOTA_S, zerogpu.FREE_QUOTA_S) == (120, 210)  # 2 and 3.5 minutes: the hub's ZeroGPU page


def zerogpu_minutes(which: str) -> float:
    return {"default": zerogpu.DEFAULT_MINUTES, "max": zerogpu.MAX_MINUTES}[which]


def test_the_request_follows_the_texts_cap_and_the_training_ends_inside_it():
    capped = 300_000  # a split the middle size caps at 7 passes: train.py's own plan says how many steps
    steps = zerogpu.cap_steps(capped)
    assert steps == math.ceil(7 * capped / (16 * 128)) < TrainSettings.max_iters
    assert zerogpu.request_seconds(capped, zerogpu.MAX_MINUTES) == math.ceil(zerogpu.OVERHEAD_S + steps * zerogpu.GPU_STEP_S)
    assert zerogpu.request_seconds(0, 1) == zerogpu.OVERHEAD_S + 60  # no cap: the visitor's minutes bound it
    for request in (zerogpu.request_seconds(capped, 1), zerogpu.request_seconds(0, zerogpu.MAX_MINUTES)):
        assert 0 < zerogpu.train_budget_s(request) <= request - zerogpu.START_RESERVE_S - zerogpu.EXIT_RESERVE_S
    text = TEXT * 40
    tokenizer = text_tokenizer(TrainSettings.tokenizer, text, TrainSettings.vocab_min_count)
    assert zerogpu.train_tokens(text) == len(tokenizer.encode(split_text(text)[0]))


# ZeroGPU's refusals, as spaces/zero/client.py words them, and the sentence the visitor reads instead
REFUSALS = {
    "You have exceeded your free ZeroGPU quota (112s requested vs. 60s left). Try again in 0:30:00. Subscribe to Hugging "
    "Face PRO to get 40 min of ZeroGPU quota a day - https://huggingface.co/subscribe/pro?from=ZeroGPU":
        "ZeroGPU refused: this run asks for 112 s of GPU time and your daily quota has 60 s left; choose fewer minutes, "
        "log in to Hugging Face for a larger quota, or try again in 0:30:00.",
    "The requested GPU duration (300s) is larger than the maximum allowed":
        "ZeroGPU refused: 300 s is more GPU time than it allows you in one run; choose fewer minutes, or log in to Hugging "
        "Face, which allows longer runs.",
    "No GPU was available after 60s. Try re-running outside of examples if it happened after clicking one":
        "ZeroGPU had no GPU free (it waits up to a minute for one); try again in a few minutes.",
    "No GPU was available": "ZeroGPU had no GPU free (it waits up to a minute for one); try again in a few minutes.",
    "Space app has reached its GPU limit. Try re-running outside of examples if it happened after clicking one":
        "ZeroGPU refused: visitors without a Hugging Face login have used up this Space's GPU time for now; log in to "
        "Hugging Face, or try again later.",
}


@pytest.mark.parametrize("message", REFUSALS)
def test_a_refusal_says_what_to_do_in_one_sentence(message):
    sentence = zerogpu.refusal(message)
    assert sentence == REFUSALS[message]
    assert sentence.count(". ") == 0 and sentence.endswith(".")


def test_runs_in_the_starting_requests_context_and_stops(gpu_call, tmp_path):
    seen, _ = gpu_call
    VISITOR.set("session-1")  # as Gradio sets its request variable while a handler runs
    job = zerogpu.GpuTrainer(tmp_path / "train.py", ["--max-minutes", "2"], tmp_path / "train.log", 75)
    with pytest.raises(subprocess.TimeoutExpired):
        job.wait(timeout=0.3)
    assert job.poll() is None and seen == {"visitor": "session-1", "argv": ["--max-minutes", "2"], "request_s": 75}
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
    assert sentence == ("ZeroGPU refused: this run asks for 100 s of GPU time and your daily quota has 60 s left; choose "
                        "fewer minutes, log in to Hugging Face for a larger quota, or try again in 0:30:00.")


def test_the_worker_trains_the_first_model_only_on_a_budget_from_its_own_start(tmp_path):
    """Inside the GPU call, train.py's rounds (teachers and a student in the time the cap leaves) would spend the visitor's
    quota: the worker runs the first model alone, its --max-minutes counted from the worker's start, which it records
    (the job's clock starts there, not while the call waited for a GPU)."""
    script = tmp_path / "train.py"
    script.write_text(
        "import time\n"
        "from model.training.rounds import train\n"
        "def main(argv, t_start=None):\n"
        "    from model.training import trainer\n"
        "    first_only = train is trainer.train\n"
        "    return 0 if first_only and t_start is not None and 0 <= time.perf_counter() - t_start < 5 else 3\n",
        encoding="utf-8")
    before = time.monotonic()
    assert zerogpu._train_in_worker(str(script), [], str(tmp_path / "train.log"), 75) == 0
    assert before <= float((tmp_path / zerogpu.STARTED_FILE).read_text(encoding="utf-8")) <= time.monotonic()

"""The Train tab's engine: text checks, a training job in a child process (train, stop, crash, quantize), the one-job slot,
the model store and the download zip."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
from site_support import check_site_folder
from train_support import TEXT

from model.formats import site
from model.formats.load import load
from model.webapp import training_job as tj
from model.webapp.training_job import JobError, TrainingJob, TrainingSlot, check_text, make_zip
from model.webapp.visitors import Visitors

ROOT = Path(__file__).resolve().parents[1]
# A 1-layer, 32-wide model over bytes: train.py starts, trains and evaluates in a few seconds.
TINY = ("--preset", "tiny", "--tokenizer", "bytes", "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "16",
        "--batch-size", "4", "--eval-interval", "10", "--eval-windows", "4", "--log-interval", "5", "--dtype", "fp32", "--device", "cpu")
LONG = TEXT * (tj.MIN_CHARS // len(TEXT) + 1)  # just above MIN_CHARS


@pytest.fixture
def jobs():
    """Jobs a test starts; each is discarded afterwards, so no child process outlives the test."""
    started: list[TrainingJob] = []
    yield started
    for job in started:
        job.discard()


def wait_until_over(job: TrainingJob, timeout: float = 120) -> tj.Status:
    deadline = time.monotonic() + timeout
    while job.state in tj.ACTIVE:
        assert time.monotonic() < deadline, job.status()
        time.sleep(0.1)
    return job.status()


def wait_gone(path: Path, timeout: float = 10) -> bool:
    """Whether path vanishes within timeout (a job deletes its folder just after its final state is set)."""
    deadline = time.monotonic() + timeout
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not path.exists()


def wait_for_eval(job: TrainingJob, min_step: int, timeout: float = 120) -> None:
    """Until the log holds a validation record at min_step or later (the best weights are saved by then)."""
    deadline = time.monotonic() + timeout
    while not any(r["step"] >= min_step for r in job.status().records if "val_nats_per_char" in r):
        assert job.active and time.monotonic() < deadline, job.status()
        time.sleep(0.1)


def test_check_text_returns_the_text():
    assert check_text(LONG.encode()) == LONG
    assert check_text(("é\f\t" + LONG).encode()) == "é\f\t" + LONG  # accents, form feeds and tabs are text


@pytest.mark.parametrize("data, message", [
    (b"", "is empty"),
    (b"  \n\t ", "is empty"),
    (b"caf\xe9 " * 1000, "not valid UTF-8: byte 0xe9 at offset 3"),
    (bytes(range(256)) * 20, "binary file"),
    ((b"\x01\x02\x1b" + b"abc") * 1000, "binary file"),  # valid UTF-8, but half control characters
    (b"\x89PNG\r\n\x1a\n" + b"\x00\xff" * 500, "binary file"),
    (b"To be, or not to be", "19 characters, too few to train on"),
    (b"a" * (tj.MAX_BYTES + 1), "over the limit of 10 MB"),
])
def test_bad_text_is_refused_in_one_sentence_and_leaves_nothing(tmp_path, data, message):
    with pytest.raises(JobError, match=message) as e:
        check_text(data)
    text = str(e.value)
    assert text.endswith(".") and "\n" not in text and "Traceback" not in text
    slot = TrainingSlot(tmp_path / "runs", train_args=TINY)
    with pytest.raises(JobError, match=message):
        slot.start(data, 3)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    assert slot.current() is None


@pytest.mark.parametrize("minutes", [0, 0.5, 11, math.nan])
def test_minutes_outside_the_range_are_refused(tmp_path, minutes):
    with pytest.raises(JobError, match="between 1 and 10 minutes"):
        TrainingSlot(tmp_path / "runs").start(LONG.encode(), minutes)


def test_a_server_that_cannot_write_refuses_in_one_sentence(tmp_path):
    (tmp_path / "runs").write_text("a file where the jobs' folder should be")
    with pytest.raises(JobError, match=r"^The server could not start the training \(.*\); please try again later\.$"):
        TrainingSlot(tmp_path / "runs").start(LONG.encode(), 1)


@pytest.mark.slow
def test_a_run_trains_quantizes_and_zips_into_loadable_checkpoints(tmp_path, jobs):
    slot = TrainingSlot(tmp_path / "runs", train_args=(*TINY, "--max-iters", "30"))
    jobs.append(job := slot.start(LONG.encode(), 1))
    assert slot.current() is job
    st = wait_until_over(job)
    assert st.state == "done" and st.error is None, st
    assert st.report["val_nats_per_char_int8"] > 0 and st.report["val_nats_per_char_fp32"] > 0
    assert [s for s, _ in st.val_curve] == [0, 10, 20, 30]
    assert [s for s, _ in st.train_curve] == [5, 10, 15, 20, 25, 30]
    assert all(v > 0 for _, v in st.train_curve + st.val_curve)
    assert isinstance(st.sample, str) and st.sample  # the trainer's sample of the last evaluation
    assert 0 < st.elapsed_s < 60 and st.seconds_left == 0 and slot.current() is None
    assert st.model_dir == job.int8_dir and load(st.model_dir).kind == "int8"

    path = make_zip(job.run_dir)
    assert make_zip(job.run_dir) == path  # written once
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "unzipped")
    top = f"smallgpt-{job.run_dir.name}"
    assert {f"{top}/model.safetensors", f"{top}/config.json", f"{top}/metrics.json", f"{top}/int8/model.safetensors",
            f"{top}/int8/config.json", f"{top}/int8/report.json"} <= names
    assert not any("train_state" in n or "tokens/" in n or n.endswith(".log") for n in names)
    unzipped = tmp_path / "unzipped" / top
    assert load(unzipped).kind == "fp32"
    gen = subprocess.run([sys.executable, "generate.py", "--ckpt", str(unzipped / "int8"), "--prompt", "hi", "--max-new-tokens", "5"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert gen.returncode == 0 and gen.stdout.startswith("hi"), gen.stderr[-2000:]

    # The static web site, written by export_web.py from the visitor's fp32 weights, zipped in its own folder.
    assert st.site_folder == f"{top}-site" and st.site_error is None and not st.writing_site
    site_zip = make_zip(job.run_dir, "site")
    assert site_zip == job.run_dir / f"{top}-site.zip" and make_zip(job.run_dir, "site") == site_zip
    with zipfile.ZipFile(site_zip) as zf:
        assert {n.split("/")[0] for n in zf.namelist()} == {f"{top}-site"}
        zf.extractall(tmp_path / "site")
    check_site_folder(tmp_path / "site" / f"{top}-site")
    assert "site" not in "".join(names)  # the model's zip is as before


@pytest.mark.slow
@pytest.mark.parametrize("failure, sentence", [
    ("export", "There is no web-site download: the exported model.onnx differs from the model."),
    ("no npm ci", "There is no web-site download: this server lacks the page's runtime files (npm ci --prefix web installs them)."),
])
def test_a_failed_site_export_keeps_the_model_and_says_why(tmp_path, jobs, monkeypatch, failure, sentence):
    """export_web.py fails, or cannot run (the page's runtime files are not installed): the job is still done, its model
    zip downloads, and the site's absence is one sentence (the export's own error line, or what the server lacks); the
    site's zip is refused with that sentence, through the store as on the page."""
    if failure == "export":
        failing = tmp_path / "export_web.py"
        failing.write_text("import sys\nprint('error: The exported model.onnx differs from the model.', file=sys.stderr)\n"
                           "sys.exit(2)\n", encoding="utf-8")
        monkeypatch.setattr(tj, "EXPORT_WEB_PY", failing)
    else:
        monkeypatch.setattr(site, "WEB", tmp_path / "web")  # no web/node_modules
    store = Visitors(TrainingSlot(tmp_path / "runs", train_args=(*TINY, "--max-iters", "10")))
    jobs.append(job := store.start("owner", LONG.encode(), 1))
    st = wait_until_over(job)
    assert st.state == "done" and st.report is not None and st.site_folder is None, st
    assert st.site_error == sentence
    assert zipfile.ZipFile(make_zip(job.run_dir)).testzip() is None
    with pytest.raises(JobError) as refused:
        store.served_zip("owner", "site")
    assert str(refused.value) == sentence
    assert not (job.run_dir / tj.SITE_DIR).exists()
    store.close()


@pytest.mark.slow
def test_a_model_deleted_while_its_site_is_written_goes_with_its_export(tmp_path, jobs, monkeypatch):
    """The site is written while the state is still "quantizing" (writing_site); deleting the model then kills the
    export and removes the folder, as for the int8 step."""
    slow = tmp_path / "export_web.py"
    slow.write_text("import time\ntime.sleep(600)\n", encoding="utf-8")
    monkeypatch.setattr(tj, "EXPORT_WEB_PY", slow)
    jobs.append(job := TrainingJob(tmp_path / "runs", LONG, 1, train_args=(*TINY, "--max-iters", "10")))
    deadline = time.monotonic() + 120
    while not (st := job.status()).writing_site:
        assert job.active and time.monotonic() < deadline, st
        time.sleep(0.1)
    assert st.state == "quantizing" and st.report is None and st.model_dir is None
    from model.webapp.train_tab import status_text
    assert "now writing its web site" in status_text(st)
    export = job._proc
    job.discard()
    st = wait_until_over(job, timeout=30)
    assert st.state == "failed" and st.error == "This model was deleted." and export.poll() is not None
    assert wait_gone(job.run_dir)


def test_site_unavailable_says_what_the_server_lacks(tmp_path, monkeypatch):
    assert tj.site_unavailable() is None  # this checkout: export_web.py, onnx packages, npm ci --prefix web
    def no_runtime_files():
        raise tj.CheckpointError("The page's runtime files are missing")

    monkeypatch.setattr(tj, "vendor_sources", no_runtime_files)
    assert tj.site_unavailable() == "this server lacks the page's runtime files (npm ci --prefix web installs them)."
    real_find_spec = tj.importlib.util.find_spec
    monkeypatch.setattr(tj.importlib.util, "find_spec", lambda name: None if name == "onnxscript" else real_find_spec(name))
    assert tj.site_unavailable().startswith("this server lacks the Python package onnxscript")
    monkeypatch.setattr(tj, "EXPORT_WEB_PY", tmp_path / "export_web.py")
    assert tj.site_unavailable() == "this server has no export_web.py."
    assert tj.no_site(tj.site_unavailable()) == "There is no web-site download: this server has no export_web.py."


@pytest.mark.slow
def test_stop_keeps_the_best_weights_and_still_quantizes(tmp_path, jobs):
    jobs.append(job := TrainingJob(tmp_path / "runs", LONG, 1, train_args=(*TINY, "--max-iters", "1000000"), site=False))
    wait_for_eval(job, 10)
    job.stop()
    st = wait_until_over(job)
    assert st.state == "stopped" and st.error is None and st.report is not None, st
    assert (job.fp32_dir / "train_state.pt").is_file()  # the trainer caught the SIGINT and saved its state: not killed
    assert "stopped at step" in (job.run_dir / tj.TRAIN_LOG).read_text()
    assert st.elapsed_s < 50 and load(st.model_dir).kind == "int8"
    job.discard()  # a finished job's folder goes at once
    assert not job.run_dir.exists() and not any((tmp_path / "runs").iterdir())


@pytest.mark.slow
def test_a_trainer_started_with_sigint_ignored_still_stops_cleanly(tmp_path, jobs):
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the child, as under `python app.py &` in a script
    try:
        jobs.append(job := TrainingJob(tmp_path / "runs", LONG, 1, train_args=(*TINY, "--max-iters", "1000000"), site=False))
    finally:
        signal.signal(signal.SIGINT, before)
    wait_for_eval(job, 10)
    job.stop()
    st = wait_until_over(job)
    assert st.state == "stopped" and st.report is not None, st
    assert "stopped at step" in (job.run_dir / tj.TRAIN_LOG).read_text()  # train.py restored Ctrl-C: a clean stop


@pytest.mark.slow
def test_a_trainer_deaf_to_the_stop_is_killed_and_its_weights_kept(tmp_path, jobs, monkeypatch):
    monkeypatch.setattr(tj, "STOP_GRACE_S", 2.0)
    jobs.append(job := TrainingJob(tmp_path / "runs", LONG, 1, train_args=(*TINY, "--max-iters", "1000000"), site=False))
    wait_for_eval(job, 10)
    os.kill(job._proc.pid, signal.SIGSTOP)  # a hung trainer: the SIGINT stays pending
    job.stop()
    st = wait_until_over(job)
    assert st.state == "stopped" and st.report is not None, st
    assert "stopped at step" not in (job.run_dir / tj.TRAIN_LOG).read_text()  # killed after the grace period, not stopped


def test_second_start_is_refused_with_the_time_left(tmp_path, jobs):
    slot = TrainingSlot(tmp_path / "runs", train_args=TINY)
    jobs.append(first := slot.start(LONG.encode(), 3))
    with pytest.raises(JobError, match=r"Another model is training on this server; try again in about [34] minutes\."):
        slot.start(LONG.encode(), 1)
    assert slot.current() is first
    first.discard()
    assert slot.current() is None  # at once: the slot is free while the discarded job's trainer is being killed
    assert wait_gone(first.run_dir) and not any((tmp_path / "runs").iterdir())  # and it leaves no folder
    jobs.append(slot.start(LONG.encode(), 1))  # the slot is free again


def test_a_killed_trainer_fails_with_a_sentence(tmp_path, jobs):
    jobs.append(job := TrainingJob(tmp_path / "runs", LONG, 1, train_args=TINY))
    os.kill(job._proc.pid, signal.SIGKILL)  # as the OOM killer would
    st = wait_until_over(job, timeout=30)
    assert st.state == "failed" and st.report is None and st.model_dir is None
    assert st.error == "Training was killed by the server, most likely for running out of memory: try a shorter text."
    assert wait_gone(job.run_dir)


@pytest.mark.slow
def test_a_trainer_error_becomes_its_sentence(tmp_path, jobs):
    jobs.append(job := TrainingJob(tmp_path / "runs", LONG, 1, train_args=(*TINY, "--n-embd", "33")))
    st = wait_until_over(job, timeout=60)
    assert st.state == "failed"
    assert st.error == ("Inconsistent model shape: n_embd (33) must be divisible by n_head (2); "
                        "pick a width that is a multiple of the number of heads.")
    assert wait_gone(job.run_dir)


def test_the_time_left_counts_down_while_the_int8_copy_is_made():
    """Once the trainer has exited, "ready in about N s" counts down from the int8 step's estimate, never frozen."""
    job = object.__new__(TrainingJob)  # the clock alone, no child process
    job._lock, job.budget_s, job._state, job.site, job._site_why = threading.Lock(), 60.0, "quantizing", False, None
    now = time.monotonic()
    job._t0, job._t_end = now - 70, now - 10
    assert tj.QUANTIZE_ESTIMATE_S - 11 <= job.seconds_left() <= tj.QUANTIZE_ESTIMATE_S - 10
    job.site, job._site_why = True, "this server has no export_web.py."  # a site it cannot write counts no time
    assert tj.QUANTIZE_ESTIMATE_S - 11 <= job.seconds_left() <= tj.QUANTIZE_ESTIMATE_S - 10
    job._site_why = None  # the static site's export follows the int8 step
    after = tj.QUANTIZE_ESTIMATE_S + tj.SITE_ESTIMATE_S
    assert after - 11 <= job.seconds_left() <= after - 10
    job._t_end = now - after - 5  # slower than the estimate: 0, not below
    assert job.seconds_left() == 0.0
    job._state = "done"
    assert job.seconds_left() == 0.0


def test_failure_sentences_never_show_a_traceback():
    bar = "  6%|▌         | 4/60 s of the budget\r 12%|█▏        | 7/60 s of the budget\r"
    tail = f"model: 0.02M parameters\n{bar}\nerror: The training split has 3 tokens, too few: use a longer text.\n"
    assert tj._failure(tail, 2, "Training") == "The training split has 3 tokens, too few: use a longer text."
    crash = "Traceback (most recent call last):\n  File \"train.py\", line 98, in <module>\nAttributeError: 'Trainer' object\n"
    assert tj._failure(crash, 1, "Training") == "Training stopped unexpectedly (exit status 1): please try again."
    assert "out of memory" in tj._failure(crash.replace("AttributeError", "MemoryError"), 1, "Training")
    assert "out of memory" in tj._failure(bar, -signal.SIGKILL, "Quantizing the model")


@pytest.mark.slow
def test_the_default_settings_on_tiny_shakespeare(tmp_path, jobs, shakespeare_path, gpt2_tokenizer):
    """The real default preset and tokenizer (as the app runs them), on 100 kB for a 20 s budget."""
    text = shakespeare_path.read_text(encoding="utf-8")[:100_000]
    jobs.append(job := TrainingJob(tmp_path / "runs", text, 1 / 3, site=False))
    st = wait_until_over(job, timeout=180)
    assert st.state == "done", st
    assert st.elapsed_s < 20 + 15  # the trainer keeps to its budget (slack for a busy machine)
    assert st.val_curve[-1][1] < st.val_curve[0][1]  # it learned something
    assert abs(st.report["val_nats_per_char_int8"] - st.report["val_nats_per_char_fp32"]) < 0.1


class FakeJob:
    def __init__(self):
        self.discarded = False

    def discard(self):
        self.discarded = True


def test_store_keeps_one_model_per_owner_and_at_most_four(tmp_path):
    store = Visitors(TrainingSlot(tmp_path), clock=lambda: 0.0)
    fakes = {name: FakeJob() for name in "abcde"}
    for name in "abcd":
        store.add(name, fakes[name])
    replacement = FakeJob()
    store.add("a", replacement)  # a trains again: its first model goes
    assert fakes["a"].discarded and store.get("a") is replacement
    store.add("e", fakes["e"])  # a fifth owner: the oldest (b) goes
    assert fakes["b"].discarded and store.get("b") is None
    assert [store.get(n) for n in "cde"] == [fakes[n] for n in "cde"] and not any(fakes[n].discarded for n in "cde")
    store.drop("c")  # c's session ended
    assert fakes["c"].discarded and store.get("c") is None
    store.drop("nobody")
    store.clear()
    assert all(fakes[n].discarded for n in "de") and replacement.discarded and store.get("d") is None


def test_store_sweeps_models_older_than_an_hour(tmp_path):
    now = [1000.0]
    store = Visitors(TrainingSlot(tmp_path), clock=lambda: now[0])
    old, new = FakeJob(), FakeJob()
    store.add("old", old)
    now[0] += 1800
    store.add("new", new)
    now[0] += 1801
    assert store.sweep() == 1 and old.discarded and not new.discarded
    assert store.get("old") is None and store.get("new") is new
    now[0] += 1800
    assert store.sweep() == 1 and new.discarded


def test_zip_of_an_unfinished_run_is_refused(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(JobError, match="not ready to download"):
        make_zip(tmp_path)
    with pytest.raises(JobError, match="web site is not ready to download"):
        make_zip(tmp_path, "site")
    assert list(tmp_path.iterdir()) == [tmp_path / "model"]


def test_a_site_zip_of_a_model_deleted_meanwhile_leaves_nothing(tmp_path, monkeypatch):
    """The model's folder goes (its hour is up) while its site's zip is being written: a JobError, and no zip left in
    a folder made again."""
    run = tmp_path / "model-abc"
    (run / tj.SITE_DIR).mkdir(parents=True)
    (run / tj.SITE_DIR / "index.html").write_text("<html></html>", encoding="utf-8")
    real_rglob = Path.rglob

    def deleted_meanwhile(self, pattern):
        tj.remove_tree(run)
        return real_rglob(self, pattern)

    monkeypatch.setattr(Path, "rglob", deleted_meanwhile)
    with pytest.raises(JobError, match="This model has been deleted"):
        make_zip(run, "site")
    assert list(tmp_path.iterdir()) == []


def test_remove_tree_is_one_rename_then_gone(tmp_path):
    (tmp_path / "run" / "int8").mkdir(parents=True)
    (tmp_path / "run" / "int8" / "model.safetensors").write_bytes(b"x")
    tj.remove_tree(tmp_path / "run")
    tj.remove_tree(tmp_path / "run")  # twice is fine
    assert list(tmp_path.iterdir()) == []


# ---- on ZeroGPU: the job around a @spaces.GPU call (train_on_gpu replaced; the real call is tests/test_space.py's) ----

@pytest.fixture
def on_zerogpu(monkeypatch):
    """The job as on a ZeroGPU Space, train_on_gpu a stand-in set per test through the returned dict's "call"."""
    calls = {}
    monkeypatch.setattr(tj.zerogpu, "ACTIVE", True)
    monkeypatch.setattr(tj.zerogpu, "train_on_gpu", lambda *args: calls["call"](*args))
    return calls


def test_a_zerogpu_refusal_fails_the_job_with_what_to_do(tmp_path, jobs, on_zerogpu):
    import gradio as gr

    def refuse(script, argv, log_path, request_s):  # what spaces' schedule() raises, before any worker starts
        raise gr.Error(f"You have exceeded your free ZeroGPU quota ({request_s}s requested vs. 30s left). Try again in 1:12:00. ")

    on_zerogpu["call"] = refuse
    jobs.append(job := TrainingJob(tmp_path / "runs", LONG, 0.75, train_args=TINY))
    st = wait_until_over(job, timeout=30)
    assert st.state == "failed" and st.report is None
    assert st.error == (f"ZeroGPU refused: this run asks for {job.gpu_request_s} s of GPU time and your daily quota has 30 s "
                        "left; choose fewer minutes, log in to Hugging Face for a larger quota, or try again in 1:12:00.")
    from model.webapp.train_tab import status_text
    assert status_text(st) == st.error  # the sentence alone, not "Failed: ZeroGPU ..."


@pytest.mark.slow
def test_on_zerogpu_the_clock_waits_for_the_gpu_and_a_run_killed_at_its_limit_is_kept(tmp_path, jobs, on_zerogpu):
    """While the call waits in ZeroGPU's queue the job is "waiting" and its clock stands at 0; the worker then trains
    (train.py in this process, as in ZeroGPU's worker) and is killed at its duration after saving weights: spaces raises
    "GPU task aborted", and the weights saved are quantized and served, "stopped at the GPU time limit"."""
    import gradio as gr

    gpu_free = threading.Event()

    def queued_then_killed(script, argv, log_path, request_s):
        assert gpu_free.wait(30)
        tj.zerogpu._train_in_worker(script, argv, log_path, request_s)
        raise gr.Error("GPU task aborted")

    on_zerogpu["call"] = queued_then_killed
    jobs.append(job := TrainingJob(tmp_path / "runs", LONG, 0.75, train_args=(*TINY, "--max-iters", "20"), site=False))
    assert job.gpu_request_s == tj.zerogpu.request_seconds(tj.zerogpu.train_tokens(LONG), 0.75)
    assert job.budget_s == tj.zerogpu.train_budget_s(job.gpu_request_s)
    time.sleep(1.5)
    st = job.status()
    assert st.state == "waiting" and st.elapsed_s == 0 and st.gpu_request_s == job.gpu_request_s, st
    from model.webapp.train_tab import status_text
    assert status_text(st).startswith(f"Waiting for a ZeroGPU GPU: this run asks for {job.gpu_request_s} s of GPU time")
    gpu_free.set()
    st = wait_until_over(job, timeout=120)
    assert st.state == "stopped" and st.at_limit and st.report is not None, st
    assert load(st.model_dir).kind == "int8"
    assert 0 < st.elapsed_s < 60  # from the worker's start, not the call's
    assert status_text(st).startswith("Stopped at the GPU time limit after ")
    assert "GPU task aborted" in (job.run_dir / tj.TRAIN_LOG).read_text(encoding="utf-8")


def test_samples_lose_their_control_characters():
    assert tj.printable("ROMEO:\x1c\tO\x00 Juliet\r\n\x7f") == "ROMEO:\tO Juliet\r\n"

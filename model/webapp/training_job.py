"""One training job of the app's Train tab, without any UI: check a visitor's text, train on it with train.py in a child
process, quantize the result with quantize.py, write its static web site with export_web.py, and zip each for download.
Whose job it is, and how long it is kept, is model/webapp/visitors.py's.

    slot = TrainingSlot()
    job = slot.start(data, minutes=3)   # JobError: bad text, bad minutes, or another training is running
    job.status()                        # poll every few seconds: state, progress, loss curves, sample, error, report
    job.stop()                          # keeps the best weights so far; they are quantized too
    make_zip(job.run_dir)               # once the status has a model_dir
    make_zip(job.run_dir, "site")       # once the status has a site_folder (else its site_error says why not)
    job.discard()                       # kill what still runs and delete the folder
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from model import atomic
from model.formats.checkpoint import CONFIG, LOG, METRICS, PLOT, WEIGHTS, CheckpointError, read_json, read_log
from model.formats.site import vendor_sources
from model.training.data import CONTROL, DataError, check_length, decode_text, sure_length
from model.training.settings import PRESETS, TrainSettings
from model.webapp import zerogpu

PROJECT = Path(__file__).resolve().parents[2]  # a Space bundle carries train.py and quantize.py beside app.py too
TRAIN_PY = PROJECT / "train.py"
QUANTIZE_PY = PROJECT / "quantize.py"
EXPORT_WEB_PY = PROJECT / "export_web.py"  # the static site: the one export path, as a user runs it
SITE_PACKAGES = ("onnx", "onnxruntime", "onnxscript")  # what export_web.py imports beyond the app's own packages

MAX_BYTES = 10 * 2**20  # uploads and pastes above 10 MB are refused
# What text is trainable is model/training/data.py's rule, the CLI's too. From this length on a text surely passes it;
# a shorter one is tokenised here, as train.py's default run will.
MIN_CHARS = sure_length(PRESETS["cpu"]["block_size"])
# The training a visitor may choose; on ZeroGPU much shorter (model/webapp/zerogpu.py: a GPU, and a quota of minutes a day).
MIN_MINUTES, MAX_MINUTES, DEFAULT_MINUTES, MINUTES_STEP = ((zerogpu.MIN_MINUTES, zerogpu.MAX_MINUTES, zerogpu.DEFAULT_MINUTES,
                                                            zerogpu.MINUTES_STEP) if zerogpu.ACTIVE else (1, 10, 3, 1))
DEFAULT_THREADS = 1  # trainer threads: on a 2-vCPU Space the other CPU keeps serving generation requests
STOP_GRACE_S = 30.0  # after a stop, the trainer gets this long to save and exit before it is killed
OVERTIME_S = 120.0  # a trainer still running this long past its budget is stopped as if the visitor had pressed Stop
QUANTIZE_TIMEOUT_S = 600.0
QUANTIZE_EVAL_WINDOWS = 200  # the int8 report scores this many evenly spaced validation windows, so it takes seconds
QUANTIZE_ESTIMATE_S = 30.0  # for "about N minutes left"
SITE_TIMEOUT_S = 600.0
SITE_ESTIMATE_S = 15.0  # the static site's export, for "about N minutes left": the default model's took 9.3 to 10.8 s (docs/app.md)

FP32_DIR = "model"  # the trainer's --out-dir inside a job folder; quantize.py writes FP32_DIR/int8
INT8_DIR = "int8"
REPORT = "report.json"
TEXT_FILE = "input.txt"
TRAIN_LOG = "train.log"
QUANTIZE_LOG = "quantize.log"
SITE_DIR = "site"  # export_web.py's --out inside a job folder
SITE_LOG = "site.log"
ZIP_FP32_FILES = (WEIGHTS, CONFIG, METRICS, LOG, PLOT)  # train_state.pt (3x the weights) and the token cache stay out

# "quantizing" covers the int8 copy and then the static site, so that a client polling while the state is "running" or
# "quantizing" (as docs/app.md shows) waits for both.
State = Literal["waiting", "running", "quantizing", "done", "stopped", "failed"]
ACTIVE: tuple[State, ...] = ("waiting", "running", "quantizing")  # waiting: for a ZeroGPU GPU
Download = Literal["model", "site"]  # the two zips of a finished job: its checkpoints, its static web site

log = logging.getLogger(__name__)


class JobError(ValueError):
    """A training request that cannot be served; the message says, in one sentence, what to do."""


def check_text(data: bytes) -> str:
    """The visitor's text (an upload or a paste, as bytes) decoded, or a JobError saying what is wrong with it."""
    if len(data) > MAX_BYTES:
        raise JobError(f"The text is {len(data) / 2**20:.1f} MB, over the limit of {MAX_BYTES // 2**20} MB: use a shorter one.")
    try:
        text = decode_text(data, "The text")
        check_length(text, PRESETS["cpu"]["block_size"], TrainSettings.tokenizer, TrainSettings.vocab_min_count)
    except DataError as e:
        raise JobError(str(e)) from None
    return text


def site_unavailable() -> str | None:
    """Why this server cannot write a model's static site, as the end of a sentence; None when it can."""
    if not EXPORT_WEB_PY.is_file():
        return "this server has no export_web.py."
    missing = [name for name in SITE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        return f"this server lacks the Python package {missing[0]} (pip install -r requirements.txt installs it)."
    try:
        vendor_sources()
    except CheckpointError:
        return "this server lacks the page's runtime files (npm ci --prefix web installs them)."
    return None


def no_site(why: str) -> str:
    """The one sentence a finished model without a web-site download shows."""
    return f"There is no web-site download: {why[:1].lower()}{why[1:]}"


def remove_tree(path: Path) -> None:
    """Delete a folder so that it vanishes in one step: renamed to a hidden name first, then deleted."""
    trash = path.with_name(f".deleting-{path.name}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _signal(proc: subprocess.Popen | zerogpu.GpuTrainer, sig: int) -> None:
    """Send sig to a child's process group (or to a training on ZeroGPU), unless the child has already exited."""
    if proc.poll() is None:
        if isinstance(proc, zerogpu.GpuTrainer):
            proc.send_signal(sig)
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)


def _said_steps(log_path: Path) -> int | None:
    """The steps train.py said its run takes at most when the size's passes cap sets them ("steps: at most N, ..."), in the
    first lines of its log."""
    try:
        with open(log_path, "rb") as f:
            head = f.read(65536).decode("utf-8", errors="replace")
    except OSError:
        return None
    m = re.search(r"^steps: at most ([\d,]+),", head, re.MULTILINE)
    return int(m.group(1).replace(",", "")) if m else None


def printable(text: str) -> str:
    """text without control characters (tab and newlines stay): an early sample may hold some, which a page shows as boxes."""
    return CONTROL.sub("", text)


def _log_tail(path: Path, n_bytes: int = 65536) -> str:
    """The end of a child's log (empty when there is none)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - n_bytes))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _failure(tail: str, returncode: int, what: str) -> str:
    """One sentence for a failed child: its last "error: ..." line, else what most likely happened; never a traceback."""
    errors = [line.removeprefix("error: ").strip() for line in tail.splitlines() if line.startswith("error: ")]
    if errors:
        return errors[-1]
    if returncode == -signal.SIGKILL or "MemoryError" in tail or "out of memory" in tail.lower():
        return f"{what} was killed by the server, most likely for running out of memory: try a shorter text."
    return f"{what} stopped unexpectedly (exit status {returncode}): please try again."


@dataclass(frozen=True)
class Status:
    """A snapshot of one job for the UI: plain data."""

    state: State
    elapsed_s: float  # since the start; frozen when training ends
    budget_s: float  # the training time the visitor chose
    seconds_left: float  # a rough estimate until the model is ready (0 once the job is over)
    records: list[dict[str, Any]]  # log.jsonl: train records (train_loss, nats/token) and eval records (val_nats_per_*)
    train_curve: list[tuple[int, float]]  # (step, training loss in nats/char); empty until the text is tokenised
    val_curve: list[tuple[int, float]]  # (step, validation loss in nats/char) of each evaluation; the final one is in records
    sample: str | None  # the text generated at the latest evaluation, when the trainer logs one
    error: str | None  # one sentence when failed (or stopped before any weights were saved)
    report: dict[str, Any] | None  # quantize.py's report.json once the int8 model is ready
    model_dir: Path | None  # the int8 checkpoint once ready (model.load reads it), else None
    zip_folder: str | None = None  # once ready: the folder the download zip unpacks to
    gpu_request_s: int | None = None  # on ZeroGPU: the GPU seconds the run asked for
    at_limit: bool = False  # ZeroGPU ended the run at its GPU time limit; the weights saved by then were kept
    expected_steps: int | None = None  # the steps the run is expected to reach, for the curve's axis (None: not known yet)
    writing_site: bool = False  # the int8 copy is made; its static web site is being written
    site_folder: str | None = None  # once the site is written: the folder its zip unpacks to
    site_error: str | None = None  # once the model is ready without a site: one sentence saying why

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def progress(self) -> float:
        """Share of the time budget used, 0 to 1."""
        return min(1.0, self.elapsed_s / self.budget_s) if self.budget_s > 0 else 1.0


class TrainingJob:
    """One training run in its own folder: train.py in a child process, then quantize.py, led by a background thread.

    Thread-safe: status(), stop() and discard() may be called from any thread at any time.
    """

    def __init__(self, root: str | Path, text: str, minutes: float, threads: int = DEFAULT_THREADS, train_args: Sequence[str] = (),
                 site: bool = True):
        """Write text into a new folder under root and start training on it for `minutes` (train_args: extra train.py flags).
        On ZeroGPU the run asks for the GPU time its text needs, at most those minutes (zerogpu.request_seconds), and
        trains for what that leaves (zerogpu.train_budget_s). site: after the int8 copy, write the static web site too."""
        self.site = site
        self._site_why = site_unavailable() if site else None  # why this server cannot write it, known before training
        self.gpu_request_s = zerogpu.request_seconds(zerogpu.train_tokens(text), minutes) if zerogpu.ACTIVE else None
        self.budget_s = zerogpu.train_budget_s(self.gpu_request_s) if self.gpu_request_s else minutes * 60.0
        self.threads = threads
        self._lock = threading.Lock()
        self._state: State = "running"
        self._error: str | None = None
        self._report: dict[str, Any] | None = None
        self._final_records: list[dict[str, Any]] = []
        self._stop_at: float | None = None  # when stop() was called
        self._at_limit = False  # ZeroGPU killed the trainer at its GPU time limit
        self._writing_site = False
        self._site_ready = False
        self._site_error: str | None = None
        self._discarded = False
        self._t0 = time.monotonic()
        self._t_end: float | None = None  # when the trainer exited
        run_dir = None
        try:
            Path(root).mkdir(parents=True, exist_ok=True)
            self.run_dir = run_dir = Path(tempfile.mkdtemp(prefix="model-", dir=root))
            self.fp32_dir = self.run_dir / FP32_DIR
            self.int8_dir = self.fp32_dir / INT8_DIR
            atomic.write_text(self.run_dir / TEXT_FILE, text)
            # Paths relative to the job folder (the children's working directory): what they record (config.json's
            # training data, report.json's checkpoints) names the model's files, never the server's folders.
            self._proc = self._launch(TRAIN_PY, ["--data", TEXT_FILE, "--out-dir", FP32_DIR,
                                                 "--max-minutes", f"{self.budget_s / 60:.6g}", "--threads", str(threads),
                                                 *train_args], TRAIN_LOG)
        except OSError as e:  # disk full, no permission: nothing a visitor did, and nothing left behind
            if run_dir is not None:
                remove_tree(run_dir)
            raise JobError(f"The server could not start the training ({e.strerror or e}); please try again later.") from None
        threading.Thread(target=self._run, name=f"training-{self.run_dir.name}", daemon=True).start()

    # ---- for the UI -----------------------------------------------------------------------------------------------

    @property
    def state(self) -> State:
        with self._lock:
            return "waiting" if self._state == "running" and self._t_train() is None else self._state

    def _t_train(self) -> float | None:
        """When training began (time.monotonic()): at the launch for a child process; on ZeroGPU once the GPU call's worker
        started (None while it waits for a GPU)."""
        if isinstance(self._proc, zerogpu.GpuTrainer):
            return self._proc.started()
        return self._t0

    @property
    def active(self) -> bool:
        """Whether it still trains or quantizes (a discarded job is not: it is being killed)."""
        with self._lock:
            return self._state in ACTIVE and not self._discarded

    def seconds_left(self) -> float:
        """Roughly how long until the model is ready: the rest of the training budget plus the int8 step (and the static
        site's), counting down to 0 (never below) while they run."""
        after = QUANTIZE_ESTIMATE_S + (SITE_ESTIMATE_S if self.site and self._site_why is None else 0.0)
        with self._lock:
            if self._state not in ACTIVE:
                return 0.0
            now = time.monotonic()
            if self._t_end is None:
                t_train = self._t_train()
                return max(0.0, (now if t_train is None else t_train) + self.budget_s - now) + after
            return max(0.0, self._t_end + after - now)

    @property
    def site_error(self) -> str | None:
        """Once the model is ready without a static site: one sentence saying why (None otherwise)."""
        with self._lock:
            return self._site_error

    def status(self) -> Status:
        """Where the job stands, read from its files: cheap enough to call every few seconds."""
        state = self.state
        with self._lock:
            error, report, t_end, at_limit = self._error, self._report, self._t_end, self._at_limit
            writing_site, site_ready, site_error = self._writing_site, self._site_ready, self._site_error
        records = self._final_records if state not in ACTIVE else self._read_records()
        train = [(r["step"], r["train_nats_per_char"]) for r in records if "train_nats_per_char" in r]
        val = [(r["step"], r["val_nats_per_char"]) for r in records if "val_nats_per_char" in r and not r.get("final")]
        sample = next((printable(r["sample"]) for r in reversed(records) if isinstance(r.get("sample"), str)), None)
        t_train = self._t_train()
        elapsed = 0.0 if t_train is None else max(0.0, (t_end if t_end is not None else time.monotonic()) - t_train)
        return Status(state=state, elapsed_s=elapsed, budget_s=self.budget_s,
                      seconds_left=self.seconds_left(), records=records, train_curve=train, val_curve=val, sample=sample,
                      error=error, report=report, model_dir=self.int8_dir if report is not None else None,
                      zip_folder=zip_folder(self.run_dir) if report is not None else None, gpu_request_s=self.gpu_request_s,
                      at_limit=at_limit, expected_steps=self._expected_steps(records, elapsed) if state in ACTIVE else None,
                      writing_site=writing_site and state in ACTIVE,
                      site_folder=site_folder(self.run_dir) if report is not None and site_ready else None,
                      site_error=site_error if report is not None else None)

    def _expected_steps(self, records: list[dict[str, Any]], elapsed: float) -> int | None:
        """The steps the run will reach, for the curve's axis from its first frame: the size's cap when the trainer said
        it, else the steps so far at their pace over the whole budget (once over, the curve spans what was reached)."""
        if (capped := _said_steps(self.run_dir / TRAIN_LOG)) is not None:
            return capped
        last = next((r for r in reversed(records) if "train_loss" in r and r.get("step", 0) > 0 and r.get("elapsed")), None)
        if last is not None:
            return max(last["step"], round(last["step"] / last["elapsed"] * self.budget_s))
        return None

    def stop(self) -> None:
        """Ask the trainer to stop (SIGINT): it keeps the best weights so far, which are then quantized. A no-op once training is over."""
        with self._lock:
            if self._t_end is None and self._stop_at is None:
                self._stop_at = time.monotonic()
                _signal(self._proc, signal.SIGINT)

    def discard(self) -> None:
        """Kill whatever still runs and delete the folder: now, or as soon as the background thread has let go of it."""
        with self._lock:
            self._discarded = True
            over = self._state not in ACTIVE
            if not over:
                _signal(self._proc, signal.SIGKILL)
        if over:
            remove_tree(self.run_dir)

    # ---- the background thread ------------------------------------------------------------------------------------

    def _launch(self, script: Path, args: list[str], log_name: str) -> subprocess.Popen | zerogpu.GpuTrainer:
        """Start a project script in its own process group, stdout and stderr to a log file in the job folder. On a ZeroGPU
        Space, train.py runs inside a @spaces.GPU call instead (model/webapp/zerogpu.py says why), its output to the same log."""
        if zerogpu.ACTIVE and script == TRAIN_PY:
            return zerogpu.GpuTrainer(script, args, self.run_dir / log_name, self.gpu_request_s)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(self.threads)}
        with open(self.run_dir / log_name, "wb") as out:
            return subprocess.Popen([sys.executable, str(script), *args], cwd=self.run_dir, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def _run(self) -> None:
        try:
            state, error, report = self._train_then_quantize()
        except Exception:  # a bug here must not leave the job running forever, nor take the app down
            log.exception("training job %s failed", self.run_dir.name)
            state, error, report = "failed", "The training job failed on the server: please try again.", None
        records = self._read_records()
        with self._lock:
            self._state, self._error, self._report, self._final_records = state, error, report, records
            remove = self._discarded or report is None
        if remove:  # a job without a model keeps nothing on disk
            remove_tree(self.run_dir)

    def _train_then_quantize(self) -> tuple[State, str | None, dict[str, Any] | None]:
        rc = self._wait_for_trainer()
        with self._lock:
            self._t_end = time.monotonic()
            stopped = self._stop_at is not None
        if self._discarded:
            return "failed", "This model was deleted.", None
        saved = (self.fp32_dir / WEIGHTS).is_file() and (self.fp32_dir / CONFIG).is_file()
        if rc != 0 and not stopped and saved and getattr(self._proc, "aborted", False):
            with self._lock:  # ZeroGPU's time ran out: the best weights saved by then are the model
                self._at_limit = stopped = True
        if rc != 0 and not stopped:
            return "failed", self._failed(TRAIN_LOG, rc, "Training"), None
        if not ((self.fp32_dir / WEIGHTS).is_file() and (self.fp32_dir / CONFIG).is_file()):
            if stopped:
                return "stopped", "Training was stopped before its first weights were saved: there is no model to keep.", None
            return "failed", self._failed(TRAIN_LOG, rc, "Training"), None
        with self._lock:
            if self._discarded:
                return "failed", "This model was deleted.", None
            self._state = "quantizing"
            self._proc = self._launch(QUANTIZE_PY, ["--ckpt", FP32_DIR, "--out", f"{FP32_DIR}/{INT8_DIR}", "--data",
                                                    TEXT_FILE, "--eval-windows", str(QUANTIZE_EVAL_WINDOWS),
                                                    "--threads", str(self.threads)], QUANTIZE_LOG)
        try:
            rc = self._proc.wait(timeout=QUANTIZE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _signal(self._proc, signal.SIGKILL)
            self._proc.wait()
            return "failed", "Quantizing the model took too long: try a shorter text.", None
        if self._discarded:
            return "failed", "This model was deleted.", None
        if rc != 0:
            return "failed", self._failed(QUANTIZE_LOG, rc, "Quantizing the model"), None
        report = read_json(self.int8_dir / REPORT)
        if self.site:
            why = self._write_site()
            if self._discarded:
                return "failed", "This model was deleted.", None
            with self._lock:
                self._writing_site, self._site_ready = False, why is None
                self._site_error = None if why is None else no_site(why)
        return ("stopped" if stopped else "done"), None, report

    def _write_site(self) -> str | None:
        """export_web.py on the visitor's fp32 weights into the job's folder (atomically: export_site builds it beside
        and renames it in). None once the site is written, else why not, as the end of a sentence; the model stays
        ready either way."""
        if self._site_why is not None:
            return self._site_why
        with self._lock:
            if self._discarded:
                return "this model was deleted."
            self._writing_site = True
            self._proc = self._launch(EXPORT_WEB_PY, ["--ckpt", FP32_DIR, "--out", SITE_DIR], SITE_LOG)
        try:
            rc = self._proc.wait(timeout=SITE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _signal(self._proc, signal.SIGKILL)
            self._proc.wait()
            return "writing it took too long."
        if rc != 0:
            return "this model was deleted." if self._discarded else self._failed(SITE_LOG, rc, "Writing the web site")
        return None

    def _wait_for_trainer(self) -> int:
        """Wait for train.py to exit; kill it when it outlives a stop by STOP_GRACE_S, stop it when it overruns its budget."""
        while True:
            try:
                return self._proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
            now, t_train = time.monotonic(), self._t_train()
            if self._stop_at is None and t_train is not None and now - t_train > self.budget_s + OVERTIME_S:
                log.warning("training job %s overran its budget; stopping it", self.run_dir.name)
                self.stop()
            with self._lock:
                if self._stop_at is not None and now - self._stop_at > STOP_GRACE_S:
                    _signal(self._proc, signal.SIGKILL)

    def _failed(self, log_name: str, returncode: int, what: str) -> str:
        tail = _log_tail(self.run_dir / log_name)
        log.warning("training job %s: %s failed (exit status %s); end of %s:\n%s", self.run_dir.name, what, returncode,
                    log_name, tail[-4000:])
        return _failure(tail, returncode, what)

    def _read_records(self) -> list[dict[str, Any]]:
        try:
            return read_log(self.fp32_dir / LOG)
        except OSError:  # deleted meanwhile
            return []


class TrainingSlot:
    """One training at a time per server: start() refuses while another job trains or quantizes."""

    def __init__(self, root: str | Path | None = None, threads: int = DEFAULT_THREADS, train_args: Sequence[str] = (),
                 site: bool = True):
        """Jobs get folders under root (default: a new temporary folder); threads and train_args go to every train.py;
        site: every job writes its static web site too."""
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="smallgpt-train-"))
        self.threads = threads
        self.train_args = tuple(train_args)
        self.site = site
        self._lock = threading.Lock()
        self._job: TrainingJob | None = None

    def start(self, data: bytes, minutes: float) -> TrainingJob:
        """Check the text and the minutes and start a job, or raise a JobError saying why not (e.g. one is running)."""
        if not MIN_MINUTES <= minutes <= MAX_MINUTES:
            raise JobError(f"Choose between {MIN_MINUTES} and {MAX_MINUTES} minutes of training, not {minutes}.")
        text = check_text(data)
        with self._lock:
            if self._job is not None and self._job.active:
                left = max(1, math.ceil(self._job.seconds_left() / 60))
                raise JobError(f"Another model is training on this server; try again in about {left} minute{'s' * (left != 1)}.")
            self._job = TrainingJob(self.root, text, minutes, self.threads, self.train_args, self.site)
            return self._job

    def current(self) -> TrainingJob | None:
        """The job training or quantizing now, if any."""
        with self._lock:
            return self._job if self._job is not None and self._job.active else None


def zip_folder(run_dir: Path) -> str:
    """The one folder a job's download zip unpacks to (the DIR of the Train tab's instructions)."""
    return f"smallgpt-{run_dir.name}"


def site_folder(run_dir: Path) -> str:
    """The one folder a job's static-site zip unpacks to."""
    return f"{zip_folder(run_dir)}-site"


def make_zip(run_dir: str | Path, what: Download = "model") -> Path:
    """A download of a finished job. "model": the fp32 checkpoint in the zip's top folder, the int8 one in its int8/
    folder. "site": the static web site export_web.py wrote, as it wrote it, in the zip's top folder.

    Written once, atomically, into run_dir (so it is deleted with the model); later calls return the same file.
    """
    run_dir = Path(run_dir)
    fp32, int8, site = run_dir / FP32_DIR, run_dir / FP32_DIR / INT8_DIR, run_dir / SITE_DIR
    top = zip_folder(run_dir) if what == "model" else site_folder(run_dir)
    path = run_dir / f"{top}.zip"
    if path.is_file():
        return path
    if what == "model" and not (int8 / REPORT).is_file():
        raise JobError("This model is not ready to download: wait until it has been trained and quantized.")
    if what == "site" and not (site / "index.html").is_file():
        raise JobError("This model's web site is not ready to download: wait until the Train tab offers it.")

    def files() -> Iterator[tuple[Path, str]]:
        """(file, name in the zip), listed as the zip is written into run_dir: if run_dir is deleted meanwhile, the
        zip's temporary file goes with it, and renaming it into place raises FileNotFoundError."""
        if what == "site":
            yield from ((f, f"{top}/{f.relative_to(site).as_posix()}") for f in sorted(site.rglob("*")) if f.is_file())
            return
        yield from ((fp32 / name, f"{top}/{name}") for name in ZIP_FP32_FILES if (fp32 / name).is_file())
        yield from ((f, f"{top}/{INT8_DIR}/{f.name}") for f in sorted(int8.iterdir()) if f.is_file())

    try:
        with atomic.atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for src, name in files():
                zf.write(src, name)
    except FileNotFoundError:  # deleted meanwhile; atomic_path may have made run_dir again, empty: remove that too
        with contextlib.suppress(OSError):
            run_dir.rmdir()
        raise JobError("This model has been deleted (models are kept for an hour): train it again.") from None
    return path

"""Training on a ZeroGPU Space (Hugging Face's shared GPUs): the visitor's train.py run goes into a @spaces.GPU call, so it
gets a GPU for its budget; everything else (generation with the int8 model, quantizing) stays on the CPU.

Why in-process, inside the decorated function, and not train.py as a child process (docs/app.md, "ZeroGPU"): the spaces
package forks a worker for each decorated call and asks its control endpoint to let that worker's pid use the GPU
(spaces/zero/wrappers.py, worker_init: `client.allow(allow_token)`, which posts `pid=os.getpid()` to /allow in
spaces/zero/client.py); the GPU is granted to that pid, and only that process runs `torch.unpatch()` and
`torch.init(nvidia_uuid)`. A child it spawned is another pid, never allowed.

Importing this module decorates train_on_gpu, the app's one @spaces.GPU function: ZeroGPU wants at least one at start-up
(spaces/zero/__init__.py counts decorator.decorated_cache). Off ZeroGPU (SPACES_ZERO_GPU unset) nothing here runs: the
Train tab runs train.py in a child process (model/webapp/training_job.py) and spaces is not even imported.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import importlib.util
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from model.config import cpu_row
from model.training.data import split_text, text_tokenizer
from model.training.plan import epoch_steps, settings_for
from model.training.settings import TrainSettings
from model.training.trainer import train as first_model_only

T = TypeVar("T")

ACTIVE = os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")  # read as spaces/config.py reads it

# What ZeroGPU grants (the hub's ZeroGPU page, https://huggingface.co/docs/hub/spaces-zerogpu, and spaces 0.51.3): a visitor's
# daily quota is about 2 minutes without a login and 3.5 with a free account; spaces multiplies the duration a call asks
# for by its GPU's duration_factor (spaces/zero/configs.json: 1.0 on an H200, 1.5 on an RTX PRO 6000 Blackwell) before
# the quota check. The default run must fit an anonymous visitor's quota, the longest a free account's, on either GPU.
ANONYMOUS_QUOTA_S, FREE_QUOTA_S = 120, 210
DURATION_FACTOR_MAX = 1.5
# GPU time that is not the training loop's. START_RESERVE_S: before _train_in_worker runs (the fork, /allow, CUDA's
# initialisation). RUN_OVERHEAD_S: train.py's start-up, tokenizing the text, the final evaluation and the last save, all
# inside its budget. EXIT_RESERVE_S: after its budget, the worker's return. docs/app.md ("ZeroGPU") says how they were set
# and how to measure them (the worker logs its own seconds on the GPU).
START_RESERVE_S, RUN_OVERHEAD_S, EXIT_RESERVE_S = 10, 15, 5
OVERHEAD_S = START_RESERVE_S + RUN_OVERHEAD_S + EXIT_RESERVE_S
# The seconds a training step of the cpu preset's sizes (4 layers, at most 256 wide, 16 x 128 tokens) is assumed to take on
# a ZeroGPU GPU, evaluations included. Not measured (no GPU here): correctness does not rest on it. A slower GPU ends the
# run at its budget, inside the GPU time asked for, with the best weights kept; a faster one ends it at the size's cap
# and gives the rest back (ZeroGPU charges the time used).
GPU_STEP_S = 0.02
# The training the visitor may choose on ZeroGPU, in minutes: at most that long, less when the text's cap ends it sooner.
MIN_MINUTES, DEFAULT_MINUTES, MAX_MINUTES, MINUTES_STEP = 0.25, 0.75, 1.75, 0.25
STOP_FILE = ".stop"  # written into the job folder by Stop; the worker watches for it
PID_FILE = ".gpu-worker.pid"  # the worker's pid, so a discarded job's worker can be killed
STARTED_FILE = ".gpu-started"  # the worker's time.monotonic() when it began: the end of the wait for a GPU
ABORTED = "GPU task aborted"  # what spaces raises when ZeroGPU killed the worker at the end of its duration
TAB_NOTE = ("On this Space your training runs on a ZeroGPU GPU; the GPU time it uses comes out of your daily ZeroGPU quota "
            "(about 2 minutes without a Hugging Face login, 3.5 with a free account, 25 with PRO: "
            "[today's figures](https://huggingface.co/docs/hub/spaces-zerogpu)). Generating text runs on the CPU and costs "
            "no quota.")


def cap_steps(train_tokens: int) -> int:
    """The optimizer steps train.py's default run takes on a training split of this many tokens at most: the size's
    passes cap (model/config.py), else --max-iters (model/training/plan.py decides the same way)."""
    s = settings_for({})
    row = cpu_row(train_tokens)
    if row.cap is None:
        return s.max_iters
    return min(s.max_iters, epoch_steps(s, train_tokens, s.block_size, row.cap))


def train_tokens(text: str) -> int:
    """The training split's token count of a text under train.py's default tokenizer (what cap_steps needs)."""
    tokenizer = text_tokenizer(TrainSettings.tokenizer, text, TrainSettings.vocab_min_count)
    return len(tokenizer.encode(split_text(text)[0]))


def request_seconds(tokens: int, minutes: float) -> int:
    """The GPU seconds to ask ZeroGPU for: the overhead, plus the training the text's cap needs at GPU_STEP_S a step,
    at most the visitor's minutes."""
    return math.ceil(OVERHEAD_S + min(minutes * 60, cap_steps(tokens) * GPU_STEP_S))


def train_budget_s(request_s: float) -> float:
    """train.py's --max-minutes budget, in seconds from the worker's start, for a call that asked for request_s: it ends
    before ZeroGPU's time does."""
    return request_s - START_RESERVE_S - EXIT_RESERVE_S


def charged(request_s: float, factor: float) -> int:
    """The seconds ZeroGPU checks against the quota for a request on a GPU of this duration_factor (as spaces rounds)."""
    return round(request_s * factor)


def gpu_seconds(script: str, argv: list[str], log_path: str, request_s: int) -> int:
    """The duration train_on_gpu asks for (the decorator calls it with the call's arguments)."""
    return request_s


def refusal(message: str) -> str:
    """ZeroGPU's refusal of a call (spaces/zero/client.py's texts) as one sentence saying what to do."""
    text = " ".join(message.split())
    quota = r"exceeded your (?:free |Pro )?ZeroGPU quota \((\d+)s requested vs\. (\d+)s left\)\. "
    if m := re.search(quota + r"Try again in ((?:\d+ days?, )?\d+:\d\d:\d\d)", text):
        asked, left, wait = m.groups()
        return (f"ZeroGPU refused: this run asks for {asked} s of GPU time and your daily quota has {left} s left; choose "
                f"fewer minutes, log in to Hugging Face for a larger quota, or try again in {wait}.")
    if m := re.search(r"requested GPU duration \((\d+)s\) is larger than the maximum allowed", text):
        return (f"ZeroGPU refused: {m.group(1)} s is more GPU time than it allows you in one run; choose fewer minutes, "
                "or log in to Hugging Face, which allows longer runs.")
    if "ZeroGPU runs limit" in text:
        return "ZeroGPU refused: you have started too many GPU runs for now; try again in a few minutes."
    if "reached its GPU limit" in text:
        return ("ZeroGPU refused: visitors without a Hugging Face login have used up this Space's GPU time for now; log in "
                "to Hugging Face, or try again later.")
    if "No GPU was available" in text:
        return "ZeroGPU had no GPU free (it waits up to a minute for one); try again in a few minutes."
    return f"ZeroGPU: {text}"


def _load_script(script: str):
    """train.py, loaded as a module from its path."""
    spec = importlib.util.spec_from_file_location("smallgpt_train_script", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stop_watcher(run_dir: Path, thread_id: int, done: threading.Event, lock: threading.Lock) -> None:
    """Turn the Stop file into a KeyboardInterrupt in the training thread, train.py's own way of stopping (it keeps the best
    weights): the worker runs the call in a thread of its own, where no signal handler can reach."""
    while not done.wait(0.5):
        if (run_dir / STOP_FILE).exists():
            with lock:
                if not done.is_set():
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(KeyboardInterrupt))
            return


def _train_in_worker(script: str, argv: list[str], log_path: str, request_s: int) -> int:
    """script's (train.py's) main(argv) in this process (ZeroGPU's worker, which holds the GPU), its output appended to log_path
    in the job folder, as a child's would go; returns its exit status. argv's --max-minutes counts from now (train_budget_s).
    Stop works through STOP_FILE in that folder.

    The first model only: the teachers and student that train.py trains in the time its cap leaves
    (model/training/rounds.py) would spend the rest of the GPU time asked for, out of the visitor's quota."""
    t_start = time.perf_counter()
    run = Path(log_path).parent
    with contextlib.suppress(OSError):
        (run / PID_FILE).write_text(str(os.getpid()), encoding="utf-8")
        (run / STARTED_FILE).write_text(repr(time.monotonic()), encoding="utf-8")
    if (run / STOP_FILE).exists() or not run.is_dir():  # stopped, or deleted, while it waited for a GPU
        return 130
    done, lock = threading.Event(), threading.Lock()
    watcher = threading.Thread(target=_stop_watcher, args=(run, threading.get_ident(), done, lock), daemon=True)
    saved, cwd = [os.dup(1), os.dup(2)], os.getcwd()
    os.chdir(run)  # the job's paths are relative to its folder, as for a child process started there
    try:
        with open(log_path, "ab") as log:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            watcher.start()
            try:
                module = _load_script(script)
                module.train = first_model_only
                rc = module.main(argv, t_start=t_start)
            finally:
                with lock:
                    done.set()
            print(f"ZeroGPU: this run held the GPU {time.perf_counter() - t_start:.1f} s in train.py of the {request_s} s "
                  "asked for", flush=True)
    except KeyboardInterrupt:  # a Stop that landed outside train.py's own handling
        rc = 130
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        os.chdir(cwd)
        with contextlib.suppress(OSError):
            (run / PID_FILE).unlink()
    return rc


if ACTIVE:
    import spaces  # app.py imported it first, before torch and gradio

    train_on_gpu = spaces.GPU(duration=gpu_seconds)(_train_in_worker)
else:
    train_on_gpu = _train_in_worker  # never called off ZeroGPU: the Train tab runs train.py as a child process there


def off_main_thread(fn: Callable[[], T]) -> T:
    """fn() run in a thread of its own, its result or exception passed on. Importing spaces on ZeroGPU enters its CUDA
    emulation (a TorchFunctionMode and a TorchDispatchMode: spaces/zero/torch/patching.py, patch()) in the importing thread
    only; under it, TorchScript's traced forward fails ("aten::equal() Expected a value of type 'Tensor'"). Gradio's
    request threads never have it; the app's warm-up, run by launch() in the main thread, needs this."""
    with ThreadPoolExecutor(1, thread_name_prefix="outside-zerogpu-modes") as pool:
        return pool.submit(fn).result()


class GpuTrainer:
    """A training inside a @spaces.GPU call, seen as training_job sees a train.py child process: poll(), wait(timeout),
    send_signal(SIGINT) to stop it (it keeps its best weights), send_signal(SIGKILL) to drop it.

    Create it in the Gradio request that starts the training: the call runs with that request's context, so ZeroGPU counts
    the time against that visitor's quota (spaces/zero/wrappers.py reads the request from Gradio's context variable).
    """

    def __init__(self, script: Path, argv: list[str], log_path: Path, request_s: int):
        """Start script (train.py) with argv in a ZeroGPU call that asks for request_s GPU seconds; its output goes to
        log_path, whose folder is the job's."""
        self.log_path = Path(log_path)
        self.run_dir = self.log_path.parent
        self.request_s = request_s
        self.returncode: int | None = None
        self.aborted = False  # ZeroGPU killed the worker at the end of its duration
        self._started: float | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        context = contextvars.copy_context()
        args = (str(script), list(argv), str(self.log_path), request_s)
        threading.Thread(target=context.run, args=(self._call, args), name=f"zerogpu-{self.run_dir.name}", daemon=True).start()

    def _call(self, args: tuple) -> None:
        try:
            rc = train_on_gpu(*args)
        except Exception as e:  # ZeroGPU said no (quota, no GPU free) or killed the worker: the job's error says which
            message = " ".join(str(getattr(e, "message", None) or e).split()) or type(e).__name__  # gr.Error's str is a repr
            with self._lock:
                self.aborted = ABORTED in message
            with contextlib.suppress(OSError), open(self.log_path, "a", encoding="utf-8") as log:
                log.write(f"error: {refusal(message)}\n")
            rc = 1
        with self._lock:
            if self.returncode is None:
                self.returncode = rc
        self._done.set()

    def started(self) -> float | None:
        """The time.monotonic() at which the worker began, once it has (before: the call waits for a GPU); the worker is a
        fork of this process on the same machine, so its monotonic clock is this one."""
        with self._lock:
            if self._started is None:
                with contextlib.suppress(OSError, ValueError):
                    self._started = float((self.run_dir / STARTED_FILE).read_text(encoding="utf-8"))
            return self._started

    def poll(self) -> int | None:
        with self._lock:
            return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """The exit status, once the call has returned (or the job was killed); subprocess.TimeoutExpired after timeout."""
        if not self._done.wait(timeout):
            raise subprocess.TimeoutExpired("train_on_gpu", timeout)
        with self._lock:
            return self.returncode

    def send_signal(self, sig: int) -> None:
        """SIGINT: stop (the worker turns the Stop file into train.py's KeyboardInterrupt). SIGKILL: kill the worker, and
        count the job as over now (the GPU call, if it still waits in ZeroGPU's queue, ends by itself: see _train_in_worker)."""
        with contextlib.suppress(OSError):
            (self.run_dir / STOP_FILE).touch()
        if sig != signal.SIGKILL:
            return
        with contextlib.suppress(OSError, ValueError):
            os.kill(int((self.run_dir / PID_FILE).read_text(encoding="utf-8")), signal.SIGKILL)
        with self._lock:
            if self.returncode is None:
                self.returncode = -signal.SIGKILL
        self._done.set()


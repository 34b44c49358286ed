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
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

ACTIVE = os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")  # read as spaces/config.py reads it
MAX_MINUTES = 3  # a free account's daily ZeroGPU quota is a few minutes (2 anonymous); the slider stops here on ZeroGPU
OVERHEAD_S = 40  # asked for on top of the visitor's minutes: the worker's start (fork, CUDA), the text's tokens, the last save
STOP_FILE = ".stop"  # written into the job folder by Stop; the worker watches for it
PID_FILE = ".gpu-worker.pid"  # the worker's pid, so a discarded job's worker can be killed
TAB_NOTE = (f"On this Space your training runs on a ZeroGPU GPU for at most {MAX_MINUTES} minutes; the time it takes "
            "comes out of your daily ZeroGPU quota (a few minutes a day: less without a Hugging Face login, more with PRO). "
            "Generating text runs on the CPU and costs no quota.")


def gpu_seconds(script: str, argv: list[str], log_path: str, minutes: float) -> int:
    """The GPU time to ask ZeroGPU for: the visitor's budget plus OVERHEAD_S (the decorator calls it with the call's arguments)."""
    return int(minutes * 60) + OVERHEAD_S


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


def _train_in_worker(script: str, argv: list[str], log_path: str, minutes: float) -> int:
    """script's (train.py's) main(argv) in this process (ZeroGPU's worker, which holds the GPU), its output appended to log_path
    in the job folder, as a child's would go; returns its exit status. Stop works through STOP_FILE in that folder."""
    run = Path(log_path).parent
    with contextlib.suppress(OSError):
        (run / PID_FILE).write_text(str(os.getpid()), encoding="utf-8")
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
                rc = _load_script(script).main(argv)
            finally:
                with lock:
                    done.set()
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

    def __init__(self, script: Path, argv: list[str], log_path: Path, minutes: float):
        """Start script (train.py) with argv on ZeroGPU for a budget of minutes; its output goes to log_path, whose folder
        is the job's."""
        self.log_path = Path(log_path)
        self.run_dir = self.log_path.parent
        self.returncode: int | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        context = contextvars.copy_context()
        args = (str(script), list(argv), str(self.log_path), minutes)
        threading.Thread(target=context.run, args=(self._call, args), name=f"zerogpu-{self.run_dir.name}", daemon=True).start()

    def _call(self, args: tuple) -> None:
        try:
            rc = train_on_gpu(*args)
        except Exception as e:  # ZeroGPU said no (quota, no GPU free, aborted): its message becomes the job's error
            message = " ".join(str(e).split()) or type(e).__name__
            with contextlib.suppress(OSError), open(self.log_path, "a", encoding="utf-8") as log:
                log.write(f"error: ZeroGPU: {message}\n")
            rc = 1
        with self._lock:
            if self.returncode is None:
                self.returncode = rc
        self._done.set()

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


"""The Train tab: a visitor trains a small GPT on their own text (model/webapp/training_job.py does the work), watches the loss
curve and samples, may stop early, reads the int8 report, downloads the checkpoints and tries the model in the Generate
tab. Endpoints: /train_start, /train_status, /train_stop, /train_zip (and /use_model, in the Generate tab)."""

from __future__ import annotations

import contextlib
import html
import logging
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from model.formats.checkpoint import CheckpointError
from model.tokenizer import TokenizerError
from model.webapp import zerogpu
from model.webapp.checks import InputError, shown
from model.webapp.generate_tab import MODEL_CHOICES, ChooseModel, PoolFor
from model.webapp.pool import OWN_MODEL_COPIES, TRAIN_THREADS, ModelPool, model_card
from model.webapp.training_job import (
    DEFAULT_MINUTES,
    MAX_BYTES,
    MAX_MINUTES,
    MIN_MINUTES,
    PROJECT,
    QUANTIZE_PY,
    TRAIN_PY,
    JobError,
    ModelStore,
    Status,
    TrainingJob,
    TrainingSlot,
    make_zip,
    remove_tree,
)

SHAKESPEARE = PROJECT / "input.txt"  # the bundled Tiny Shakespeare; the choice shows only where the file is (a Space folder must carry it)
SOURCES = {"upload": "Upload a .txt file", "paste": "Paste text", "shakespeare": "Tiny Shakespeare (bundled)"}
TICK_S = 3.0  # the live view refreshes this often while the visitor's job trains or quantizes
SWEEP_INTERVAL_S = 60.0  # how often models past their hour are looked for
CURVE_COLORS = {"train": "#1f77b4", "validation": "#ff7f0e"}  # named in the plot's label: Gradio 6 draws no legend entries
SAMPLE_PLACEHOLDER = "(a sample appears at each evaluation)"
YOURS_GONE = "Your model is not ready, or was deleted (models are kept for an hour): the bundled model answered."

log = logging.getLogger(__name__)


def _owner(request: gr.Request | None) -> str:
    """Whose model a request is about: its browser session (gradio_client keeps one per Client)."""
    owner = getattr(request, "session_hash", None)
    if not owner:
        raise JobError("This request has no session: use the page, or gradio_client (it keeps one session per Client).")
    return owner


@contextlib.contextmanager
def _api_errors() -> Iterator[None]:
    """For the API endpoints: a JobError inside becomes a gr.Error with the same sentence."""
    try:
        yield
    except JobError as e:
        raise InputError(str(e)) from None


class Training:
    """The Train tab's server-wide state: the one training slot, the visitors' models by session, who chose their own
    model in the Generate tab, and each visitor's finished model loaded for generation (one copy, loaded on first use)."""

    def __init__(self, slot: TrainingSlot | None = None, store: ModelStore | None = None):
        self.slot = slot or TrainingSlot(threads=TRAIN_THREADS)
        self.store = store or ModelStore()
        self._lock = threading.Lock()
        self._yours: set[str] = set()  # owners whose Generate requests their own model serves
        self._pools: dict[str, tuple[TrainingJob, ModelPool]] = {}  # owner -> (their finished job, its loaded model)
        self._closed = threading.Event()

    @staticmethod
    def available() -> bool:
        """Whether this install can train (a Space folder without train.py and quantize.py cannot)."""
        return TRAIN_PY.is_file() and QUANTIZE_PY.is_file()

    def start(self, owner: str, data: bytes, minutes: Any) -> TrainingJob:
        """Start owner's training (replacing their previous model), or a JobError saying why not."""
        own = self.store.get(owner)
        if own is not None and own.active:
            raise JobError("Your model is still training: press Stop to end it early, or wait for its report.")
        job = self.slot.start(data, minutes)
        self.store.add(owner, job)
        self._prune()
        return job

    def own_pool(self, owner: str) -> ModelPool | None:
        """owner's finished model, loaded once; None while it trains, or if it failed or was deleted."""
        job = self.store.get(owner)
        with self._lock:
            cached = self._pools.get(owner)
            if cached is not None and cached[0] is job:
                return cached[1]
            self._pools.pop(owner, None)
        model_dir = job.status().model_dir if job is not None else None
        if model_dir is None:
            return None
        try:
            pool = ModelPool(model_dir, copies=OWN_MODEL_COPIES)
        except (CheckpointError, TokenizerError, OSError, ValueError):  # deleted meanwhile
            return None
        with self._lock:
            self._pools[owner] = (job, pool)
        return pool

    def pool_for(self, bundled: ModelPool) -> PoolFor:
        """For the Generate tab: the model of each request, the visitor's own if they chose it and it exists."""
        def pick(request: gr.Request | None) -> ModelPool:
            owner = getattr(request, "session_hash", None)
            with self._lock:
                chose_yours = owner in self._yours
            if not chose_yours:
                return bundled
            pool = self.own_pool(owner)
            if pool is None:
                gr.Warning(YOURS_GONE)
                return bundled
            return pool
        return pick

    def chooser(self, bundled: ModelPool) -> ChooseModel:
        """For the Generate tab: record a visitor's choice of model and return the card of the model chosen."""
        def use_model(model: Any = "bundled", request: gr.Request | None = None) -> str:
            if model not in MODEL_CHOICES:
                raise InputError(f"model must be one of {', '.join(map(repr, MODEL_CHOICES))}, got {shown(model)}.")
            with _api_errors():
                owner = _owner(request)
            pool = self.own_pool(owner) if model == "yours" else None
            if model == "yours" and pool is None:
                raise InputError(self._why_no_model(owner))
            with self._lock:
                if model == "yours":
                    self._yours.add(owner)
                else:
                    self._yours.discard(owner)
            return model_card(bundled) if pool is None else "**Your model** · " + model_card(pool)
        return use_model

    def _why_no_model(self, owner: str) -> str:
        job = self.store.get(owner)
        if job is None:
            return "You have no trained model yet: train one in the Train tab first (models are kept for an hour)."
        if job.active:
            return "Your model is still training: choose it once the Train tab shows its report."
        return "Your last training left no model: train again in the Train tab."

    def forget(self, request: gr.Request) -> None:
        """The visitor's session ended: delete their model (killing its training if it still runs)."""
        owner = getattr(request, "session_hash", None)
        if owner:
            self.store.drop(owner)
            with self._lock:
                self._pools.pop(owner, None)
                self._yours.discard(owner)

    def sweep(self) -> None:
        """Delete models past their hour, and let go of loaded models the store no longer has."""
        self.store.sweep()
        self._prune()

    def _prune(self) -> None:
        with self._lock:
            for owner, (job, _) in list(self._pools.items()):
                if self.store.get(owner) is not job:
                    del self._pools[owner]

    def start_sweeping(self, interval_s: float = SWEEP_INTERVAL_S) -> None:
        """Sweep every interval_s seconds in a background thread, until close()."""
        def loop() -> None:
            while not self._closed.wait(interval_s):
                try:
                    self.sweep()
                except Exception:  # a bug here must not stop the sweeping for good
                    log.exception("sweeping trained models failed")
        threading.Thread(target=loop, name="smallgpt-sweeper", daemon=True).start()

    def close(self) -> None:
        """Stop sweeping and delete every model (server shutdown); idempotent."""
        self._closed.set()
        self.store.clear()  # kills what still runs; a killed job's folder would go a moment later, in a thread
        remove_tree(self.slot.root)  # at exit that thread may not get the chance: the whole jobs' folder goes now
        with self._lock:
            self._pools.clear()
            self._yours.clear()


# ---- what a request sends ------------------------------------------------------------------------------------------

def _text_bytes(source: Any, text: Any, file: Any) -> bytes:
    """The training text a request chose, as bytes (check_text judges them), or a JobError."""
    if source == "upload":
        path = file.get("path") if isinstance(file, dict) else file  # raw values: Gradio's FileData, checked to be an upload
        if not isinstance(path, str) or not path:
            raise JobError("Choose a .txt file to upload first.")
        try:
            return Path(path).read_bytes()
        except OSError:
            raise JobError("The uploaded file could not be read: upload it again.") from None
    if source == "paste":
        text = "" if text is None else text
        if not isinstance(text, str):
            raise JobError(f"The text must be a string, got {shown(text)}.")
        return text.encode("utf-8", "surrogatepass")  # a lone surrogate from JSON: check_text says where it is
    if source == "shakespeare" and SHAKESPEARE.is_file():
        return SHAKESPEARE.read_bytes()
    raise JobError(f"source must be one of {', '.join(map(repr, sources()))}, got {shown(source)}.")


def _checked_minutes(minutes: Any) -> Any:
    """minutes if it is a number (the slot checks its range), else a JobError."""
    if isinstance(minutes, bool) or not isinstance(minutes, int | float):
        raise JobError(f"minutes must be a number from {MIN_MINUTES} to {MAX_MINUTES}, got {shown(minutes)}.")
    return minutes


def sources() -> list[str]:
    """The text sources on offer: Tiny Shakespeare only where the bundled file is."""
    return [key for key in SOURCES if key != "shakespeare" or SHAKESPEARE.is_file()]


# ---- what the tab shows --------------------------------------------------------------------------------------------

def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{math.ceil(seconds / 60)} minutes"


def status_text(st: Status | None) -> str:
    """One sentence on where the visitor's training stands."""
    if st is None:
        return "No training in this session yet."
    if st.state == "running":
        return (f"Training: {st.elapsed_s:.0f} s of {st.budget_s:.0f} s; the model is ready in about "
                f"{_duration(st.seconds_left)}.")
    if st.state == "quantizing":
        return f"Trained for {st.elapsed_s:.0f} s; now making the int8 copy and scoring it on the validation text."
    if st.report is not None:
        if st.state == "stopped":
            return f"Stopped after {st.elapsed_s:.0f} s: the best weights so far were kept and quantized to int8."
        return f"Done: trained for {st.elapsed_s:.0f} s, then quantized to int8."
    return f"{'Stopped' if st.state == 'stopped' else 'Failed'}: {st.error}"


def status_html(st: Status | None) -> str:
    """status_text under a progress bar against the time budget (moving while the int8 copy is made)."""
    bar = ""
    if st is not None and st.state == "running":
        bar = f'<progress max="{st.budget_s:.0f}" value="{min(st.elapsed_s, st.budget_s):.0f}"></progress>'
    elif st is not None and st.state == "quantizing":
        bar = "<progress></progress>"  # no value: the browser shows it as busy
    elif st is not None and st.report is not None:
        bar = '<progress max="1" value="1"></progress>'
    style = '<style>#train-status progress { width: 100%; height: 1.2em; }</style>'
    return f"{style}{bar}<p>{html.escape(status_text(st))}</p>"


def curve_frame(st: Status | None) -> pd.DataFrame | None:
    """The loss curves as rows (step, nats_per_char, split) for a gr.LinePlot; None before the first point.

    Gradio's plot keeps the series of the first table it draws (and draws nothing after an empty one), so a curve
    without points yet gets one NaN row, which the plot skips."""
    if st is None or not (st.train_curve or st.val_curve):
        return None
    first = min(step for step, _ in st.train_curve + st.val_curve)
    rows = [(step, loss, split) for split, curve in (("train", st.train_curve), ("validation", st.val_curve))
            for step, loss in (curve or [(first, math.nan)])]
    return pd.DataFrame(rows, columns=["step", "nats_per_char", "split"])


def report_markdown(st: Status | None) -> str:
    """quantize.py's report of the finished model: size and validation loss of the fp32 and int8 weights."""
    if st is None or st.report is None:
        return ""
    r = st.report

    def num(key: str, scale: float = 1.0, fmt: str = ".3f") -> str:
        return format(r[key] * scale, fmt) if isinstance(r.get(key), int | float) else "n/a"

    steps = max((rec.get("step", 0) for rec in st.records), default=0)
    return (f"**Your model**: {num('params', 1e-6, '.2f')} M parameters, {steps} steps in {st.elapsed_s:.0f} s.\n\n"
            "| weights | size | validation loss |\n|---|---|---|\n"
            f"| fp32 | {num('size_fp32_bytes', 1e-6, '.1f')} MB | {num('val_nats_per_char_fp32')} nats/char |\n"
            f"| int8 | {num('size_int8_bytes', 1e-6, '.1f')} MB | {num('val_nats_per_char_int8')} nats/char |\n\n"
            "Try it: choose **Model: yours** in the Generate tab. The zip holds both checkpoints; unzip it, then "
            "`python generate.py --ckpt DIR/int8` or `python app.py --ckpt DIR/int8`.")


def status_dict(st: Status | None) -> dict[str, Any]:
    """What /train_status returns: plain JSON."""
    if st is None:
        return {"state": "none", "message": status_text(None)}
    return {"state": st.state, "message": status_text(st), "elapsed_s": round(st.elapsed_s, 1), "budget_s": st.budget_s,
            "seconds_left": round(st.seconds_left), "train_curve": [[s, round(v, 4)] for s, v in st.train_curve],
            "val_curve": [[s, round(v, 4)] for s, v in st.val_curve], "sample": st.sample, "error": st.error,
            "report": st.report}


def build_train_tab(training: Training) -> None:
    """The tab's components and events, inside the enclosing gr.Blocks and gr.Tab."""

    def start_job(source: Any, text: Any, file: Any, minutes: Any, request: gr.Request | None) -> TrainingJob:
        return training.start(_owner(request), _text_bytes(source, text, file), _checked_minutes(minutes))

    def stop_job(request: gr.Request | None) -> TrainingJob:
        job = training.store.get(_owner(request))
        if job is None or job.state != "running":
            raise JobError("Nothing of yours is training: there is nothing to stop (the int8 copy, once started, "
                           "takes a few seconds).")
        job.stop()
        return job

    # ---- the API: a JobError becomes a gr.Error, which tells the client that its call failed ----

    def train_start(source: Any = "upload", text: Any = None, file: Any = None, minutes: Any = DEFAULT_MINUTES,
                    request: gr.Request | None = None) -> dict[str, Any]:
        with _api_errors():
            return status_dict(start_job(source, text, file, minutes, request).status())

    def train_status(request: gr.Request | None = None) -> dict[str, Any]:
        with _api_errors():
            job = training.store.get(_owner(request))
        return status_dict(job.status() if job is not None else None)

    def train_stop(request: gr.Request | None = None) -> dict[str, Any]:
        with _api_errors():
            return status_dict(stop_job(request).status())

    def train_zip(request: gr.Request | None = None) -> str:
        with _api_errors():
            job = training.store.get(_owner(request))
            if job is None:
                raise JobError("You have no trained model in this session: start a training first.")
            return str(make_zip(job.run_dir))

    # ---- the page: a JobError is a warning that leaves the outputs as they were ----

    def view(job: TrainingJob | None) -> tuple[Any, ...]:
        st = job.status() if job is not None else None
        download = gr.DownloadButton(visible=False)
        if job is not None and st.model_dir is not None:
            with contextlib.suppress(JobError):  # deleted meanwhile
                download = gr.DownloadButton(value=str(make_zip(job.run_dir)), visible=True)
        return (status_html(st), curve_frame(st), (st.sample or "") if st else "", report_markdown(st), download,
                gr.Timer(active=st is not None and st.active))

    def start_on_page(source: Any, text: Any, file: Any, minutes: Any, request: gr.Request) -> tuple[Any, ...]:
        try:
            return view(start_job(source, text, file, minutes, request))
        except JobError as e:
            gr.Warning(str(e))
            return tuple(gr.skip() for _ in outputs)

    def stop_on_page(request: gr.Request) -> tuple[Any, ...]:
        try:
            job = stop_job(request)
        except JobError as e:
            gr.Warning(str(e))
            return tuple(gr.skip() for _ in outputs)
        gr.Info("Stopping: the best weights so far are kept, then quantized.")
        return view(job)

    def refresh(request: gr.Request) -> tuple[Any, ...]:
        return view(training.store.get(_owner(request)))

    def show_source(source: str) -> tuple[Any, Any]:
        return gr.update(visible=source == "upload"), gr.update(visible=source == "paste")

    gr.Markdown(f"Train a small GPT on a text of yours, then try it in the Generate tab. A plain-text (UTF-8) file of up "
                f"to {MAX_BYTES // 2**20} MB; a few pages at least, a few MB at best. One training runs at a time on this "
                "server. Your model is deleted when you close this page, an hour after its training started, or when you "
                "train again.")
    if zerogpu.ACTIVE:
        gr.Markdown(zerogpu.TAB_NOTE)
    with gr.Row():
        with gr.Column(scale=1):
            source = gr.Radio([(SOURCES[key], key) for key in sources()], value="upload", label="Text",
                              elem_id="train-source")
            file = gr.File(label=f"Your text: a .txt file, UTF-8, at most {MAX_BYTES // 2**20} MB", file_types=[".txt"],
                           elem_id="train-file")
            text = gr.Textbox(label="Your text", lines=8, visible=False, elem_id="train-text",
                              placeholder="Paste a few pages of text (thousands of characters) here")
            minutes = gr.Slider(MIN_MINUTES, MAX_MINUTES, value=DEFAULT_MINUTES, step=1, label="Minutes of training",
                                elem_id="train-minutes")
            with gr.Row():
                start = gr.Button("Start", variant="primary", elem_id="train-start")
                stop = gr.Button("Stop", variant="stop", elem_id="train-stop")
            status = gr.HTML(status_html(None), elem_id="train-status")
            report = gr.Markdown(elem_id="train-report")
            download = gr.DownloadButton("Download the model (.zip)", visible=False, elem_id="train-download")
        with gr.Column(scale=1):
            curve = gr.LinePlot(None, x="step", y="nats_per_char", color="split", color_map=CURVE_COLORS,
                                y_title="nats/char", label="Loss per character (blue: train, orange: validation)",
                                height=300, elem_id="train-curve")
            sample = gr.Textbox(label="Latest sample (the model writing, at the last evaluation)", lines=6, max_lines=8,
                                interactive=False, placeholder=SAMPLE_PLACEHOLDER, elem_id="train-sample")
    timer = gr.Timer(TICK_S, active=False)
    api_status, api_zip = gr.JSON(visible=False), gr.File(visible=False)  # the outputs of the API endpoints

    inputs = [source, text, file, minutes]
    outputs = [status, curve, sample, report, download, timer]
    # Cheap and quick: none of these waits for a place in the queue behind generation requests (concurrency_limit=None).
    # preprocess=False: raw values reach the checks above (Gradio still refuses a file that is not an upload).
    gr.on([], train_start, inputs, api_status, api_name="train_start", preprocess=False, concurrency_limit=None)
    gr.on([], train_status, [], api_status, api_name="train_status", concurrency_limit=None)
    gr.on([], train_stop, [], api_status, api_name="train_stop", concurrency_limit=None)
    gr.on([], train_zip, [], api_zip, api_name="train_zip", concurrency_limit=None)
    start.click(start_on_page, inputs, outputs, api_visibility="private", preprocess=False, concurrency_limit=None,
                show_progress="minimal")
    stop.click(stop_on_page, [], outputs, api_visibility="private", concurrency_limit=None, show_progress="hidden")
    timer.tick(refresh, [], outputs, api_visibility="private", concurrency_limit=None, show_progress="hidden")
    source.change(show_source, [source], [file, text], api_visibility="private", queue=False)


"""The Train tab: a visitor trains a small GPT on their own text, watches the loss curves and samples, may stop early,
reads the int8 report, downloads the checkpoints and the model's static web site, and tries the model in the Generate
tab. Only the page: the jobs are model/webapp/training_job.py's, whose they are and how long they are kept
model/webapp/visitors.py's.
Endpoints: /train_start, /train_status, /train_stop, /train_zip, /train_site_zip (and /use_model, in the Generate tab)."""

from __future__ import annotations

import contextlib
import functools
import html
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.context import Context, get_render_context, set_render_context
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from model.webapp import zerogpu
from model.webapp.checks import InputError, shown
from model.webapp.training_job import (
    DEFAULT_MINUTES,
    MAX_BYTES,
    MAX_MINUTES,
    MIN_MINUTES,
    MINUTES_STEP,
    PROJECT,
    JobError,
    Status,
    TrainingJob,
    check_text,
)
from model.webapp.visitors import KEPT, Visitors

SHAKESPEARE = PROJECT / "input.txt"  # the bundled Tiny Shakespeare; the choice shows only where the file is (a Space folder must carry it)
SOURCES = {"upload": "Upload a .txt file", "paste": "Paste text", "shakespeare": "Tiny Shakespeare (bundled)"}
TICK_S = 3.0  # the live view refreshes this often while the visitor's job trains or quantizes
CURVE_COLORS = {"train": "#1f77b4", "validation": "#ff7f0e"}
SAMPLE_PLACEHOLDER = "(a sample appears at each evaluation)"
# The loss curve: 640 x 448 pixels whose text is CURVE_FONT_PT (22 px); a 390-px phone shows it about 326 px wide, where
# that text is still 11 px.
CURVE_INCHES, CURVE_DPI, CURVE_FONT_PT = (4.0, 2.8), 160, 10


@contextlib.contextmanager
def _api_errors() -> Iterator[None]:
    """For the API endpoints: a JobError inside becomes a gr.Error with the same sentence."""
    try:
        yield
    except JobError as e:
        raise InputError(str(e)) from None


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
    """One sentence on where the visitor's training stands; its clock never runs past the budget."""
    if st is None:
        return "No training in this session yet."
    if st.state == "waiting":
        return (f"Waiting for a ZeroGPU GPU: this run asks for {st.gpu_request_s} s of GPU time; training starts as soon as "
                "ZeroGPU gives it one.")
    if st.state == "running":
        if st.elapsed_s >= st.budget_s:
            return (f"Training: {st.budget_s:.0f} s of {st.budget_s:.0f} s, time is up: the trainer is saving its best "
                    "weights; the int8 copy follows.")
        return (f"Training: {st.elapsed_s:.0f} s of {st.budget_s:.0f} s; the model is ready in about "
                f"{_duration(st.seconds_left)}.")
    if st.state == "quantizing":
        left = f"about {_duration(st.seconds_left)} left" if st.seconds_left >= 1 else "a few more seconds"
        if st.writing_site:
            return f"Trained for {st.elapsed_s:.0f} s and quantized to int8; now writing its web site ({left})."
        return f"Trained for {st.elapsed_s:.0f} s; now making the int8 copy and scoring it on the validation text ({left})."
    if st.report is not None:
        if st.at_limit:
            return (f"Stopped at the GPU time limit after {st.elapsed_s:.0f} s: the best weights saved by then were kept and "
                    "quantized to int8.")
        if st.state == "stopped":
            return f"Stopped after {st.elapsed_s:.0f} s: the best weights so far were kept and quantized to int8."
        return f"Done: trained for {st.elapsed_s:.0f} s, then quantized to int8."
    if st.error and st.error.startswith("ZeroGPU"):  # a refusal: its sentence says what to do
        return st.error
    return f"{'Stopped' if st.state == 'stopped' else 'Failed'}: {st.error}"


def status_html(st: Status | None) -> str:
    """status_text under a progress bar against the time budget (moving while the int8 copy is made)."""
    bar = ""
    if st is not None and st.state == "running":
        bar = f'<progress max="{st.budget_s:.0f}" value="{min(st.elapsed_s, st.budget_s):.0f}"></progress>'
    elif st is not None and st.state in ("waiting", "quantizing"):
        bar = "<progress></progress>"  # no value: the browser shows it as busy
    elif st is not None and st.report is not None:
        bar = '<progress max="1" value="1"></progress>'
    style = '<style>#train-status progress { width: 100%; height: 1.2em; }</style>'
    return f"{style}{bar}<p>{html.escape(status_text(st))}</p>"


def curve_figure(st: Status | None) -> Figure | None:
    """The loss curves, train and validation in nats per character against the step, with a legend; None before the
    first point. Every point of the trainer's log is drawn; a lone validation point is a marker. The step axis spans the
    steps the run is expected to reach from the first frame on. Small in inches at a high dpi, so that its text stays
    readable where the picture is shrunk to a phone's width (CURVE_DPI, CURVE_FONT_PT)."""
    if st is None or not (st.train_curve or st.val_curve):
        return None
    fig = Figure(figsize=CURVE_INCHES, dpi=CURVE_DPI, layout="constrained")
    ax = fig.add_subplot()
    for split, curve in (("train", st.train_curve), ("validation", st.val_curve)):
        if curve:
            steps, losses = zip(*curve, strict=True)
            ax.plot(steps, losses, "-" if split == "train" and len(curve) > 1 else "o-", ms=4, color=CURVE_COLORS[split],
                    label=split)
    last = max(step for curve in (st.train_curve, st.val_curve) for step, _ in curve)
    ax.set_xlim(0, max(st.expected_steps or 0, last, 1))
    ax.set_title("Loss per character", fontsize=CURVE_FONT_PT + 1)
    ax.set_xlabel("step", fontsize=CURVE_FONT_PT)
    ax.set_ylabel("nats/char", fontsize=CURVE_FONT_PT)
    ax.tick_params(labelsize=CURVE_FONT_PT)
    ax.xaxis.set_major_locator(MaxNLocator(4, integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(4))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", frameon=True, fontsize=CURVE_FONT_PT)
    return fig


def gpu_note(source: Any, text: Any, file: Any, minutes: Any) -> str:
    """On ZeroGPU, before Start: the GPU time the run will ask for with this text and these minutes, and what the quota
    check counts it as on a GPU of the largest duration factor."""
    try:
        tokens = _tokens(check_text(_text_bytes(source, text, file)))
        request = zerogpu.request_seconds(tokens, _checked_minutes(minutes))
        what = f"Start asks ZeroGPU for {request} s of GPU time"
    except JobError:  # no text chosen yet, or one that Start will refuse: the most these minutes can ask for
        request = zerogpu.request_seconds(0, minutes if isinstance(minutes, int | float) else DEFAULT_MINUTES)
        what = f"Start asks ZeroGPU for at most {request} s of GPU time"
    counted = zerogpu.charged(request, zerogpu.DURATION_FACTOR_MAX)
    return (f"{what} (your text's training plus {zerogpu.OVERHEAD_S} s to start and save; ZeroGPU checks up to {counted} s "
            "against your quota on GPUs that count time 1.5x); you are charged only the time it uses.")


@functools.lru_cache(maxsize=4)
def _tokens(text: str) -> int:
    """zerogpu.train_tokens, remembered for the last few texts (the note is redrawn as the minutes change)."""
    return zerogpu.train_tokens(text)


def deletion_text(expires_in: float | None, now: float | None = None, site: bool = False) -> str:
    """When a model and its zips go (site: it has a web site's zip too): a UTC time of day and the minutes until then."""
    if expires_in is None:
        return ""
    at = time.strftime("%H:%M", time.gmtime((time.time() if now is None else now) + expires_in))
    minutes = max(1, round(expires_in / 60))
    what = "Your model, its zip and its web site's zip are" if site else "Your model and its zip are"
    return (f"{what} deleted at {at} UTC, in {minutes} minute{'s' * (minutes != 1)} (an hour after its training started; "
            "reloading this page keeps them until then).")


def site_markdown(st: Status) -> str:
    """The report's paragraph on the model's static web site: how to serve its zip, or why there is none."""
    if st.site_error:
        return st.site_error
    if st.site_folder is None:
        return ""
    return (f"Or download it as a web site (the second button): its zip unpacks to `{st.site_folder}`, a static site whose "
            "page runs the int8 model in the browser, with no server. Serve it with `python -m http.server --directory "
            f"{st.site_folder} 8000`, or host it for free as a Hugging Face static Space (smallgpt's docs/web.md says how).")


def report_markdown(st: Status | None, expires_in: float | None = None) -> str:
    """quantize.py's report of the finished model: size and validation loss of the fp32 and int8 weights, how to run the
    download (DIR: the folder the zip unpacks to) and serve the web site's (or why there is none), and when the model is
    deleted (expires_in seconds from now)."""
    if st is None or st.report is None:
        return ""
    r = st.report

    def num(key: str, scale: float = 1.0, fmt: str = ".3f") -> str:
        return format(r[key] * scale, fmt) if isinstance(r.get(key), int | float) else "n/a"

    steps = max((rec.get("step", 0) for rec in st.records), default=0)
    folder = f"`{st.zip_folder}`" if st.zip_folder else "one folder"
    site = site_markdown(st)
    return (f"**Your model**: {num('params', 1e-6, '.2f')} M parameters, {steps} steps in {st.elapsed_s:.0f} s.\n\n"
            "| weights | size | validation loss |\n|---|---|---|\n"
            f"| fp32 | {num('size_fp32_bytes', 1e-6, '.1f')} MB | {num('val_nats_per_char_fp32')} nats/char |\n"
            f"| int8 | {num('size_int8_bytes', 1e-6, '.1f')} MB | {num('val_nats_per_char_int8')} nats/char |\n\n"
            "Try it: choose **Model: yours** in the Generate tab. Or download it: the zip unpacks to "
            f"{folder} (DIR below), the fp32 checkpoint in DIR and the int8 one in DIR/int8; then run "
            "`python generate.py --ckpt DIR/int8` or `python app.py --ckpt DIR/int8` in a clone of smallgpt.\n\n"
            + (f"{site}\n\n" if site else "") + deletion_text(expires_in, site=st.site_folder is not None))


def status_dict(st: Status | None) -> dict[str, Any]:
    """What /train_status returns: plain JSON."""
    if st is None:
        return {"state": "none", "message": status_text(None)}
    return {"state": st.state, "message": status_text(st), "elapsed_s": round(st.elapsed_s, 1), "budget_s": st.budget_s,
            "seconds_left": round(st.seconds_left), "train_curve": [[s, round(v, 4)] for s, v in st.train_curve],
            "val_curve": [[s, round(v, 4)] for s, v in st.val_curve], "sample": st.sample, "error": st.error,
            "report": st.report, "site_ready": st.site_folder is not None, "site_error": st.site_error}


def _at_page_level(component: gr.components.Component) -> gr.components.Component:
    """component rendered at the page's top level, outside the tabs. Gradio mounts a tab's components in the browser only
    once the tab is opened, and a gr.BrowserState saves a value to the browser only when mounted as the value arrives:
    the owner key that the page's load event sets must be kept even if the Train tab is never opened."""
    here = get_render_context()
    set_render_context(Context.root_block)
    try:
        return component.render()
    finally:
        set_render_context(here)


def build_train_tab(visitors: Visitors) -> None:
    """The tab's components and events, inside the enclosing gr.Blocks and gr.Tab."""

    def start_job(source: Any, text: Any, file: Any, minutes: Any, request: gr.Request | None) -> TrainingJob:
        return visitors.start(visitors.owner(request), _text_bytes(source, text, file), _checked_minutes(minutes))

    def stop_job(request: gr.Request | None) -> TrainingJob:
        job = visitors.get(visitors.owner(request))
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
            job = visitors.get(visitors.owner(request))
        return status_dict(job.status() if job is not None else None)

    def train_stop(request: gr.Request | None = None) -> dict[str, Any]:
        with _api_errors():
            return status_dict(stop_job(request).status())

    def train_zip(request: gr.Request | None = None) -> str:
        with _api_errors():
            return visitors.served_zip(visitors.owner(request))

    def train_site_zip(request: gr.Request | None = None) -> str:
        with _api_errors():
            return visitors.served_zip(visitors.owner(request), "site")

    # ---- the page: a JobError is a warning that leaves the outputs as they were ----

    def view(owner: str) -> tuple[Any, ...]:
        job = visitors.get(owner)
        st = job.status() if job is not None else None
        download, download_site = gr.DownloadButton(visible=False), gr.DownloadButton(visible=False)
        if st is not None and st.model_dir is not None:
            with contextlib.suppress(JobError):  # deleted meanwhile
                download = gr.DownloadButton(value=visitors.served_zip(owner), visible=True)
        if st is not None and st.site_folder is not None:
            with contextlib.suppress(JobError):
                download_site = gr.DownloadButton(value=visitors.served_zip(owner, "site"), visible=True)
        running = st is not None and st.state == "running"
        return (status_html(st), curve_figure(st), (st.sample or "") if st else "",
                report_markdown(st, visitors.expires_in(owner)), download, download_site,
                gr.Button(interactive=running), gr.Timer(active=st is not None and st.active))

    def start_on_page(source: Any, text: Any, file: Any, minutes: Any, request: gr.Request) -> tuple[Any, ...]:
        try:
            job = start_job(source, text, file, minutes, request)
        except JobError as e:
            gr.Warning(str(e))
            return tuple(gr.skip() for _ in outputs)
        gr.Info(f"Training started: {_duration(job.budget_s)}, then the int8 copy.")
        return view(visitors.owner(request))

    def stop_on_page(request: gr.Request) -> tuple[Any, ...]:
        try:
            stop_job(request)
        except JobError as e:
            gr.Warning(str(e))
            return tuple(gr.skip() for _ in outputs)
        gr.Info("Stopping: the best weights so far are kept, then quantized.")
        return view(visitors.owner(request))

    def refresh(request: gr.Request) -> tuple[Any, ...]:
        return view(visitors.owner(request))

    def on_load(key: Any, request: gr.Request) -> tuple[Any, ...]:
        """The page (re)loaded: link its session to the owner key the browser keeps, and show that owner's model."""
        key = visitors.link(request, key)
        return (key, *view(key))

    def show_source(source: str) -> tuple[Any, Any]:
        return gr.update(visible=source == "upload"), gr.update(visible=source == "paste")

    gr.Markdown(f"Train a small GPT on a text of yours, then try it in the Generate tab. A plain-text (UTF-8) file of up "
                f"to {MAX_BYTES // 2**20} MB; a few pages at least, a few MB at best. One training runs at a time on this "
                f"server. {KEPT}")
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
            minutes = gr.Slider(MIN_MINUTES, MAX_MINUTES, value=DEFAULT_MINUTES, step=MINUTES_STEP,
                                label="Minutes of training" + (" on the GPU, at most" if zerogpu.ACTIVE else ""),
                                elem_id="train-minutes")
            gpu = gr.Markdown(gpu_note("upload", None, None, DEFAULT_MINUTES), visible=zerogpu.ACTIVE, elem_id="train-gpu")
            with gr.Row():
                start = gr.Button("Start", variant="primary", elem_id="train-start")
                stop = gr.Button("Stop", variant="secondary", interactive=False, elem_id="train-stop")
            status = gr.HTML(status_html(None), elem_id="train-status")
            report = gr.Markdown(elem_id="train-report")
            download = gr.DownloadButton("Download the model (.zip)", visible=False, elem_id="train-download")
            download_site = gr.DownloadButton("Download as a web site (.zip)", visible=False, elem_id="train-download-site")
        with gr.Column(scale=1):
            curve = gr.Plot(label="Loss per character", show_label=False, format="png", elem_id="train-curve")
            sample = gr.Textbox(label="Latest sample (the model writing, at the last evaluation)", lines=6, max_lines=8,
                                interactive=False, placeholder=SAMPLE_PLACEHOLDER, elem_id="train-sample")
    timer = gr.Timer(TICK_S, active=False)
    owner_key = _at_page_level(gr.BrowserState(None, storage_key="smallgpt-owner", render=False))  # the page's owner key
    api_status, api_zip = gr.JSON(visible=False), gr.File(visible=False)  # the outputs of the API endpoints

    inputs = [source, text, file, minutes]
    outputs = [status, curve, sample, report, download, download_site, stop, timer]
    # Cheap and quick: none of these waits for a place in the queue behind generation requests (concurrency_limit=None).
    # preprocess=False: raw values reach the checks above (Gradio still refuses a file that is not an upload).
    gr.on([], train_start, inputs, api_status, api_name="train_start", preprocess=False, concurrency_limit=None)
    gr.on([], train_status, [], api_status, api_name="train_status", concurrency_limit=None)
    gr.on([], train_stop, [], api_status, api_name="train_stop", concurrency_limit=None)
    gr.on([], train_zip, [], api_zip, api_name="train_zip", concurrency_limit=None)
    gr.on([], train_site_zip, [], api_zip, api_name="train_site_zip", concurrency_limit=None)
    start.click(start_on_page, inputs, outputs, api_visibility="private", preprocess=False, concurrency_limit=None,
                show_progress="minimal")
    stop.click(stop_on_page, [], outputs, api_visibility="private", concurrency_limit=None, show_progress="hidden")
    timer.tick(refresh, [], outputs, api_visibility="private", concurrency_limit=None, show_progress="hidden")
    source.change(show_source, [source], [file, text], api_visibility="private", queue=False)
    Context.root_block.load(on_load, [owner_key], [owner_key, *outputs], api_visibility="private", concurrency_limit=None,
                            show_progress="hidden")
    if zerogpu.ACTIVE:  # the GPU time Start will ask for, redrawn as the text and the minutes change
        for event in (source.change, file.change, text.blur, minutes.release):
            event(gpu_note, inputs, gpu, api_visibility="private", preprocess=False, concurrency_limit=None,
                  show_progress="hidden")

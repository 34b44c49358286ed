"""The whole app: the page (a header over tabs: Generate and Train) and serving it."""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import logging
import os

import gradio as gr
from fastapi import HTTPException
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model.cpus import set_threads
from model.webapp import zerogpu
from model.webapp.checks import CheckedBlocks
from model.webapp.generate_tab import CSS as GENERATE_CSS
from model.webapp.generate_tab import build_generate_tab
from model.webapp.pool import REQUESTS_AT_ONCE, ModelPool
from model.webapp.train_tab import build_train_tab
from model.webapp.visitors import Visitors

MAX_UPLOAD = "10mb"  # Gradio refuses larger uploads; the Train tab's own limit (training_job.MAX_BYTES) says the same
SHARE_FAILED = "\nCould not create share link"  # how Gradio's advice on a failed share link starts
GRADIO_SHARE_HINT = "* To create a public link, set `share=True` in `launch()`."  # Gradio's, for its Python API
SHARE_HINT = "* To create a public link, run python app.py --share (docs/app.md, Deploy)."
SHARE_NO_PROGRAM = "Gradio's tunnel program (frpc) is not on this machine and could not be downloaded (offline or firewalled?)"
SHARE_NO_SERVER = "the tunnel could not reach Gradio's share server (offline or firewalled?)"
OFFER_TEXT_CHARS = 4000  # the start of a visitor's text that the Generate tab reads its offered prompts from
CACHE_CLEANUP = (1800, 3600)  # every 30 minutes, Gradio deletes uploads and download copies older than an hour
SESSION_ENDED = ("This call's session ended while it waited: another request with the same session_hash closed its "
                 "stream, which cancels the session's calls; give concurrent calls their own session_hash.")

log = logging.getLogger(__name__)


class EndedStreams:
    """ASGI middleware for a stream whose session ended under it. When a client closes one stream of a session, Gradio
    deletes the session's messages and cancels its calls; another stream still open on the same session (API calls
    sharing a session_hash) then raises a 404 after its response started, which the server logs as a traceback and
    answers by dropping the connection. Here that stream ends with an error event saying why, and nothing is logged
    as a crash."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except RuntimeError as e:  # Starlette's "Caught handled exception, but response already started"
            if not (started and isinstance(e.__cause__, HTTPException)):
                raise
            log.info("A stream whose session had ended was closed: %s", scope.get("path"))
            body = f"event: error\ndata: {json.dumps(SESSION_ENDED)}\n\n" if "/call/" in scope.get("path", "") else ""
            with contextlib.suppress(OSError, RuntimeError):  # the client may be gone too
                await send({"type": "http.response.body", "body": body.encode(), "more_body": False})


def build_demo(pool: ModelPool, visitors: Visitors | None = None) -> gr.Blocks:
    """The page; its "generate" endpoint takes prompt (named) and returns one string per sequence box. With visitors
    (their models), a Train tab too, and the Generate tab can switch to the visitor's own model."""
    with CheckedBlocks(title="smallgpt", delete_cache=CACHE_CLEANUP) as demo:
        gr.Markdown("# smallgpt\nA small GPT trained on one text file, quantized to int8, running on CPU. "
                    "Type the start of a text; the model continues it." +
                    (" Or train your own model on a text of yours in the Train tab." if visitors is not None else ""))
        with gr.Tabs():
            with gr.Tab("Generate", id="generate"):
                if visitors is None:
                    build_generate_tab(pool)
                else:
                    build_generate_tab(pool, visitors.pool_for(pool), visitors.chooser(pool),
                                       lambda request: visitors.text_start(request, OFFER_TEXT_CHARS))
            if visitors is not None:
                with gr.Tab("Train", id="train"):
                    build_train_tab(visitors)
        if visitors is not None:
            demo.unload(visitors.forget)  # a session ended: an API client's model goes; a page's stays with its owner key
    return demo


def launch(pool: ModelPool, host: str | None = None, port: int | None = None, share: bool = False,
           prevent_thread_lock: bool = False, train: bool = True, visitors: Visitors | None = None) -> gr.Blocks:
    """Serve the app, up to REQUESTS_AT_ONCE generation requests decoded together on the pool's copies; on Spaces
    (SPACE_ID set) on 0.0.0.0:7860. With train (the default), the Train tab, backed by visitors (default: new Visitors)."""
    if os.environ.get("SPACE_ID"):
        host, port, share = host or "0.0.0.0", port or 7860, False
    if train and visitors is None:
        if Visitors.available():
            visitors = Visitors()
        else:
            log.warning("No Train tab: train.py and quantize.py are not beside the model package.")
    if not train:
        visitors = None
    if visitors is not None:
        visitors.start_sweeping()
        atexit.register(visitors.close)  # at shutdown, delete the visitors' models and kill a training still running
    set_threads(pool.size)
    if zerogpu.ACTIVE:  # spaces' CUDA emulation, in this thread only, breaks the warm-up's traces
        zerogpu.off_main_thread(pool.warm_up)
    else:
        pool.warm_up()
    demo = build_demo(pool, visitors)
    demo.queue(default_concurrency_limit=REQUESTS_AT_ONCE, max_size=64)
    launch_args = dict(server_name=host, server_port=port, footer_links=["api", "gradio"], ssr_mode=False,
                       max_file_size=MAX_UPLOAD, app_kwargs={"middleware": [Middleware(EndedStreams)]}, css=GENERATE_CSS)
    # Gradio prints advice meant for its Python API (share=True in launch()), and where a share link fails, a page of
    # it: say the kit's own words instead (--share; one sentence on a failed link), and keep serving locally.
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            demo.launch(share=share, prevent_thread_lock=True, **launch_args)
    finally:
        printed = out.getvalue().split(SHARE_FAILED)[0].replace(GRADIO_SHARE_HINT, SHARE_HINT)
        print(printed.rstrip("\n"), flush=True)
    if share and demo.share_url is None:
        why = (SHARE_NO_PROGRAM if "Missing file" in out.getvalue() else SHARE_NO_SERVER)
        print(f"No share link: {why}; the app is still served locally at {demo.local_url}.", flush=True)
    if not prevent_thread_lock:
        demo.block_thread()
    return demo

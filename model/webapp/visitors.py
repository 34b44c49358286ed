"""Every visitor's state in one store, keyed by owner: their training job and its model (one each, at most MAX_MODELS on
the server), that model loaded for generation, the copies of its zips (checkpoints, static web site) that Gradio serves,
and whether their Generate requests use it. A page's owner is a random key that the browser keeps (the Train tab's
gr.BrowserState, linked to each page session on load), so a reload keeps the model; an API client's owner is its session
(gradio_client keeps one per Client), whose end deletes its model. A model is deleted MAX_AGE_S after its training
started, when its owner trains again, or when a newer visitor's model pushes it out; every deletion takes one path
(_let_go).
The tabs only show this state (model/webapp/train_tab.py, generate_tab.py)."""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.processing_utils import save_file_to_cache
from gradio.utils import get_upload_folder

from model.formats.checkpoint import CheckpointError
from model.tokenizer import TokenizerError
from model.webapp.checks import InputError, shown
from model.webapp.pool import OWN_MODEL_COPIES, TRAIN_THREADS, ModelPool, model_card
from model.webapp.training_job import (
    QUANTIZE_PY,
    TEXT_FILE,
    TRAIN_PY,
    Download,
    JobError,
    TrainingJob,
    TrainingSlot,
    make_zip,
    remove_tree,
)

MAX_MODELS = 4  # models kept per server, the oldest deleted first
MAX_AGE_S = 3600.0  # a model is deleted this long after its training started
SWEEP_INTERVAL_S = 60.0  # how often models past their hour are looked for
MODEL_CHOICES = ("bundled", "yours")  # which model serves a visitor's Generate requests
YOURS_GONE = "Your model is not ready, or was deleted (models are kept for an hour): the bundled model answered."
KEPT = (f"Your model is kept for an hour after its training started, across reloads of this page; it is deleted sooner when "
        f"you train again, or when a newer visitor's model pushes it out (the server keeps the {MAX_MODELS} newest).")
OWNER_KEY = re.compile(r"k-[A-Za-z0-9_-]{32}")  # a page's owner key, as new_owner_key makes them

PoolFor = Callable[[gr.Request | None], ModelPool]  # the model that serves one request (Gradio passes the request)
# (choice, request) -> the model card of the chosen model, or an InputError (e.g. "yours" before any was trained)
ChooseModel = Callable[[Any, gr.Request | None], str]

log = logging.getLogger(__name__)


def new_owner_key() -> str:
    """A page's owner key: random, so that only the browser that holds it reaches its model."""
    return "k-" + secrets.token_urlsafe(24)


@dataclass
class _Visitor:
    """One owner's state."""

    job: TrainingJob | None = None  # their latest training (and its model), None once deleted
    started: float = 0.0  # the store's clock when that training started
    pool: ModelPool | None = None  # the job's finished model, loaded for generation on first use
    served: dict[str, Path] = field(default_factory=dict)  # each zip's copy in Gradio's cache (by training_job.Download),
    # the file a /gradio_api/file= link serves
    uses_own: bool = False  # they chose "yours": their Generate requests ask for their own model


@dataclass
class _Gone:
    """What one deletion lets go of."""

    job: TrainingJob | None
    served: list[Path]


class Visitors:
    """The visitors' jobs, models and choices by owner, and the server's one training slot. Thread-safe."""

    def __init__(self, slot: TrainingSlot | None = None, max_models: int = MAX_MODELS, max_age_s: float = MAX_AGE_S,
                 clock: Callable[[], float] = time.monotonic):
        self.slot = slot or TrainingSlot(threads=TRAIN_THREADS)
        self.max_models = max_models
        self.max_age_s = max_age_s
        self.clock = clock
        self._lock = threading.Lock()
        self._visitors: dict[str, _Visitor] = {}  # in the order their jobs started, oldest first
        self._keys: dict[str, str] = {}  # a page session -> the owner key its browser holds
        self._closed = threading.Event()

    @staticmethod
    def available() -> bool:
        """Whether this install can train (a Space folder without train.py and quantize.py cannot)."""
        return TRAIN_PY.is_file() and QUANTIZE_PY.is_file()

    # ---- owners ----------------------------------------------------------------------------------------------------

    def owner(self, request: gr.Request | None) -> str:
        """Whose state a request is about: the owner key its page linked (link), else its session, or a JobError."""
        session = getattr(request, "session_hash", None)
        if not session or not isinstance(session, str):
            raise JobError("This request has no session: use the page, or gradio_client (it keeps one session per Client).")
        with self._lock:
            return self._keys.get(session, session)

    def link(self, request: gr.Request | None, key: Any) -> str:
        """A page has loaded: its session acts for the owner key its browser keeps (a new key when it holds none, or not
        one of ours). Returns the key, for the browser to keep."""
        key = key if isinstance(key, str) and OWNER_KEY.fullmatch(key) else new_owner_key()
        session = getattr(request, "session_hash", None)
        if session and isinstance(session, str):
            with self._lock:
                self._keys[session] = key
        return key

    def expires_in(self, owner: str) -> float | None:
        """The seconds until owner's model goes at the latest (MAX_AGE_S after its training started); None: no model."""
        with self._lock:
            visitor = self._visitors.get(owner)
            if visitor is None or visitor.job is None:
                return None
            return max(0.0, visitor.started + self.max_age_s - self.clock())

    # ---- jobs ------------------------------------------------------------------------------------------------------

    def start(self, owner: str, data: bytes, minutes: Any) -> TrainingJob:
        """Start owner's training (replacing their previous model), or a JobError saying why not."""
        own = self.get(owner)
        if own is not None and own.active:
            raise JobError("Your model is still training: press Stop to end it early, or wait for its report.")
        job = self.slot.start(data, minutes)
        self.add(owner, job)
        return job

    def add(self, owner: str, job: TrainingJob) -> None:
        """Keep job as owner's model, deleting owner's previous one and, beyond max_models, the oldest others'."""
        with self._lock:
            visitor = self._visitors.pop(owner, None) or _Visitor()
            gone = [self._take_model(visitor)]
            visitor.job, visitor.started = job, self.clock()
            self._visitors[owner] = visitor  # now the newest
            with_models = [v for v in self._visitors.values() if v.job is not None]
            gone += [self._take_model(v) for v in with_models[:max(0, len(with_models) - self.max_models)]]
            self._tidy()
        _let_go(gone)

    def get(self, owner: str) -> TrainingJob | None:
        """owner's job, or None (never trained, or deleted since)."""
        with self._lock:
            visitor = self._visitors.get(owner)
            return visitor.job if visitor is not None else None

    def drop(self, owner: str) -> None:
        """owner's session ended: delete their model (killing its training if it still runs) and forget their choice."""
        with self._lock:
            visitor = self._visitors.pop(owner, None)
            gone = [self._take_model(visitor)] if visitor is not None else []
        _let_go(gone)

    def forget(self, request: gr.Request) -> None:
        """A session ended (the page's unload event, or an API client's end). A page's model stays with its owner key,
        for a reload; an API client's session was its owner, so its model goes."""
        session = getattr(request, "session_hash", None)
        if not session:
            return
        with self._lock:
            linked = self._keys.pop(session, None)
        if linked is None:
            self.drop(session)

    def sweep(self) -> int:
        """Delete the models whose training started more than max_age_s ago; returns how many went. The owners' choice
        of model stays, so their next Generate request says that their model is gone."""
        now = self.clock()
        with self._lock:
            gone = [self._take_model(v) for v in self._visitors.values()
                    if v.job is not None and now - v.started > self.max_age_s]
            self._tidy()
        _let_go(gone)
        return len(gone)

    def start_sweeping(self, interval_s: float = SWEEP_INTERVAL_S) -> None:
        """Sweep every interval_s seconds in a background thread, until close()."""
        def loop() -> None:
            while not self._closed.wait(interval_s):
                try:
                    self.sweep()
                except Exception:  # a bug here must not stop the sweeping for good
                    log.exception("sweeping trained models failed")
        threading.Thread(target=loop, name="smallgpt-sweeper", daemon=True).start()

    def clear(self) -> None:
        """Delete every model and forget every visitor."""
        with self._lock:
            gone = [self._take_model(v) for v in self._visitors.values()]
            self._visitors.clear()
        _let_go(gone)

    def close(self) -> None:
        """Server shutdown: stop sweeping and delete every model; idempotent."""
        self._closed.set()
        self.clear()  # kills what still runs; a killed job's folder would go a moment later, in a thread
        remove_tree(self.slot.root)  # at exit that thread may not get the chance: the whole jobs' folder goes now

    def _tidy(self) -> None:
        """Forget owners with nothing left to keep (no model, the bundled model chosen), under the lock: the store
        never grows with sessions that have no model."""
        for owner in [o for o, v in self._visitors.items() if v.job is None and not v.uses_own]:
            del self._visitors[owner]

    @staticmethod
    def _take_model(visitor: _Visitor) -> _Gone:
        """Empty visitor of its model (under the lock); what to delete, outside it."""
        gone = _Gone(visitor.job, list(visitor.served.values()))
        visitor.job, visitor.pool, visitor.served = None, None, {}
        return gone

    # ---- the downloads -------------------------------------------------------------------------------------------

    def served_zip(self, owner: str, what: Download = "model") -> str:
        """The path of owner's zip (what: "model", the checkpoints; "site", the static web site) in Gradio's cache, the
        one copy that Gradio serves (it serves a file already there as it is): deleted with the model. A JobError if
        there is no finished model, or, for the site, none was written (its sentence says why)."""
        job = self.get(owner)
        if job is None:
            raise JobError("You have no trained model in this session: start a training first.")
        if what == "site" and job.site_error is not None:
            raise JobError(job.site_error)
        with self._lock:
            visitor = self._visitors.get(owner)
            copy = visitor.served.get(what) if visitor is not None and visitor.job is job else None
            if copy is not None and copy.is_file():
                return str(copy)
        copy = Path(save_file_to_cache(make_zip(job.run_dir, what), cache_dir=get_upload_folder()))
        with self._lock:
            visitor = self._visitors.get(owner)
            if visitor is not None and visitor.job is job:
                visitor.served[what] = copy
                return str(copy)
        _let_go([_Gone(None, [copy])])  # deleted meanwhile
        raise JobError("This model has been deleted (models are kept for an hour): train it again.")

    # ---- which model serves a Generate request ---------------------------------------------------------------------

    def own_pool(self, owner: str) -> ModelPool | None:
        """owner's finished model, loaded once; None while it trains, or if it failed or was deleted."""
        with self._lock:
            visitor = self._visitors.get(owner)
            job = visitor.job if visitor is not None else None
            if job is None:
                return None
            if visitor.pool is not None:
                return visitor.pool
        model_dir = job.status().model_dir
        if model_dir is None:
            return None
        try:
            pool = ModelPool(model_dir, copies=OWN_MODEL_COPIES)
        except (CheckpointError, TokenizerError, OSError, ValueError):  # deleted meanwhile
            return None
        with self._lock:
            visitor = self._visitors.get(owner)
            if visitor is None or visitor.job is not job:  # deleted meanwhile
                return None
            visitor.pool = visitor.pool or pool
            return visitor.pool

    def text_start(self, request: gr.Request | None, chars: int) -> str | None:
        """The first chars characters of the text the requesting visitor's model trained on (their owner key's, after a
        reload too), or None without a model: the Generate tab offers its start as the prompt when they choose it."""
        try:
            job = self.get(self.owner(request))
        except JobError:
            return None
        if job is None:
            return None
        try:
            with open(job.run_dir / TEXT_FILE, encoding="utf-8") as f:
                return f.read(chars)
        except OSError:  # deleted meanwhile
            return None

    def __len__(self) -> int:
        """How many owners the store keeps state for (a model, or the choice of one)."""
        with self._lock:
            return len(self._visitors)

    def loaded_models(self) -> int:
        """How many visitors' models are loaded for generation."""
        with self._lock:
            return sum(v.pool is not None for v in self._visitors.values())

    def pool_for(self, bundled: ModelPool) -> PoolFor:
        """For the Generate tab: the model of each request, the visitor's own if they chose it and it exists."""
        def pick(request: gr.Request | None) -> ModelPool:
            try:
                owner = self.owner(request)
            except JobError:
                return bundled
            with self._lock:
                visitor = self._visitors.get(owner)
                chose_yours = visitor is not None and visitor.uses_own
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
            try:
                owner = self.owner(request)
            except JobError as e:
                raise InputError(str(e)) from None
            pool = self.own_pool(owner) if model == "yours" else None
            if model == "yours" and pool is None:
                raise InputError(self._why_no_model(owner))
            with self._lock:
                visitor = self._visitors.get(owner)  # "yours" needs a model, so its owner is in the store
                if visitor is not None:
                    visitor.uses_own = model == "yours"
                    self._tidy()
            return model_card(bundled) if pool is None else "**Your model** · " + model_card(pool)
        return use_model

    def _why_no_model(self, owner: str) -> str:
        job = self.get(owner)
        if job is None:
            return "You have no trained model yet: train one in the Train tab first (models are kept for an hour)."
        if job.active:
            return "Your model is still training: choose it once the Train tab shows its report."
        return "Your last training left no model: train again in the Train tab."


def _let_go(gone: list[_Gone]) -> None:
    """The one deletion path: kill and delete each job and its folder, and delete its zips' served copies (each with
    its folder in Gradio's cache, named after the zip's hash), so that no link to them answers any more."""
    for item in gone:
        if item.job is not None:
            item.job.discard()
        for copy in item.served:
            with contextlib.suppress(OSError):
                copy.unlink()
            with contextlib.suppress(OSError):
                copy.parent.rmdir()

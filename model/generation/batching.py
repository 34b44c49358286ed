"""Requests decoded together: a server's requests arrive at different times with different prompts; a Batcher queues
them and runs them on its model's one engine (engine.Engine) in a worker thread, so that one step carries every
running request's rows. One traced step over all rows costs far less than one step per request, because a small
model's step is bound by per-operator overhead and by reading the weights, not by the rows.

Rows decoded together touch each other's numbers where the weights are int8: quantize_dynamic quantizes a step's
activations with one scale over all its rows. A request that must get exactly what it gets alone (a server's seeded
request: the same seed, the same text, whoever else is served) is decoded alone: it starts once its engine is empty,
and no other request joins it until it ends."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator

import torch

from model.generation.engine import BUCKETS, Engine, Request
from model.generation.sampling import SamplingConfig
from model.gpt import GPT

log = logging.getLogger(__name__)

_DONE = None  # the end of a request's token stream


class Batcher:
    """Decodes the rows of every request it is given together, on one model, in a worker thread that runs while there
    is work. At most max_rows rows at once (requests beyond wait); the model must not be used for cached decoding
    elsewhere while the batcher runs (plain forwards, without input_pos, are fine)."""

    def __init__(self, model: GPT, max_rows: int = BUCKETS[-1]):
        self.model = model.eval()
        self.engine = Engine(self.model, max_rows)
        self.engine.traced = True  # a server decodes for long: tracing always pays, and every request runs the same forwards
        self._inbox: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._next: Request | None = None  # taken from the inbox, waiting for room: it starts before any later one
        self._alone: set[Request] = set()  # running requests that no other may join

    @property
    def rows_in_use(self) -> int:
        """Rows of the requests running now (a load figure for picking the least busy batcher)."""
        return self.engine.rows_in_use

    @property
    def requests_running(self) -> int:
        return len(self.engine.running)

    def warm_up(self, max_sequences: int) -> None:
        """Make and run every traced forward a request of up to max_sequences rows may need (engine.warm_up)."""
        with torch.inference_mode():
            self.engine.warm_up(max_sequences)

    def decode(self, prompt_ids: list[int], num_samples: int, sampling: SamplingConfig, n_vocab: int,
               alone: bool = False) -> Iterator[torch.Tensor]:
        """Yield the next token of each of num_samples sequences per step, as generate.decode_tokens does; closing
        the iterator early ends the request. prompt_ids: tokenized and cropped to the context by the caller. alone:
        decoded with no other request's rows, so its tokens are exactly those it gets alone, also with int8 weights."""
        request = self.engine.request(prompt_ids, num_samples, sampling, n_vocab)
        request.out = queue.SimpleQueue()
        if int(sampling.max_new_tokens) == 0:
            return
        if alone:
            self._alone.add(request)
        self._inbox.put(request)
        with self._lock:
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="batcher", daemon=True)
                self._worker.start()
        try:
            while (token := request.out.get()) is not _DONE:
                yield token
            if request.error is not None:
                raise request.error
        finally:
            request.cancelled = True

    # --- the worker ---

    def _work(self) -> None:
        engine = self.engine
        with torch.inference_mode():
            while True:
                with self._lock:
                    if not engine.running and self._next is None and self._inbox.empty():
                        self._worker = None
                        return
                try:
                    self._admit()
                    engine.step()
                    for r in engine.retire():
                        self._alone.discard(r)
                        r.out.put(_DONE)
                except Exception as e:  # no request may wait forever: the running ones end with the error, the worker
                    log.exception("Decoding failed; %d request(s) end with the error.", len(engine.running))  # goes on
                    for r in engine.running:
                        r.error = e
                        r.out.put(_DONE)
                        self._alone.discard(r)
                    engine.running = []

    def _admit(self) -> None:
        """Start the waiting requests that fit, in the order they came: one that must wait for room (rows, or an
        empty engine for a request decoded alone) holds the later ones back, so it is never passed over for good."""
        engine = self.engine
        if not engine.running:
            engine.reserve()  # kept when they exist: the bucket steps stay valid
        while True:
            if self._next is None:
                try:
                    self._next = self._inbox.get_nowait()
                except queue.Empty:
                    return
            request = self._next
            if request.cancelled:
                self._next = None
                self._alone.discard(request)
                continue
            if not self._fits(request):
                return
            self._next = None
            engine.admit(request)

    def _fits(self, request: Request) -> bool:
        """Whether request can start now: its rows fit, and it and the running ones do not need to be alone."""
        engine = self.engine
        if request in self._alone or any(r in self._alone for r in engine.running):
            return not engine.running
        return engine.rows_in_use + request.num_samples <= engine.max_rows

"""Requests decoded together: the rows of every running request share one decode step, each row at its own position.

A server's requests arrive at different times with different prompts, so their rows sit at different positions; one
traced step over all of them (model(idx, input_pos=(rows, 1))) costs far less than one step per request, because a
small model's step is bound by per-operator overhead and by reading the weights, not by the rows. A Batcher owns a
model and a worker thread: decode() queues a request and yields its tokens as decode_tokens does. A new request's
prompt, and a window slide, run on a scratch copy of the model (a prefill's shape is its own), whose cache rows are
then copied into the request's rows. Rows of running requests are kept at the front of the cache, so a step runs
over the first BUCKETS-sized block of rows that holds them all: one trace per bucket.

With int8 weights, activations are quantized per step over all rows at once, so a seeded request's text can differ
slightly from the same request decoded alone.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from model.generation.generate import Sampler, SamplingConfig, prefill, sample_next, sampler_for, slide_keep
from model.generation.trace import CachedForward, cached_forward, warmed_forward
from model.gpt import GPT

log = logging.getLogger(__name__)

BUCKETS = (3, 6, 12, 24, 48)  # rows a step runs over: the smallest bucket that holds every running request's rows
_DONE = None  # the end of a request's token stream


@dataclass(eq=False)
class _Request:
    prompt_ids: list[int]
    num_samples: int
    sample: Sampler  # its settings (sample.sampling), generator and penalty counts
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    history: list[torch.Tensor] = field(default_factory=list)  # its window's tokens, then each new one: (num_samples,) each
    pos: int = 0  # the next free cache position of its rows
    row: int = 0  # its first cache row
    produced: int = 0
    cancelled: bool = False
    error: BaseException | None = None


class Batcher:
    """Decodes the rows of every request it is given together, on one model, in a worker thread that runs while there
    is work. At most max_rows rows at once (requests beyond wait); the model must not be used for cached decoding
    elsewhere while the batcher runs (plain forwards, without input_pos, are fine)."""

    def __init__(self, model: GPT, max_rows: int = BUCKETS[-1]):
        self.model = model.eval()
        self.scratch = copy.deepcopy(model).eval()  # prefills and slides: their own caches, the same weights' values
        self.max_rows = max_rows
        self.block = model.config.block_size
        self.keep = slide_keep(self.block)
        self.buckets = tuple(b for b in BUCKETS if b < max_rows) + (max_rows,)
        self._inbox: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._running: list[_Request] = []
        self._steps: dict[tuple[int, bool], CachedForward] = {}  # (rows, per_row) -> the traced step
        self._positions = torch.arange(self.block)

    @property
    def rows_in_use(self) -> int:
        """Rows of the requests running now (a load figure for picking the least busy batcher)."""
        return sum(r.num_samples for r in self._running)

    @property
    def requests_running(self) -> int:
        return len(self._running)

    def warm_up(self, max_sequences: int) -> None:
        """Make and run every traced step a request of up to max_sequences rows may need: each bucket's step, the step
        of a request alone, and the scratch copy's window slide of each size, so no visitor waits for a trace."""
        with torch.inference_mode():
            self.model.setup_caches(self.max_rows)
            self.scratch.setup_caches(max_sequences)
            for b in self.buckets:
                self._steps[b, True] = warmed_forward(self.model, b, 1, per_row=True)
            for n in range(1, max_sequences + 1):
                self._steps[n, False] = warmed_forward(self.model, n, 1)
                warmed_forward(self.scratch, n, self.keep)

    def decode(self, prompt_ids: list[int], num_samples: int, sampling: SamplingConfig, n_vocab: int) -> Iterator[torch.Tensor]:
        """Yield the next token of each of num_samples sequences per step, as generate.decode_tokens does; closing
        the iterator early ends the request."""
        if not prompt_ids:
            raise ValueError("The prompt has no tokens; give some text to continue.")
        if not 1 <= num_samples <= self.max_rows:
            raise ValueError(f"num_samples must be between 1 and {self.max_rows}, got {num_samples}.")
        sample = sampler_for(sampling, num_samples, min(n_vocab, self.model.config.vocab_size), prompt_ids)
        request = _Request(list(prompt_ids), num_samples, sample)
        if int(sampling.max_new_tokens) == 0:
            return
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
        with torch.inference_mode():
            while True:
                with self._lock:
                    if not self._running and self._inbox.empty():
                        self._worker = None
                        return
                try:
                    self._admit()
                    if self._running:
                        self._step()
                    self._retire()
                except Exception as e:  # no request may wait forever: the running ones end with the error, the worker
                    log.exception("Decoding failed; %d request(s) end with the error.", len(self._running))  # goes on
                    for r in self._running:
                        r.error = e
                        r.out.put(_DONE)
                    self._running = []

    def _admit(self) -> None:
        """Start the waiting requests that fit: prefill each on the scratch copy, copy its caches into its rows."""
        if not self._running:
            self.model.setup_caches(self.max_rows)  # kept when they exist: the bucket steps stay valid
        while self.rows_in_use < self.max_rows:
            try:
                request = self._inbox.get_nowait()
            except queue.Empty:
                return
            if request.cancelled:
                continue
            if self.rows_in_use + request.num_samples > self.max_rows:  # waits for rows to free up
                self._inbox.put(request)
                return
            request.row = self.rows_in_use
            self._running.append(request)
            window = request.prompt_ids[-self.block:]
            self.scratch.setup_caches(request.num_samples)
            first = request.sample(prefill(self.scratch, torch.tensor([window])).expand(request.num_samples, -1))
            self._copy_rows(request, len(window))
            request.pos = len(window)
            request.history = [torch.full((request.num_samples,), t) for t in window]
            self._emit(request, first)

    def _step(self) -> None:
        """One token for every running request: slides on the scratch copy for rows whose window is full, then one
        traced step over the bucket of rows that holds the rest."""
        stepping = []
        for r in self._running:
            if r.produced >= r.sample.sampling.max_new_tokens or r.cancelled:
                continue
            if r.pos < self.block:
                stepping.append(r)
                continue
            window = torch.stack(r.history[-self.keep:], dim=1)  # (num_samples, keep): the last keep tokens
            self.scratch.setup_caches(r.num_samples)
            logits = cached_forward(self.scratch, r.num_samples, self.keep)(window, torch.arange(self.keep))
            self._copy_rows(r, self.keep)
            r.pos = self.keep
            self._emit(r, r.sample(logits))
        if not stepping:
            return
        if len(self._running) == 1:  # alone: its rows share their positions, and the shared-position step is faster
            r = stepping[0]
            logits = self._step_for(r.num_samples, False)(r.history[-1].view(-1, 1), self._positions[r.pos:r.pos + 1])
            r.pos += 1
            self._emit(r, r.sample(logits))
            return
        rows = next(b for b in self.buckets if b >= self.rows_in_use)
        idx = torch.zeros(rows, 1, dtype=torch.long)
        pos = torch.zeros(rows, 1, dtype=torch.long)
        for r in self._running:  # a row that does not step this time still runs: at its next free position, which its
            idx[r.row:r.row + r.num_samples, 0] = r.history[-1]  # own next step overwrites before attending to it
            pos[r.row:r.row + r.num_samples, 0] = min(r.pos, self.block - 1)
        logits = self._step_for(rows, True)(idx, pos)
        # Requests with the same settings and no penalties are sampled together, each row from its request's generator:
        # one set of operators instead of one per request, the same tokens.
        alike: dict[tuple, list[_Request]] = {}
        for r in stepping:
            r.pos += 1
            if r.sample.counts is None:
                settings = r.sample.sampling
                alike.setdefault((settings.temperature, settings.top_k, settings.top_p, r.sample.n_vocab), []).append(r)
            else:
                self._emit(r, r.sample(logits[r.row:r.row + r.num_samples]))
        for group in alike.values():
            rows_of = torch.cat([torch.arange(r.row, r.row + r.num_samples) for r in group])
            first = group[0].sample
            tokens = sample_next(logits.index_select(0, rows_of)[:, :first.n_vocab], first.sampling,
                                 [(r.num_samples, r.sample.generator) for r in group])
            for r, t in zip(group, tokens.split([r.num_samples for r in group]), strict=True):
                self._emit(r, t)

    def _step_for(self, rows: int, per_row: bool) -> CachedForward:
        """The traced one-token step over the first `rows` cache rows, looked up once."""
        if (rows, per_row) not in self._steps:
            self._steps[rows, per_row] = cached_forward(self.model, rows, 1, per_row)
        return self._steps[rows, per_row]

    def _emit(self, request: _Request, tokens: torch.Tensor) -> None:
        request.history.append(tokens)
        request.produced += 1
        request.out.put(tokens)

    def _retire(self) -> None:
        """End the finished and cancelled requests and move the others' rows to the front of the cache."""
        running = []
        for r in self._running:
            if r.produced >= r.sample.sampling.max_new_tokens or r.cancelled:
                r.out.put(_DONE)
            else:
                running.append(r)
        if len(running) == len(self._running):
            return
        row = 0
        for r in running:
            if r.row != row:
                for block in self.model.transformer.h:
                    c = block.attn.kv_cache
                    c.k[row:row + r.num_samples] = c.k[r.row:r.row + r.num_samples].clone()
                    c.v[row:row + r.num_samples] = c.v[r.row:r.row + r.num_samples].clone()
                r.row = row
            row += r.num_samples
        self._running = running

    def _copy_rows(self, request: _Request, length: int) -> None:
        """The scratch copy's cache positions 0..length-1 of its first num_samples rows into the request's rows."""
        rows = slice(request.row, request.row + request.num_samples)
        for mine, theirs in zip(self.model.transformer.h, self.scratch.transformer.h, strict=True):
            mine.attn.kv_cache.k[rows, :, :length] = theirs.attn.kv_cache.k[:request.num_samples, :, :length]
            mine.attn.kv_cache.v[rows, :, :length] = theirs.attn.kv_cache.v[:request.num_samples, :, :length]


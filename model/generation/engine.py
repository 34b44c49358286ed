"""The decoding engine: the rows of every running request over one model's KV cache, advanced one token at a time.

One engine serves every caller. A lone request (the CLI, the trainer's samples, the quantize report, the benchmarks:
generate.decode_tokens) is the one-request case, stepped in the caller's thread; a server's requests (batching.Batcher)
are many, stepped together in a worker thread. There is one of each operation:
  prefill  a request's prompt (one row, shared by its sequences) runs from position 0, its keys and values filled into
           the request's cache rows (eager: prompts vary in length);
  step     one token for every running request: alone, its rows at shared positions (SDPA); together, every row at its
           own position over the smallest bucket of rows that holds them (matrix-product attention);
  slide    a request whose window is full re-runs its last `keep` tokens from position 0 into its rows;
  sample   each request's rows from its own generator; requests with the same settings and no penalty together.
Rows of running requests are kept at the front of the cache, so a step runs over the first BUCKETS-sized block of rows:
one trace per bucket. trace.forward_for alone decides when a forward runs traced.

With int8 weights, activations are quantized per step over all its rows, so a request's text can differ slightly
from the same request decoded alone; a request that must not differ is decoded alone (batching.Batcher's alone).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from model.generation.cache import reserve, row_caches
from model.generation.sampling import Sampler, SamplingConfig, sample_next
from model.generation.trace import CachedForward, Kind, count_tokens, forward_for, warmed_forward
from model.gpt import GPT

BUCKETS = (3, 6, 12, 24, 48)  # rows a step runs over: the smallest bucket that holds every running request's rows


def slide_keep(block_size: int) -> int:
    """How many tokens a full window keeps when it slides, by default: half the context."""
    return max(block_size // 2, 1)


def _device(model: torch.nn.Module) -> torch.device:
    return next(iter(model.parameters())).device


@functools.cache
def _one_position(block: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Position p as a (1,) tensor for every p < block: a step's input_pos without a slice per step."""
    return tuple(torch.arange(block, device=device).split(1))


@dataclass(eq=False)
class Request:
    """One request's rows: its prompt (token ids, non-empty, within the context), settings and state."""

    prompt_ids: list[int]
    num_samples: int
    sample: Sampler  # its settings (sample.sampling), generator and penalty counts
    keep: int  # tokens a full window keeps when it slides
    traced: bool | None = None  # force the traced (True) or eager (False) forward; None: trace.forward_for's policy
    out: Any = None  # where each step's tokens go (a server's queue, with .put), if anywhere
    history: list[torch.Tensor] = field(default_factory=list)  # its window's tokens, then each new one: (num_samples,)
    last: torch.Tensor | None = None  # the latest tokens (num_samples,)
    pos: int = 0  # the next free cache position of its rows
    row: int = 0  # its first cache row
    produced: int = 0
    cancelled: bool = False
    error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.cancelled or self.produced >= self.sample.sampling.max_new_tokens


class Engine:
    """Decodes the rows of the requests admitted to it on one model, up to max_rows rows at once. Not thread-safe: one
    thread drives it (the caller's for a lone request, a Batcher's worker for a server)."""

    def __init__(self, model: torch.nn.Module, max_rows: int):
        self.model, self.max_rows = model, max_rows
        self.block = model.config.block_size
        self.device = _device(model)
        self.buckets = tuple(b for b in BUCKETS if b < max_rows) + (max_rows,)
        self.bucket_of = [next(b for b in self.buckets if b >= n) for n in range(max_rows + 1)]
        self.running: list[Request] = []
        self.traced: bool | None = None  # the default of its requests and its together-steps (see Request.traced)
        self._positions = _one_position(self.block, self.device)
        self._idx = torch.zeros(max_rows, dtype=torch.long, device=self.device)  # every row's latest token
        self._pos = torch.zeros(max_rows, 1, dtype=torch.long, device=self.device)  # every row's next position
        self._views = {b: (self._idx[:b].view(b, 1), self._pos[:b]) for b in self.buckets}
        self._idx_of = [self._idx[:n] for n in range(max_rows + 1)]  # the first n rows' tokens, made once
        self._pos_stale = True  # _pos no longer says every row's position (rows moved, a request came or ran alone)
        self._forwards: dict[tuple, CachedForward] = {}  # looked up since the last admission
        self._groups_for: tuple[Request, ...] = ()
        self._groups: list[tuple] = []

    @property
    def rows_in_use(self) -> int:
        return sum(r.num_samples for r in self.running)

    def request(self, prompt_ids: list[int], num_samples: int, sampling: SamplingConfig, n_vocab: int,
                keep: int | None = None, traced: bool | None = None) -> Request:
        """A request for this engine: the one check of a tokenized prompt and its rows (the front ends tokenize and crop
        the text; this refuses what cannot run)."""
        if not prompt_ids:
            raise ValueError("The prompt has no tokens; give some text to continue.")
        if len(prompt_ids) > self.block:
            raise ValueError(f"The prompt has {len(prompt_ids)} tokens, more than the context ({self.block}); keep its last {self.block}.")
        if not 1 <= num_samples <= self.max_rows:
            raise ValueError(f"num_samples must be between 1 and {self.max_rows}, got {num_samples}.")
        keep = keep or slide_keep(self.block)
        if not 1 <= keep <= self.block:
            raise ValueError(f"keep must be between 1 and the context ({self.block}), got {keep}.")
        sample = Sampler(sampling, num_samples, min(n_vocab, self.model.config.vocab_size), prompt_ids, self.device)
        return Request(list(prompt_ids), num_samples, sample, keep, self.traced if traced is None else traced)

    def reserve(self) -> None:
        """Caches for max_rows rows (those the model has for more are kept, and with them its traces)."""
        reserve(self.model, self.max_rows)

    def warm_up(self, max_sequences: int) -> None:
        """Make and run every traced forward a request of up to max_sequences rows may need: each bucket's step, the
        step and the slide of a request alone, so no request waits for a trace."""
        if not isinstance(self.model, GPT):
            return
        self.reserve()
        keep = slide_keep(self.block)
        if self.max_rows > max_sequences:
            for b in self.buckets:
                warmed_forward(self.model, b, 1, "per_row")
        for n in range(1, max_sequences + 1):
            warmed_forward(self.model, n, 1, "shared")
            warmed_forward(self.model, n, keep, "fill")

    def _forward(self, rows: int, tokens: int, kind: Kind, traced: bool | None) -> CachedForward:
        key = (rows, tokens, kind, traced)
        forward = self._forwards.get(key)
        if forward is None:
            forward = self._forwards[key] = forward_for(self.model, rows, tokens, kind, traced)
        return forward

    def admit(self, request: Request) -> None:
        """Start a request in the next free rows: its prompt prefilled (always eager), its first tokens picked."""
        n, ids = request.num_samples, request.prompt_ids
        if self.rows_in_use + n > self.max_rows:
            raise RuntimeError(f"No room for {n} rows: {self.rows_in_use} of {self.max_rows} are in use.")
        count_tokens(self.model, int(request.sample.sampling.max_new_tokens))
        self._forwards.clear()  # the policy may now trace, or the model's tensors changed: look each forward up again
        request.row = self.rows_in_use
        self.running.append(request)
        self._pos_stale = True
        prompt = torch.tensor([ids], dtype=torch.long, device=self.device)
        rows = torch.arange(request.row, request.row + n, device=self.device)
        logits = forward_for(self.model, 1, len(ids), "fill", traced=False)(prompt, rows)
        request.pos = len(ids)
        request.history = list(prompt.expand(n, -1).unbind(1))
        self._emit(request, request.sample(logits.expand(n, -1)))

    def step(self) -> None:
        """One token for every running request that is not done: slides for the full windows, one step for the rest."""
        stepping, sliding = [], []
        for r in self.running:
            if not r.done:
                (stepping if r.pos < self.block else sliding).append(r)
        if len(self.running) == 1 and stepping:  # alone: its rows share their positions, and that step is faster
            r = stepping[0]
            logits = self._forward(r.num_samples, 1, "shared", r.traced)(r.last.view(-1, 1), self._positions[r.pos])
            r.pos += 1
            self._pos_stale = True
            self._emit(r, r.sample(logits))
        elif stepping:
            self._step_together(stepping)
        for r in sliding:
            self._slide(r)

    def _step_together(self, stepping: list[Request]) -> None:
        """One traced step over the bucket of rows that holds every running request's, each row at its own position; a
        row that does not step this time (done, or sliding next) runs too, at a position its own next write replaces."""
        used = self.rows_in_use
        rows = self.bucket_of[used]
        idx, pos = self._views[rows]
        torch.cat([r.last for r in self.running], out=self._idx_of[used])
        if self._pos_stale:
            for r in self.running:
                self._pos[r.row:r.row + r.num_samples] = min(r.pos, self.block - 1)
            self._pos_stale = False
        logits = self._forward(rows, 1, "per_row", self.traced)(idx, pos)
        pos.add_(1).clamp_(max=self.block - 1)
        for r in stepping:
            r.pos += 1
        key = tuple(stepping)
        if key != self._groups_for:
            self._groups_for, self._groups = key, _sampling_groups(stepping)
        for rows_of, sampling, n_vocab, generators, group in self._groups:
            if sampling is None:  # a request with penalties: its own sampler, its counts
                r = group[0]
                self._emit(r, r.sample(logits[rows_of]))
                continue
            chosen = logits[rows_of] if isinstance(rows_of, slice) else logits.index_select(0, rows_of)
            tokens = sample_next(chosen[:, :n_vocab], sampling, generators)
            if len(group) == 1:
                self._emit(group[0], tokens)
            else:
                for r, t in zip(group, tokens.split([r.num_samples for r in group]), strict=True):
                    self._emit(r, t)

    def _slide(self, r: Request) -> None:
        """The request's last keep tokens re-run from position 0 into its rows: its window goes on past the context."""
        window = torch.stack(r.history[-r.keep:], dim=1)  # (num_samples, keep)
        del r.history[:-r.keep]
        rows = torch.arange(r.row, r.row + r.num_samples, device=self.device)
        logits = self._forward(r.num_samples, r.keep, "fill", r.traced)(window, rows)
        r.pos = r.keep
        self._pos_stale = True
        self._emit(r, r.sample(logits))

    def _emit(self, r: Request, tokens: torch.Tensor) -> None:
        r.last = tokens
        r.history.append(tokens)
        r.produced += 1
        if r.out is not None:
            r.out.put(tokens)

    def retire(self) -> list[Request]:
        """Take the done requests out and move the others' rows to the front of the cache; return the done ones."""
        if not any(r.done for r in self.running):
            return []
        done, running, row = [], [], 0
        for r in self.running:
            if r.done:
                done.append(r)
                continue
            if r.row != row:
                for cache in row_caches(self.model):
                    cache.move_rows(r.row, row, r.num_samples)
                r.row = row
            row += r.num_samples
            running.append(r)
        self.running = running
        self._pos_stale = True
        self._groups_for = ()  # rows moved: the sampling groups are made again
        return done


def _sampling_groups(stepping: list[Request]) -> list[tuple]:
    """How a step's requests are sampled: those with the same settings and no penalties together (one set of operators,
    each row from its request's generator, the same tokens), each with penalties alone. Made when the set changes."""
    alike: dict[tuple, list[Request]] = {}
    groups = []
    for r in stepping:
        s = r.sample.sampling
        if r.sample.counts is None:
            alike.setdefault((s.temperature, s.top_k, s.top_p, r.sample.n_vocab), []).append(r)
        else:
            groups.append((slice(r.row, r.row + r.num_samples), None, None, None, [r]))
    for group in alike.values():
        rows = [i for r in group for i in range(r.row, r.row + r.num_samples)]
        rows_of = slice(rows[0], rows[-1] + 1) if rows == list(range(rows[0], rows[-1] + 1)) else torch.tensor(rows)
        first = group[0].sample
        generators = first.generator if len(group) == 1 else [(r.num_samples, r.sample.generator) for r in group]
        groups.append((rows_of, first.sampling, first.n_vocab, generators, group))
    return groups

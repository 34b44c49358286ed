"""Fast CPU generation: one prompt prefill, batched KV-cached decoding, sampling, stop rules, UTF-8 safe streaming.

Shaped as gpt-fast's generate.py: prefill, decode_one_token and decode_n_tokens, with the speed applied to one
function, the step decode_one_token runs. The engine only calls model.setup_caches() and model(idx, input_pos=...,
last_only=True), so it serves fp32 and int8 models alike; for a GPT the step (and the window slide) can replay
TorchScript traces (model.trace), and fast_step alone decides when: when it pays. Callers just call stream(),
generate() or decode_tokens(); a server may warm_up() the shapes it serves before its first request.
One model generates one request at a time: its caches and traces are kept for its next request.
"""

from __future__ import annotations

import codecs
import dataclasses
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from model.generation.trace import CachedForward, eager_forward, has_trace, last_logits, traced_step, warmed_forward
from model.gpt import GPT
from model.tokenizer import Tokenizer

# A fresh trace costs about 0.4 s before it runs at full speed (tracing, then TorchScript's first optimizing calls);
# on the cpu preset that is won back after about 500 tokens, so the engine traces once a model has decoded that many.
TRACE_MIN_TOKENS = 512
# torch threads for generating on a CPU (generate.py; the app gives each copy cpus // copies): a small model's decode
# step is many tiny operators, which a second OpenMP thread slows down. Default model, 2 vCPUs (docs/generate.md):
# 1 thread 3,197 tok/s quiet and 1,220 beside two busy processes; 2 threads 1,022 and 576.
GENERATION_THREADS = 1
# Below this temperature logits / temperature can overflow to inf (NaN probabilities); the limit is greedy anyway.
GREEDY_BELOW = 1e-5


@dataclass
class SamplingConfig:
    """How to pick each next token, and when to stop."""

    max_new_tokens: int = 200
    temperature: float = 1.0  # 0 means greedy; so does anything below GREEDY_BELOW
    top_k: int | None = 50  # None or 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off (CTRL-style on logits of tokens already present)
    frequency_penalty: float = 0.0  # subtracted once per earlier occurrence of a token
    stop: tuple[str, ...] = ()  # user stop strings; generation also always stops at <|endoftext|>
    seed: int | None = None  # same seed, checkpoint, prompt and settings: same text

    def validate(self) -> None:
        """Raise ValueError, in one sentence a user can act on, for a setting that cannot work."""
        if int(self.max_new_tokens) < 0:
            raise ValueError(f"max_new_tokens must be 0 or more, got {self.max_new_tokens}.")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be 0 (greedy) or positive, got {self.temperature}.")
        if self.top_k is not None and int(self.top_k) < 0:
            raise ValueError(f"top_k must be 0 (off) or a positive integer, got {self.top_k}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 is off), got {self.top_p}.")
        if not 0 < self.repetition_penalty < math.inf:
            raise ValueError(f"repetition_penalty must be a positive number (1 is off), got {self.repetition_penalty}.")
        if not math.isfinite(self.frequency_penalty):
            raise ValueError(f"frequency_penalty must be a finite number (0 is off), got {self.frequency_penalty}.")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty; leave an empty one out.")


DEFAULT_SAMPLING = SamplingConfig()  # the defaults above; never modified


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "off") else int(text)


def _stops(text: str) -> tuple[str, ...]:
    """One stop string with backslash escapes (\\n, \\t) decoded; "none" or "off" clears them."""
    return () if text.lower() in ("none", "off") else (text.replace("\\n", "\n").replace("\\t", "\t"),)


# How each SamplingConfig field is parsed from text (an interactive /set NAME VALUE).
SETTINGS = {"max_new_tokens": int, "temperature": float, "top_k": _optional_int, "top_p": float,
            "repetition_penalty": float, "frequency_penalty": float, "stop": _stops, "seed": _optional_int}


def with_setting(sampling: SamplingConfig, name: str, text: str) -> SamplingConfig:
    """A copy of sampling with one field parsed from text; ValueError (one sentence) for a bad name or value."""
    if name not in SETTINGS:
        raise ValueError(f"Unknown setting {name!r}; choose one of: {', '.join(SETTINGS)}.")
    try:
        value = SETTINGS[name](text)
    except ValueError:
        raise ValueError(f"{text!r} is not a valid value for {name}.") from None
    new = dataclasses.replace(sampling, **{name: value})
    new.validate()
    return new


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Discourage tokens already present (counts: (B, V) occurrences so far): CTRL repetition, then frequency."""
    if sampling.repetition_penalty != 1.0:
        p = sampling.repetition_penalty
        logits = torch.where(counts > 0, torch.where(logits > 0, logits / p, logits * p), logits)
    if sampling.frequency_penalty != 0.0:
        logits = logits - sampling.frequency_penalty * counts
    return logits


def nucleus(sorted_logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest prefix of descending-sorted logits whose probability reaches top_p; -inf the rest."""
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # probability of the tokens ranked above each one
    return sorted_logits.masked_fill(before >= top_p, float("-inf"))


def sample_next(logits: torch.Tensor, sampling: SamplingConfig, generator: Generators,
                counts: torch.Tensor | None = None) -> torch.Tensor:
    """One next token per row of logits (B, V), with batched ops: penalties, temperature, top-k, top-p."""
    logits = logits.float()
    if counts is not None:
        logits = apply_penalties(logits, counts, sampling)
    if sampling.temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    if sampling.temperature != 1.0:
        logits = logits / sampling.temperature
    k = int(sampling.top_k or 0)
    if 0 < k < logits.shape[-1]:
        cand, ids = torch.topk(logits, k, dim=-1)  # sorted, so top-p can work on the k candidates only
    elif sampling.top_p < 1.0:
        cand, ids = torch.sort(logits, dim=-1, descending=True)
    else:
        return draw(torch.softmax(logits, dim=-1), generator)
    if sampling.top_p < 1.0:
        cand = nucleus(cand, sampling.top_p)
    return ids.gather(1, draw(torch.softmax(cand, dim=-1), generator).unsqueeze(1)).squeeze(1)


# A generator for every row, or (rows, generator) pairs that cover the rows in order: requests decoded together, each
# drawing from its own generator exactly what it would draw alone.
Generators = torch.Generator | Sequence[tuple[int, torch.Generator]]


def draw(probs: torch.Tensor, generator: Generators) -> torch.Tensor:
    """One index per row of probs (B, N), index i with probability probs[:, i]: the exponential race
    argmax(p_i / E_i), E_i ~ Exp(1). torch.multinomial draws one sample the same way (the same numbers from the same
    generator); this skips its input checks, which cost more than the draw on a decode step."""
    if isinstance(generator, torch.Generator):
        noise = torch.empty_like(probs).exponential_(1, generator=generator)
    else:
        noise = torch.cat([probs.new_empty(n, probs.shape[1]).exponential_(1, generator=g) for n, g in generator])
    return (probs / noise).argmax(dim=-1)


def slide_keep(block_size: int) -> int:
    """How many tokens a full window keeps when it slides, by default: half the context."""
    return max(block_size // 2, 1)


def _device(model: torch.nn.Module) -> torch.device:
    return next(iter(model.parameters())).device


@dataclass
class Sampler:
    """Picks every row's next token from last-position logits (B, V): the settings, the seeded generator and, when a
    penalty is on, the counts (B, n_vocab) of the tokens so far, which each pick adds to."""

    sampling: SamplingConfig
    n_vocab: int
    generator: torch.Generator
    counts: torch.Tensor | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        nxt = sample_next(logits[:, :self.n_vocab], self.sampling, self.generator, self.counts)
        if self.counts is not None:
            self.counts.scatter_add_(1, nxt.view(-1, 1), torch.ones(nxt.shape[0], 1, device=nxt.device))
        return nxt


def sampler_for(sampling: SamplingConfig, num_samples: int, n_vocab: int, prompt_ids: list[int],
                device: torch.device | str = "cpu") -> Sampler:
    """The Sampler of one request: a generator seeded by sampling.seed (else at random) and, when a penalty is on,
    every row's counts of the prompt's tokens."""
    generator = torch.Generator(device=device)
    if sampling.seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(sampling.seed))
    counts = None
    if sampling.repetition_penalty != 1.0 or sampling.frequency_penalty != 0.0:
        counts = torch.zeros(num_samples, n_vocab, device=device)
        ids = torch.tensor(prompt_ids, dtype=torch.long, device=device).clamp(max=n_vocab - 1).expand(num_samples, -1)
        counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
    return Sampler(sampling, n_vocab, generator, counts)


# How many decode steps each model has asked the engine for: a model that has decoded TRACE_MIN_TOKENS tokens serves
# a session or a server, where tracing pays.
_DECODED: weakref.WeakKeyDictionary[torch.nn.Module, int] = weakref.WeakKeyDictionary()


def fast_step(model: torch.nn.Module, num_samples: int, steps: int) -> CachedForward:
    """The engine's one choice of the step for a request of num_samples rows and `steps` tokens: traced when it pays
    (the trace exists already, or the model's steps so far, this request's included, reach TRACE_MIN_TOKENS: a
    one-off short request stays eager, a session or a server soon traces), else eager. Only a GPT is traced.
    Call after model.setup_caches()."""
    if not isinstance(model, GPT) or steps < 2:
        return eager_forward(model)
    _DECODED[model] = _DECODED.get(model, 0) + steps
    if has_trace(model, num_samples, 1) or _DECODED[model] >= TRACE_MIN_TOKENS:
        return traced_step(model)
    return eager_forward(model)


def warm_up(model: torch.nn.Module, num_samples: int, n_tokens: int = 1) -> None:
    """Make the traced step for num_samples rows of n_tokens (1: a decode step; slide_keep(context): a slide) and run
    it twice (TorchScript optimizes over its first calls): a server before its first request, a timing before its
    clock starts. Requests of that shape then run traced. Caches the model already has for more rows are kept."""
    if not isinstance(model, GPT):
        return
    model.setup_caches(num_samples)
    with torch.inference_mode():
        warmed_forward(model, num_samples, n_tokens)


def prefill(model: torch.nn.Module, window: torch.Tensor) -> torch.Tensor:
    """Last-position logits (1, V) of the prompt window (1, T), whose keys and values it writes at cache positions
    0..T-1 of every row: a prompt all sequences share runs once. Always eager: prompts vary in length."""
    return last_logits(model, window, torch.arange(window.shape[1], device=window.device))


def decode_one_token(step: CachedForward, idx: torch.Tensor, input_pos: torch.Tensor, sample: Sampler) -> torch.Tensor:
    """The next token of every row: step (eager or traced, the only difference) runs idx (B, T) at input_pos over
    the KV cache, T = 1 for a step or the kept tokens of a slide; then sample picks from the logits."""
    return sample(step(idx, input_pos))


def decode_n_tokens(step: CachedForward, first: torch.Tensor, history: torch.Tensor, done: int, pos: int, block: int,
                    keep: int, sample: Sampler) -> Iterator[torch.Tensor]:
    """Yield first, then each next token of every row (decode_one_token), until history (B, done + n) is full.

    history holds every row's tokens: the first `done` given, the rest written here. pos is the next free position
    of the cache of `block` positions; when it is full, the last `keep` tokens are re-run at positions 0.. (a slide:
    long outputs go on instead of failing).
    """
    positions = torch.arange(block, device=history.device)
    nxt = first
    for end in range(done + 1, history.shape[1] + 1):
        yield nxt
        if end == history.shape[1]:
            return
        history[:, end - 1] = nxt
        if pos < block:
            nxt = decode_one_token(step, nxt.view(-1, 1), positions[pos:pos + 1], sample)
            pos += 1
        else:  # contiguous: a trace replays its optimized graph only for inputs laid out as when it was made
            nxt = decode_one_token(step, history[:, end - keep:end].contiguous(), positions[:keep], sample)
            pos = keep


@torch.inference_mode()
def decode_tokens(model: torch.nn.Module, prompt_ids: list[int], num_samples: int, sampling: SamplingConfig,
                  n_vocab: int, keep: int | None = None, step: CachedForward | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of each of num_samples sequences (a (num_samples,) tensor) per step: the prompt prefilled
    once (batch 1, shared by all rows), then decode_n_tokens over the KV cache, sliding by `keep` tokens (default half
    the context) when it is full. step: the cached forward of the steps, for tests and benchmarks that compare eager
    (trace.eager_forward) with traced (trace.traced_step); by default fast_step picks.
    """
    if not prompt_ids:
        raise ValueError("The prompt has no tokens; give some text to continue.")
    block = model.config.block_size
    keep = keep or slide_keep(block)
    if not 1 <= keep <= block:
        raise ValueError(f"keep must be between 1 and the context ({block}), got {keep}.")
    steps = int(sampling.max_new_tokens)
    device = _device(model)
    L = len(prompt_ids)
    history = torch.empty(num_samples, L + steps, dtype=torch.long, device=device)  # every row's tokens
    history[:, :L] = torch.tensor(prompt_ids, dtype=torch.long, device=device)
    sample = sampler_for(sampling, num_samples, min(n_vocab, model.config.vocab_size), prompt_ids, device)
    was_training = model.training
    model.eval()
    try:
        model.setup_caches(num_samples, block)
        step = step or fast_step(model, num_samples, steps)
        if steps == 0:
            return
        window = history[:1, max(0, L - block):L]
        first = sample(prefill(model, window).expand(num_samples, -1))
        yield from decode_n_tokens(step, first, history, L, window.shape[1], block, keep, sample)
    finally:
        model.train(was_training)


@torch.inference_mode()
def naive_tokens(model: torch.nn.Module, prompt_ids: list[int], sampling: SamplingConfig, n_vocab: int,
                 generator: torch.Generator, last_only: bool = False) -> list[int]:
    """The reference loop (how the original Space generated): one sequence, the whole window (cropped to the
    context) recomputed by the plain forward every step, no cache; last_only skips the logits of earlier positions
    (nanoGPT's one trick). Slow by design: the benchmark's baseline and the tests' ground truth. No penalties."""
    block = model.config.block_size
    n_vocab = min(n_vocab, model.config.vocab_size)
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=_device(model))
    for _ in range(int(sampling.max_new_tokens)):
        logits = model(idx[:, -block:], last_only=last_only)[0][:, -1, :n_vocab]
        idx = torch.cat([idx, sample_next(logits, sampling, generator).view(1, 1)], dim=1)
    return idx[0, len(prompt_ids):].tolist()


# (prompt_ids, num_samples, sampling) -> each step's tokens, as decode_tokens yields them
Decode = Callable[[list[int], int, SamplingConfig], Iterator[torch.Tensor]]


class _TextRow:
    """One sequence's text: bytes become text only once a UTF-8 character is complete; stop strings are cut.

    Text that could be the beginning of a stop string is held back until it is known not to be one.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # keeps an incomplete tail pending
        self.pending = ""
        self.done = False

    def push(self, token: int) -> str:
        """Add a token; return the text that is now safe to show."""
        if self.done:
            return ""
        if token == self.tokenizer.eot_token:
            self.done = True
            return self.flush()
        self.pending += self.utf8.decode(self.tokenizer.decode_bytes([token]))
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.done = True
            out, self.pending = self.pending[:min(hits)], ""
            return out
        hold = max((n for s in self.stop for n in range(1, len(s)) if self.pending.endswith(s[:n])), default=0)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        """The held-back text at the end (an incomplete trailing UTF-8 character is dropped, never shown as garbage)."""
        out, self.pending = self.pending, ""
        return out


def prompt_tokens(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Token ids of the prompt; an empty prompt starts from <|endoftext|>, as a document boundary."""
    ids = tokenizer.encode(prompt)
    if not ids:
        if tokenizer.eot_token is None:
            raise ValueError("The prompt is empty and this tokenizer has no <|endoftext|> to start from; give some text.")
        ids = [tokenizer.eot_token]
    return ids


def stream(model: torch.nn.Module, tokenizer: Tokenizer, prompt: str, num_samples: int = 1,
           sampling: SamplingConfig = DEFAULT_SAMPLING, decode: Decode | None = None) -> Iterator[list[str]]:
    """Yields, after each decode step, a list of num_samples strings: the NEW text of each sequence since the previous
    yield ('' if none). Stops early once every sequence hit <|endoftext|> or a stop string. decode(prompt_ids,
    num_samples, sampling) gives the tokens (a server's batcher); by default decode_tokens on model."""
    sampling.validate()
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}.")
    rows = [_TextRow(tokenizer, tuple(sampling.stop)) for _ in range(num_samples)]
    ids = prompt_tokens(tokenizer, prompt)
    steps = decode(ids, num_samples, sampling) if decode else decode_tokens(model, ids, num_samples, sampling, tokenizer.n_vocab)
    try:
        for step, nxt in enumerate(steps):
            last = step == sampling.max_new_tokens - 1
            new = []
            for row, tok in zip(rows, nxt.tolist(), strict=True):
                text = row.push(tok)
                if last and not row.done:
                    text += row.flush()
                new.append(text)
            yield new
            if all(row.done for row in rows):
                break
    finally:
        steps.close()  # ends the engine's generator at once (it restores train mode), also when the consumer stops early


def generate(model: torch.nn.Module, tokenizer: Tokenizer, prompt: str, num_samples: int = 1,
             sampling: SamplingConfig = DEFAULT_SAMPLING) -> list[str]:
    """The full continuations (without the prompt), one per sample."""
    out = [""] * num_samples
    for new in stream(model, tokenizer, prompt, num_samples, sampling):
        out = [a + b for a, b in zip(out, new, strict=True)]
    return out

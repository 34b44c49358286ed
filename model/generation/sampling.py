"""How a next token is picked: a request's settings (SamplingConfig, whose defaults are every front end's defaults),
penalties, temperature, top-k, top-p, and the seeded draw; batched over rows, each request from its own generator."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Below this temperature logits / temperature can overflow to inf (NaN probabilities); the limit is greedy anyway.
GREEDY_BELOW = 1e-5


SEED_MAX = 2**64 - 1  # torch seeds its generators with 64 bits; the trainer's --seed too


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick each next token, and when to stop. The defaults are those of a request everywhere (the CLI, the app,
    the API); a SamplingConfig that exists is valid: a bad value raises ValueError when it is made."""

    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 means greedy; so does anything below GREEDY_BELOW
    top_k: int | None = 50  # None or 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off (CTRL-style on logits of tokens already present)
    frequency_penalty: float = 0.0  # subtracted once per earlier occurrence of a token
    stop: tuple[str, ...] = ()  # user stop strings; generation also always stops at <|endoftext|>
    seed: int | None = None  # same seed, checkpoint, prompt and settings: same text

    def __post_init__(self) -> None:
        self.validate()

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
        if self.seed is not None and not 0 <= int(self.seed) <= SEED_MAX:
            raise ValueError(f"seed must be an integer from 0 to {SEED_MAX} (2**64 - 1), got {self.seed}.")

    @property
    def penalized(self) -> bool:
        """Whether a penalty is on (then each row's token counts are kept)."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0


DEFAULT_SAMPLING = SamplingConfig()  # the defaults of a request, in one place


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
    return dataclasses.replace(sampling, **{name: value})


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


# A generator for every row, or (rows, generator) pairs that cover the rows in order: requests decoded together, each
# drawing from its own generator exactly what it would draw alone.
Generators = torch.Generator | Sequence[tuple[int, torch.Generator]]


def sample_next(logits: torch.Tensor, sampling: SamplingConfig, generator: Generators,
                counts: torch.Tensor | None = None) -> torch.Tensor:
    """One next token per row of logits (B, V), with batched ops: penalties, temperature, top-k, top-p."""
    if logits.dtype != torch.float32:
        logits = logits.float()
    if counts is not None:
        logits = apply_penalties(logits, counts, sampling)
    if sampling.temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    t, k = sampling.temperature, int(sampling.top_k or 0)
    if 0 < k < logits.shape[-1]:
        # sorted, so top-p can work on the k candidates only; a positive temperature keeps the order, so only the k
        # candidates are divided by it (the same values, not a whole vocabulary's division every step)
        cand, ids = torch.topk(logits, k, dim=-1)
        if t != 1.0:
            cand = cand / t
    else:
        if t != 1.0:
            logits = logits / t
        if sampling.top_p >= 1.0:
            return draw(torch.softmax(logits, dim=-1), generator)
        cand, ids = torch.sort(logits, dim=-1, descending=True)
    if sampling.top_p < 1.0:
        cand = nucleus(cand, sampling.top_p)
    return ids.gather(1, draw(torch.softmax(cand, dim=-1), generator).unsqueeze(1)).squeeze(1)


def draw(probs: torch.Tensor, generator: Generators) -> torch.Tensor:
    """One index per row of probs (B, N), index i with probability probs[:, i]: the exponential race
    argmax(p_i / E_i), E_i ~ Exp(1). torch.multinomial draws one sample the same way (the same numbers from the same
    generator); this skips its input checks, which cost more than the draw on a decode step."""
    if isinstance(generator, torch.Generator):
        noise = torch.empty_like(probs).exponential_(1, generator=generator)
    else:
        noise = torch.cat([probs.new_empty(n, probs.shape[1]).exponential_(1, generator=g) for n, g in generator])
    return torch.div(probs, noise, out=noise).argmax(dim=-1)  # in place: one tensor fewer per step


class Sampler:
    """Picks every row's next token of one request from last-position logits (B, V): the settings, the seeded
    generator and, when a penalty is on, the counts (B, n_vocab) of the tokens so far, which each pick adds to."""

    def __init__(self, sampling: SamplingConfig, num_samples: int, n_vocab: int, prompt_ids: list[int],
                 device: torch.device | str = "cpu"):
        self.sampling, self.n_vocab = sampling, n_vocab
        self.generator = torch.Generator(device=device)
        if sampling.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(sampling.seed))
        self.counts: torch.Tensor | None = None
        if sampling.penalized:
            self.counts = torch.zeros(num_samples, n_vocab, device=device)
            ids = torch.tensor(prompt_ids, dtype=torch.long, device=device).clamp(max=n_vocab - 1).expand(num_samples, -1)
            self.counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=self.counts.dtype))
            self._ones = torch.ones(num_samples, 1, device=device)  # made once: a pick adds them, every step

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[-1] != self.n_vocab:
            logits = logits[:, :self.n_vocab]
        nxt = sample_next(logits, self.sampling, self.generator, self.counts)
        if self.counts is not None:
            self.counts.scatter_add_(1, nxt.view(-1, 1), self._ones)
        return nxt

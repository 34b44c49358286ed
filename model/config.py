"""Model configuration: one dataclass and the named presets users pick with --preset."""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import Any


@dataclass
class GPTConfig:
    """Shape of a GPT. Plain data: saved as JSON next to the weights."""

    block_size: int = 256  # context length in tokens (also the number of learned positions)
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = True  # bias in Linear and LayerNorm layers, as GPT-2

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError, in one sentence a user can act on, for an impossible shape."""
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            try:
                ok = operator.index(value) >= 1  # an integer (2.5 or "2" is not)
            except TypeError:
                ok = False
            if not ok:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                "pick a width that is a multiple of the number of heads."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        """Build from a dict, ignoring keys this version does not know."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# Named presets. "cpu" is what `python train.py` trains by default; "gpt2" is GPT-2 small (124M).
PRESETS: dict[str, GPTConfig] = {
    # "cpu": tuned for the best val nats/char in 10 minutes on 2 CPU cores with the gpt2-compact tokenizer
    # (64 tokens of context ~ 200 characters); see docs/training-results.md for what each lever measured.
    "cpu": GPTConfig(block_size=64, n_layer=4, n_head=4, n_embd=256, dropout=0.2),
    "tiny": GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64, dropout=0.0),
    "gpt2": GPTConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768),
}


def preset(name: str) -> GPTConfig:
    """A fresh copy of a named preset."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of: {', '.join(PRESETS)}.")
    return dataclasses.replace(PRESETS[name])

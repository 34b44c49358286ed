"""Model configuration: the shape of a GPT as one dataclass (the presets are model/training/settings.py's)."""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import Any

MLP_KINDS = ("gelu", "relu2")


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
    # The block's variants. The defaults are GPT-2's, so a config.json without these keys loads as the classic block.
    rotary: bool = False  # rotary position embeddings on queries and keys instead of learned positions (wpe)
    mlp: str = "gelu"  # the MLP's activation: "gelu" (GPT-2's tanh approximation) or "relu2" (ReLU squared)
    qk_norm: bool = False  # queries and keys RMS-normalised per head before attention

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
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"mlp must be one of {', '.join(MLP_KINDS)}, got {self.mlp!r}.")
        if self.rotary and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"rotary embeddings need an even head size, got {self.n_embd // self.n_head}; change n_embd or n_head.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        """Build from a dict, ignoring keys this version does not know."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

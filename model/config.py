"""Model configuration: the shape of a GPT as one dataclass, and where a shape comes from: a named preset
(GPTConfig.from_name; the shape tables are here, a preset's training settings are model/training/settings.py's) or a
saved section (GPTConfig.from_dict: config.json, train_state.pt, through model/formats/checkpoint.py's readers)."""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

MLP_KINDS = ("gelu", "relu2")
GPT2_VOCAB = 50304  # GPT-2's 50257 tokens padded up to a multiple of 64: a preset's vocabulary when no text is known
TINY_SHAKESPEARE_TOKENS = 317_000  # its training split with the default tokenizer: what the cpu preset is sized for by name

# The model shape of each named preset (train.py --preset NAME, GPTConfig.from_name). "cpu" (`python train.py`) leaves
# depth, width, heads and dropout to the text: CPU_SIZES. The others are GPT-2's classic block.
PRESET_SHAPES: dict[str, dict[str, Any]] = {
    "cpu": {"block_size": 128, "rotary": True, "mlp": "gelu", "qk_norm": False},
    "tiny": {"block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 64, "dropout": 0.0},
    "gpt2": {"block_size": 1024, "n_layer": 12, "n_head": 12, "n_embd": 768, "dropout": 0.0},
}


class CpuSize(NamedTuple):
    """A row of CPU_SIZES: a size of the cpu preset, for texts up to a token count, and the passes it learns from."""

    tokens: float  # training splits of at most this many tokens
    size: dict[str, Any]  # depth, width, heads and dropout
    cap: float | None  # the passes over the text this size still learns from; the schedule ends there (None: no cap)


# The cpu preset's size by the text: the first row whose limit is at least the training split's token count. Its cap
# ends the schedule where the size stops learning, so a faster machine or a larger --max-minutes ends there instead of
# overfitting. Fitted from the runs in docs/training-results.md: on Tiny Shakespeare this row won at every budget from
# 2.5 to 40 minutes against larger models, more dropout and more passes (docs/train.md explains it).
CPU_SIZES: tuple[CpuSize, ...] = (
    CpuSize(100_000, {"n_layer": 4, "n_embd": 128, "n_head": 4, "dropout": 0.3}, None),
    CpuSize(1_000_000, {"n_layer": 4, "n_embd": 192, "n_head": 4, "dropout": 0.1}, 7.0),
    CpuSize(math.inf, {"n_layer": 4, "n_embd": 256, "n_head": 4, "dropout": 0.0}, None),
)


def cpu_row(train_tokens: int) -> CpuSize:
    """The cpu preset's size (and passes cap) for a training split of this many tokens."""
    return next(row for row in CPU_SIZES if train_tokens <= row.tokens)


FLOAT_BYTES = 4  # weights and buffers are fp32 on the CPU, where every model is built
TRAINING_COPIES = 4  # training holds the weights, their gradients and AdamW's two moments
SAMPLING_COPIES = 4  # vocabulary-sized rows a sequence holds at a decode step: logits, penalty counts, probabilities, noise
# A generated token's text as generate.py keeps it (a Python string per sample): tokens average at most about 6
# characters on real text (model/training/data.py's SURE_CHARS_PER_TOKEN), of up to 4 bytes each.
TEXT_BYTES_PER_TOKEN = 24
CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")  # a container's, v2 and v1


@dataclass
class GPTConfig:
    """Shape of a GPT. Plain data: saved as JSON next to the weights. The sizes have no defaults: a shape comes from a
    preset (from_name), a saved section (from_dict) or is spelled out."""

    block_size: int  # context length in tokens (also the number of learned positions)
    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
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
        check_memory(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_name(cls, name: str, train_tokens: int = TINY_SHAKESPEARE_TOKENS, vocab_size: int = GPT2_VOCAB) -> GPTConfig:
        """A preset's shape (cpu: as sized for a training split of train_tokens, Tiny Shakespeare's by default)."""
        if name not in PRESET_SHAPES:
            raise ValueError(f"Unknown preset {name!r}; choose one of: {', '.join(PRESET_SHAPES)}.")
        sized = cpu_row(train_tokens).size if name == "cpu" else {}
        return cls(vocab_size=vocab_size, **sized, **PRESET_SHAPES[name])

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        """Build from a dict, ignoring keys this version does not know."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def param_count(config: GPTConfig) -> int:
    """Parameters of a GPT of this shape, the tied head once, without building it (as GPT.num_params(False))."""
    d, bias = config.n_embd, int(config.bias)
    per_layer = 12 * d * d + bias * 9 * d + 2 * d * (1 + bias)  # attention 4d², MLP 8d², their biases, two LayerNorms
    positions = 0 if config.rotary else config.block_size * d
    return config.n_layer * per_layer + config.vocab_size * d + positions + d * (1 + bias)


def sequence_memory(config: GPTConfig) -> int:
    """Bytes each sequence decoded at once needs: its KV cache over the whole context and its vocabulary-sized rows."""
    return (2 * config.n_layer * config.block_size * config.n_embd + SAMPLING_COPIES * config.vocab_size) * FLOAT_BYTES


def memory_needed(config: GPTConfig, training: bool = False) -> int:
    """Bytes a GPT of this shape needs on the CPU: its fp32 weights (for training, also their gradients and optimizer
    state), the rotary tables, the attention mask, and one sequence decoded over the whole context."""
    t, d = config.block_size, config.n_embd
    weights = param_count(config) * (TRAINING_COPIES if training else 1)
    rotary = 2 * t * (d // config.n_head) if config.rotary else 0
    return (weights + rotary + t * t) * FLOAT_BYTES + sequence_memory(config)


@functools.cache
def machine_memory() -> int | None:
    """Bytes of memory on this machine, or its container's limit if lower; None if unknown."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        total = None
    for path in CGROUP_LIMITS:
        try:
            limit = Path(path).read_text().strip()
        except OSError:
            continue
        if limit.isdigit():
            total = min(total, int(limit)) if total else int(limit)
    return total


def check_memory(config: GPTConfig, training: bool = False) -> None:
    """Raise ValueError, in one sentence, when a GPT of this shape cannot fit in this machine's memory: said before
    anything is allocated, instead of an allocator failure. Every GPTConfig is checked (validate), so every model is."""
    need, have = memory_needed(config, training), machine_memory()
    if have is None or need <= have:
        return
    layers = f"{config.n_layer:,} layer{'s' if config.n_layer > 1 else ''}"
    shape = f"{layers} of width {config.n_embd:,} and a context of {config.block_size:,} tokens"
    if config.vocab_size * config.n_embd * 10 >= param_count(config):  # named only where it weighs
        shape += f" over a vocabulary of {config.vocab_size:,}"
    purpose = "to train" if training else "to load and run"
    raise ValueError(f"a model of {shape} needs about {need / 1e9:,.1f} GB of memory {purpose}, more than this machine's "
                     f"{have / 1e9:,.1f} GB: use a smaller shape or a machine with more memory.")


def check_generation(config: GPTConfig, samples: int, new_tokens: int) -> None:
    """Raise ValueError, in one sentence that says the most that fits, when decoding `samples` sequences together and
    keeping `new_tokens` tokens of text of each (as generate.py does) cannot fit in this machine's memory: said before
    the engine allocates every sequence's cache at once, or the text grows until the machine runs out."""
    have = machine_memory()
    model = memory_needed(config) - sequence_memory(config)  # the weights, rotary tables and mask
    caches = samples * sequence_memory(config)
    need = model + caches + samples * new_tokens * TEXT_BYTES_PER_TOKEN
    if have is None or need <= have:
        return
    shown = f"about {need / 1e9:,.1f} GB" if need < 10**18 else "over a billion GB"
    asked = f"1 sample of {new_tokens:,} new tokens needs" if samples == 1 else f"{samples:,} samples of {new_tokens:,} new tokens need"
    most_tokens = (have - model - caches) // (samples * TEXT_BYTES_PER_TOKEN)  # each, for this many samples
    most_samples = (have - model) // (sequence_memory(config) + new_tokens * TEXT_BYTES_PER_TOKEN)  # of this length
    if most_tokens >= 1:
        most = f"{most_tokens:,} new tokens"
    elif most_samples >= 1:
        most = f"{most_samples:,} samples"
    else:
        most = f"{(have - model - sequence_memory(config)) // TEXT_BYTES_PER_TOKEN:,} new tokens with 1 sample"
    raise ValueError(f"{asked} {shown} of memory, more than this machine's {have / 1e9:,.1f} GB: ask for at most {most}.")

"""A GPT forward pass in NumPy alone, one function per concept with its formula: the page to step through in a debugger.

It computes what model/gpt.py computes, for every block this kit trains (learned or rotary positions, GELU or ReLU²,
qk-norm, with or without biases) and for GPT-2 in Hugging Face's format, to within 1e-4 of the torch model's logits
(tests/test_numpy_gpt.py). It reads the weights from disk itself (safetensors' NumPy API), so importing or running it
imports no torch. It has no KV cache and no batching: each new token runs the whole window again, which is slow; the
engine in model/generation/ is what serves. `python generate.py --engine numpy` generates with it.

Shapes: T tokens, C = n_embd channels, H heads of D = C / H channels each, V vocabulary entries. Every array is
float32, as the torch model's weights are. Parameter names are those of our checkpoints (model.safetensors), so
params["transformer.h.0.attn.c_attn.weight"] is the tensor gpt.py's model.transformer.h[0].attn.c_attn.weight holds.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from model.config import GPTConfig
from model.formats.files import CheckpointError, read_json
from model.formats.hf_config import config_from_hf
from model.tokenizer import Tokenizer, load_tokenizer

Params = dict[str, np.ndarray]

LN_EPS = 1e-5  # nn.LayerNorm's default, which gpt.py (and GPT-2) use
RMS_EPS = float(np.finfo(np.float32).eps)  # F.rms_norm's default for float32, which gpt.py's qk-norm uses
ROPE_BASE = 10000.0  # gpt.py's rotary_tables default
GREEDY_BELOW = 1e-5  # model/generation/sampling.py's: a lower temperature picks the likeliest token (a test checks they agree)
CONFIG, WEIGHTS = "config.json", "model.safetensors"  # the files of a checkpoint folder (ours or Hugging Face's)
HF_PREFIX = "transformer."
HF_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")  # stored (in, out)
HF_SKIP = ("lm_head.weight", ".attn.bias", ".attn.masked_bias")  # the tied head (= wte) and old causal-mask buffers


# --- the pieces, one concept each ---

def gelu(x: np.ndarray) -> np.ndarray:
    """GELU in the tanh approximation GPT-2 uses: gelu(x) = x/2 · (1 + tanh(√(2/π) · (x + 0.044715 x³)))."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def relu2(x: np.ndarray) -> np.ndarray:
    """ReLU squared: relu2(x) = max(x, 0)²."""
    return np.maximum(x, 0.0) ** 2


def softmax(x: np.ndarray) -> np.ndarray:
    """softmax(x)_i = exp(x_i - m) / Σ_j exp(x_j - m) over the last axis, m = max_j x_j: probabilities that sum to 1.
    Subtracting m changes nothing but keeps exp from overflowing; exp(-inf) = 0 is how a mask removes an entry."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, eps: float = LN_EPS) -> np.ndarray:
    """LayerNorm over the channels: (x - μ) / √(σ² + eps) · weight + bias, μ and σ² the mean and variance of each row."""
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps) * weight
    return y if bias is None else y + bias


def rms_norm(x: np.ndarray, eps: float = RMS_EPS) -> np.ndarray:
    """RMSNorm without a learned scale (qk-norm): x / √(mean(x²) + eps) over the last axis, so every query and key
    vector has a root mean square of 1 and the attention logits cannot grow without bound."""
    return x / np.sqrt((x ** 2).mean(axis=-1, keepdims=True) + eps)


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """A fully connected layer: y = x Wᵀ + b, with W stored (out, in) as torch's nn.Linear stores it."""
    y = x @ weight.T
    return y if bias is None else y + bias


def rotary_angles(length: int, head_dim: int, base: float = ROPE_BASE) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (length, D) of the rotary angles: position p turns channel pair (i, i + D/2) by p · θ_i, with
    θ_i = base^(-2i/D) for i < D/2 (fast turns on the first pairs, slow ones on the last); each half repeats the angles."""
    theta = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    angles = np.outer(np.arange(length, dtype=np.float32), theta)
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles), np.sin(angles)


def rotate_half(x: np.ndarray) -> np.ndarray:
    """(x1, x2) -> (-x2, x1) on the two halves of the last axis: each pair (x1_i, x2_i) turned by 90 degrees."""
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate([-x2, x1], axis=-1)


def rotary(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotary position embedding, rotate-half form: x · cos + rotate_half(x) · sin turns each pair (x1_i, x2_i) of a
    query or key at position p by the angle p · θ_i. A query at p and a key at s then score q·k through p - s alone."""
    return x * cos + rotate_half(x) * sin


def causal_mask(length: int) -> np.ndarray:
    """(T, T): 0 on and below the diagonal, -inf above it. Added to the attention scores, it lets position t attend to
    positions 0..t only: a token never sees the tokens after it, which is what it is trained to predict."""
    return np.triu(np.full((length, length), -np.inf, dtype=np.float32), k=1)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Scaled dot-product attention for every head at once (q, k, v: (H, T, D)): softmax(q kᵀ / √D + mask) v.
    Row t of the softmax says how much position t takes from each position's value."""
    scores = q @ k.transpose(0, 2, 1) / math.sqrt(q.shape[-1])  # (H, T, T): how well each query matches each key
    return softmax(scores + mask) @ v


def causal_self_attention(x: np.ndarray, p: Params, config: GPTConfig) -> np.ndarray:
    """Multi-head causal self-attention of x (T, C): q, k, v = x W_qkv + b (one fused matrix), split into H heads of D
    channels; optionally qk-norm and rotary on q and k; attention per head with the causal mask; the heads joined back
    into C channels and mixed by the output projection: y = concat(head_1..head_H) W_o + b_o."""
    T, C = x.shape
    H = config.n_head
    D = C // H
    qkv = linear(x, p["attn.c_attn.weight"], p.get("attn.c_attn.bias"))  # (T, 3C)
    q, k, v = np.split(qkv, 3, axis=-1)  # each (T, C)
    q, k, v = (a.reshape(T, H, D).transpose(1, 0, 2) for a in (q, k, v))  # each (H, T, D): one (T, D) matrix per head
    if config.qk_norm:
        q, k = rms_norm(q), rms_norm(k)
    if config.rotary:
        cos, sin = rotary_angles(T, D)
        q, k = rotary(q, cos, sin), rotary(k, cos, sin)
    y = attention(q, k, v, causal_mask(T))  # (H, T, D)
    y = y.transpose(1, 0, 2).reshape(T, C)  # the heads side by side again
    return linear(y, p["attn.c_proj.weight"], p.get("attn.c_proj.bias"))


def mlp(x: np.ndarray, p: Params, config: GPTConfig) -> np.ndarray:
    """The feed-forward layer, the same for each position: act(x W_1 + b_1) W_2 + b_2, 4C channels wide inside;
    act is GELU (GPT-2's) or ReLU²."""
    h = linear(x, p["mlp.c_fc.weight"], p.get("mlp.c_fc.bias"))
    h = relu2(h) if config.mlp == "relu2" else gelu(h)
    return linear(h, p["mlp.c_proj.weight"], p.get("mlp.c_proj.bias"))


def block(x: np.ndarray, p: Params, config: GPTConfig) -> np.ndarray:
    """A pre-norm transformer block: x = x + attn(LN_1(x)), then x = x + mlp(LN_2(x)). Each sublayer adds to the
    residual stream x instead of replacing it, so every layer refines what the ones below wrote."""
    x = x + causal_self_attention(layer_norm(x, p["ln_1.weight"], p.get("ln_1.bias")), p, config)
    return x + mlp(layer_norm(x, p["ln_2.weight"], p.get("ln_2.bias")), p, config)


def layer_params(params: Params, prefix: str) -> Params:
    """The parameters under prefix, with the prefix taken off: layer_params(params, "transformer.h.0.")["ln_1.weight"]."""
    return {name[len(prefix):]: value for name, value in params.items() if name.startswith(prefix)}


def gpt(tokens: list[int] | np.ndarray, params: Params, config: GPTConfig) -> np.ndarray:
    """Logits (T, V) of the next token after each of tokens (T ≤ block_size): x = wte[tokens] (+ wpe[0..T-1] with
    learned positions), the blocks, a final LayerNorm, then logits = x wteᵀ: the head is the token embedding itself
    (tied), so a token's score is how well the last hidden state matches its embedding."""
    tokens = np.asarray(tokens, dtype=np.int64)
    T = len(tokens)
    if not 0 < T <= config.block_size:
        raise ValueError(f"The forward takes 1 to {config.block_size} tokens (the context), got {T}.")
    wte = params["transformer.wte.weight"]  # (V, C): one row per token
    x = wte[tokens]  # (T, C)
    if not config.rotary:
        x = x + params["transformer.wpe.weight"][:T]  # one learned row per position
    for i in range(config.n_layer):
        x = block(x, layer_params(params, f"transformer.h.{i}."), config)
    x = layer_norm(x, params["transformer.ln_f.weight"], params.get("transformer.ln_f.bias"))
    return x @ wte.T


# --- picking tokens ---

def sample(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float, rng: np.random.Generator) -> int:
    """One next token from last-position logits (V,). Temperature 0 (below GREEDY_BELOW): the likeliest, argmax.
    Otherwise p = softmax(logits / temperature) over the top_k likeliest tokens (0 or None: all of them), then only
    the smallest set of those whose probability reaches top_p (nucleus; 1.0: all), renormalised, and one draw from p."""
    if temperature < GREEDY_BELOW:
        return int(np.argmax(logits))
    order = np.argsort(-logits, kind="stable")  # token ids, likeliest first
    if top_k and top_k < len(order):
        order = order[:top_k]
    probs = softmax(logits[order] / temperature)
    before = np.cumsum(probs) - probs  # probability of the tokens ranked above each one
    probs = np.where(before < top_p, probs, 0.0).astype(np.float64)  # the first token is always kept (before = 0)
    return int(order[rng.choice(len(order), p=probs / probs.sum())])


def generate(model: NumpyGPT, prompt_ids: list[int], max_new_tokens: int, n_vocab: int | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0,
             rng: np.random.Generator | None = None) -> Iterator[int]:
    """Yield max_new_tokens new tokens, one at a time: run the window (the last block_size tokens) through gpt(),
    pick the next token from the last position's logits (sample), append it, repeat. n_vocab: the tokenizer's
    vocabulary, when the embedding table is padded beyond it (padding rows are never picked)."""
    ids = list(prompt_ids)
    rng = rng or np.random.default_rng()
    for _ in range(max_new_tokens):
        logits = model(ids[-model.config.block_size:])[-1, :n_vocab]
        ids.append(sample(logits, temperature, top_k, top_p, rng))
        yield ids[-1]


def decode_tokens(model: NumpyGPT, prompt_ids: list[int], num_samples: int, sampling: Any, n_vocab: int) -> Iterator[np.ndarray]:
    """As model/generation/generate.py's decode_tokens, for generate.py --engine numpy: after each step, the
    (num_samples,) next tokens of num_samples sequences of the prompt. sampling is a SamplingConfig (its fields are
    read; it is not imported, as it imports torch); penalties are refused. Past the context the window is the last
    block_size tokens (the engine's default slide keeps half of them, so long texts differ)."""
    if sampling.repetition_penalty != 1.0 or sampling.frequency_penalty != 0.0:
        raise ValueError("The NumPy engine has no repetition or frequency penalty: leave them at 1.0 and 0.0, or use --engine torch.")
    rng = np.random.default_rng(sampling.seed)
    rows = [generate(model, prompt_ids, int(sampling.max_new_tokens), n_vocab, sampling.temperature, sampling.top_k,
                     sampling.top_p, rng) for _ in range(num_samples)]
    for step in zip(*rows, strict=True):
        yield np.array(step)


# --- loading weights from disk ---

@dataclass
class NumpyGPT:
    """A GPT as plain arrays: its shape, its parameters (our checkpoints' names, float32; the head is wte, tied), a
    config.json in our format and the tokenizer it names. Call it on token ids for logits."""

    config: GPTConfig
    params: Params
    meta: dict[str, Any]
    tokenizer: Tokenizer

    def __call__(self, tokens: list[int] | np.ndarray) -> np.ndarray:
        return gpt(tokens, self.params, self.config)


def param_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """The name and shape of every parameter gpt() reads for this config: the whole model on one screen."""
    C, V = config.n_embd, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (V, C)}
    if not config.rotary:
        shapes["transformer.wpe.weight"] = (config.block_size, C)
    layer = {"ln_1": (C,), "attn.c_attn": (3 * C, C), "attn.c_proj": (C, C), "ln_2": (C,), "mlp.c_fc": (4 * C, C),
             "mlp.c_proj": (C, 4 * C)}
    for i in range(config.n_layer):
        for name, shape in layer.items():
            shapes[f"transformer.h.{i}.{name}.weight"] = shape
            if config.bias:
                shapes[f"transformer.h.{i}.{name}.bias"] = (shape[0],)
    shapes["transformer.ln_f.weight"] = (C,)
    if config.bias:
        shapes["transformer.ln_f.bias"] = (C,)
    return shapes


def read_weights(path: Path) -> Params:
    """The arrays of a safetensors file, or a CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; the NumPy forward reads weights from a {WEIGHTS} file only.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); train or copy it again.") from None


def params_from_hf(hf: Params, where: str) -> Params:
    """Hugging Face GPT-2 arrays under our names: the "transformer." prefix added where missing, Conv1D weights (stored
    (in, out)) transposed to (out, in), the tied head (refused if it is not wte) and the causal-mask buffers dropped."""
    head, wte = hf.get("lm_head.weight"), hf.get(HF_PREFIX + "wte.weight", hf.get("wte.weight"))
    if head is not None and (wte is None or not np.array_equal(head, wte)):
        raise CheckpointError(f"{where} has an lm_head that differs from its token embedding; the NumPy forward needs "
                                   "the tied head GPT-2 uses.")
    params = {}
    for key, value in hf.items():
        if key.endswith(HF_SKIP):
            continue
        name = key if key.startswith(HF_PREFIX) else HF_PREFIX + key
        params[name] = np.ascontiguousarray(value.T) if name.endswith(HF_CONV1D) else value
    return params


def check_params(params: Params, config: GPTConfig, where: str) -> Params:
    """params as float32, every one gpt() reads present with its shape, or a CheckpointError."""
    for name, shape in param_shapes(config).items():
        if name not in params or params[name].shape != shape:
            found = "missing" if name not in params else f"of shape {params[name].shape}"
            raise CheckpointError(f"{where} holds {name} {found} where its config needs {shape}; the checkpoint is "
                                       "damaged or mixed from two runs.")
        if not np.issubdtype(params[name].dtype, np.floating):
            raise CheckpointError(f"{where} holds {name} as {params[name].dtype}, not floating point; it is damaged.")
    return {name: params[name].astype(np.float32) for name in param_shapes(config)}


def load(path: str | Path) -> NumpyGPT:
    """The model in a checkpoint folder: an fp32 checkpoint of ours (config.json + model.safetensors) or a Hugging Face
    GPT-2 folder (config.json + model.safetensors). int8 checkpoints are refused: their weights are torch's packed int8."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"No checkpoint folder at {path}: train one with python train.py (or pass --ckpt DIR).")
    cfg = read_json(path / CONFIG)
    if "model" in cfg:  # one of ours
        if cfg.get("kind", "fp32") != "fp32":
            raise CheckpointError(f"{path} is an {cfg.get('kind')} checkpoint; the NumPy forward runs fp32 weights: pass the "
                                       "checkpoint it was made from (e.g. --ckpt out).")
        try:
            config = GPTConfig.from_dict(cfg["model"])
        except (TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{path / CONFIG} has an invalid model config: {e}") from None
        params, meta = read_weights(path / WEIGHTS), cfg
    else:  # a Hugging Face GPT-2 folder
        config = config_from_hf(cfg, str(path / CONFIG))
        params = params_from_hf(read_weights(path / WEIGHTS), str(path))
        meta = {"kind": "fp32", "model": config.to_dict(), "tokenizer": cfg.get("smallgpt_tokenizer", {"name": "gpt2"}),
                "source": {"format": "huggingface", "path": str(path)}}
    return NumpyGPT(config, check_params(params, config, str(path / WEIGHTS)), meta, load_tokenizer(meta["tokenizer"]))

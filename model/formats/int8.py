"""int8 dynamic quantization of a GPT: conversion, a safetensors checkpoint format, and loading it back.

Every nn.Linear becomes torch's dynamic-quantized Linear (qint8 weights, activations quantized on the fly)
via torch.ao.quantization.quantize_dynamic. The tied lm_head/wte matrix is stored once: lm_head is a
per-row (per-channel) int8 Linear and wte is an Int8Embedding that reads rows of that same int8 matrix.

An int8 checkpoint directory holds model.safetensors (int8 weights, scales, zero points and the remaining
fp32 tensors as plain tensors), config.json with "kind": "int8", and copies of metrics.json / report.json.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.ao.nn.quantized.dynamic as nnqd
import torch.nn as nn
import torch.nn.functional as F
from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

from model.formats.checkpoint import WEIGHTS, CheckpointError, check_floats, load_state_dict, read_model_config, save_config, save_tensors
from model.generation.generate import SamplingConfig, decode_tokens, warm_up
from model.gpt import GPT

SCHEMES = ("per_channel", "per_tensor")
ENGINE_PREFERENCE = ("x86", "fbgemm", "qnnpack")  # x86-64 kernels first, qnnpack on ARM
FIX = "run python quantize.py again"

# torch.ao.quantization announces its move to torchao on every call. We keep it on purpose (tests/test_quantize.py
# has a canary that fails the day it is gone), so only these two known notices are hidden; all else shows.
_KNOWN_NOTICES = (r"torch\.ao\.quantization is deprecated", r"torch\.quantize_per_tensor, torch\.quantize_per_channel")


@contextmanager
def _quiet_known_deprecations() -> Iterator[None]:
    with warnings.catch_warnings():
        for message in _KNOWN_NOTICES:
            warnings.filterwarnings("ignore", message=message)
        yield


def set_engine() -> str:
    """Select the quantized kernels explicitly (x86 on x86-64, qnnpack on ARM) and return the name."""
    supported = torch.backends.quantized.supported_engines
    for name in ENGINE_PREFERENCE:
        if name in supported:
            torch.backends.quantized.engine = name
            return name
    raise RuntimeError(f"This PyTorch build has no int8 CPU kernels (engines: {supported}); install a standard CPU build of torch.")


class Int8Embedding(nn.Module):
    """Token embedding read from a per-row int8 matrix: gathered rows are dequantized with their scales.

    It shares the int8 matrix of the tied lm_head, so the checkpoint holds the vocabulary matrix once.
    """

    def __init__(self, weight_int8: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("weight_int8", weight_int8, persistent=False)
        self.register_buffer("scale", scale.float(), persistent=False)

    @classmethod
    def from_head(cls, head: nnqd.Linear) -> Int8Embedding:
        """The embedding that shares a per-channel quantized head's int8 rows (symmetric: zero points are 0)."""
        w = head.weight()
        return cls(w.int_repr(), w.q_per_channel_scales())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight_int8).float() * self.scale[idx].unsqueeze(-1)


def quantize_model(model: GPT, scheme: str = "per_channel") -> GPT:
    """A quantized copy of an fp32 GPT (eval mode): int8 Linears in the blocks and one shared int8 vocab matrix.

    scheme sets the blocks' weight scales (one per output row, or one per matrix); the tied head is always per row,
    since the embedding reads its rows.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"Unknown scheme {scheme!r}; choose one of: {', '.join(SCHEMES)}.")
    set_engine()
    block_qconfig = per_channel_dynamic_qconfig if scheme == "per_channel" else default_dynamic_qconfig
    spec = {"transformer.h": block_qconfig, "lm_head": per_channel_dynamic_qconfig}
    with _quiet_known_deprecations():
        qmodel = quantize_dynamic(model.eval(), spec, dtype=torch.qint8, inplace=False)
    qmodel.transformer.wte = Int8Embedding.from_head(qmodel.lm_head)
    return qmodel.eval()


def _quantized_linears(model: nn.Module) -> Iterator[tuple[str, nnqd.Linear]]:
    for name, module in model.named_modules():
        if isinstance(module, nnqd.Linear):
            yield name, module


def int8_state(qmodel: GPT) -> dict[str, torch.Tensor]:
    """Plain tensors of a quantized GPT: per quantized Linear its int8 weight, scale(s), zero point(s) and bias;
    every other tensor in fp32. wte is not stored: it is rebuilt from lm_head's int8 rows."""
    state: dict[str, torch.Tensor] = {}
    linear_names = set()
    for name, module in _quantized_linears(qmodel):
        linear_names.add(name)
        w, b = module.weight(), module.bias()
        if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            scale, zero_point = w.q_per_channel_scales(), w.q_per_channel_zero_points()
        else:
            scale, zero_point = torch.tensor([w.q_scale()], dtype=torch.float64), torch.tensor([w.q_zero_point()])
        state[f"{name}.weight_int8"] = w.int_repr()
        scale32 = scale.float()  # torch's observers compute scales in fp32: storing fp32 is lossless (else keep fp64)
        state[f"{name}.weight_scale"] = scale32 if torch.equal(scale32.double(), scale.double()) else scale.double()
        state[f"{name}.weight_zero_point"] = zero_point.to(torch.int8)  # qint8 zero points lie in [-128, 127]
        if b is not None:
            state[f"{name}.bias"] = b.detach().float()
    for key, tensor in qmodel.state_dict().items():  # LayerNorms and wpe; Int8Embedding's buffers are not persistent
        if key.rsplit(".", 1)[0].removesuffix("._packed_params") not in linear_names:
            state[key] = tensor.detach()
    return {k: v.contiguous().cpu() for k, v in state.items()}


def save_int8(out_dir: str | Path, qmodel: GPT, cfg: dict[str, Any]) -> None:
    """Write an int8 checkpoint: model.safetensors (atomic) and config.json of kind "int8" (cfg: the fp32 config.json)."""
    out_dir = Path(out_dir)
    save_tensors(out_dir / WEIGHTS, int8_state(qmodel), {"format": "smallgpt-int8"})
    save_config(out_dir, qmodel.config, cfg["tokenizer"], cfg.get("train"), kind="int8")


def _qlinear(name: str, linear: nn.Linear, state: dict[str, torch.Tensor], where: str) -> nnqd.Linear:
    """Rebuild one dynamic-quantized Linear from its stored tensors, checking names, dtypes, values and shapes."""
    try:
        w = state.pop(f"{name}.weight_int8")
        floats = {f"{name}.weight_scale": state.pop(f"{name}.weight_scale")}
        zero_point = state.pop(f"{name}.weight_zero_point")
        if linear.bias is not None:
            floats[f"{name}.bias"] = state.pop(f"{name}.bias")
    except KeyError as e:
        raise CheckpointError(f"{where} lacks {e.args[0]}: it is not a complete int8 checkpoint; {FIX}.") from None
    check_floats(floats, where, FIX)  # scales and bias: finite floats
    scale, bias = floats[f"{name}.weight_scale"].to(torch.float64), floats.get(f"{name}.bias")
    out_f, in_f = linear.out_features, linear.in_features
    bad = w.dtype != torch.int8 or tuple(w.shape) != (out_f, in_f) or scale.numel() not in (1, out_f) or not bool((scale > 0).all())
    bad = bad or scale.dim() != 1 or zero_point.is_floating_point() or tuple(zero_point.shape) != tuple(scale.shape)
    bad = bad or not bool(((zero_point >= -128) & (zero_point <= 127)).all())  # qint8's range
    bad = bad or (bias is not None and tuple(bias.shape) != (out_f,))
    if bad:
        raise CheckpointError(f"The tensors of {name} in {where} do not match its config; the checkpoint is damaged, {FIX}.")
    zero_point = zero_point.to(torch.int64)
    with _quiet_known_deprecations():
        if scale.numel() == out_f and out_f > 1:
            qweight = torch._make_per_channel_quantized_tensor(w, scale, zero_point, 0)
        else:
            qweight = torch._make_per_tensor_quantized_tensor(w, float(scale[0]), int(zero_point[0]))
        module = nnqd.Linear(in_f, out_f, bias_=bias is not None, dtype=torch.qint8)
        module.set_weight_bias(qweight, None if bias is None else bias.float())
    return module


def load_int8(ckpt_dir: str | Path) -> tuple[GPT, dict[str, Any]]:
    """The quantized GPT of an int8 checkpoint directory (eval mode, CPU) and its config.json; no unpickling."""
    ckpt_dir = Path(ckpt_dir)
    cfg, config = read_model_config(ckpt_dir)
    where = str(ckpt_dir / WEIGHTS)
    state = dict(load_state_dict(ckpt_dir / WEIGHTS))
    set_engine()
    model = GPT(config, init_weights=False).eval()  # every tensor is loaded below
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    replaced = {name: _qlinear(name, m, state, where) for name, m in linears}
    if replaced["lm_head"].weight().qscheme() not in (torch.per_channel_affine, torch.per_channel_symmetric):
        raise CheckpointError(f"lm_head in {where} is not quantized per row; the checkpoint is damaged, run python quantize.py again.")
    linear_keys = {f"{name}.{p}" for name, m in linears for p, _ in m.named_parameters(recurse=False)}
    expected = {k for k in model.state_dict() if k not in linear_keys and k != "transformer.wte.weight"}
    if set(state) != expected:
        odd = sorted(set(state) ^ expected)[:3]
        raise CheckpointError(f"{where} has unexpected or missing tensors ({', '.join(odd)}); it is not an int8 checkpoint of this config.")
    check_floats(state, where, FIX)  # LayerNorms and position embeddings
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        raise CheckpointError(f"The fp32 tensors in {where} do not match its config ({lines[-1].strip() if lines else e}).") from None
    for name, module in replaced.items():
        model.set_submodule(name, module)
    model.transformer.wte = Int8Embedding.from_head(model.lm_head)
    return model.eval(), cfg


def file_size(path: str | Path) -> int:
    return Path(path).stat().st_size


# Comparing an fp32 model with its int8 copy: what quantize.py reports (validation: model.evaluate.evaluate_pair).

def tokens_per_second(models: dict[str, nn.Module], prompt_ids: list[int], n_tokens: int, n_vocab: int,
                      repeats: int = 3) -> dict[str, float]:
    """Greedy KV-cached generation speed of each model (model.generate's engine), alternating models per repeat
    after one warm-up each, so that load from other processes hits all alike; the median of the repeats."""
    sampling = SamplingConfig(max_new_tokens=n_tokens, temperature=0.0, seed=0)
    times: dict[str, list[float]] = {name: [] for name in models}
    for r in range(repeats + 1):
        for name, model in models.items():
            warm_up(model, 1)  # the traced forwards, as a server runs them (made on the first repeat, untimed)
            start = time.perf_counter()
            for _ in decode_tokens(model, prompt_ids, 1, sampling, n_vocab):  # the untimed first run warms up
                pass
            if r > 0:
                times[name].append(time.perf_counter() - start)
    return {name: n_tokens / statistics.median(t) for name, t in times.items()}


def plot_report(report: dict[str, Any], path: str | Path) -> None:
    """report.png: fp32 against int8 side by side for file size, validation nats/char and generation speed."""
    from model.plot import plt, save_figure  # here, not at import: loading an int8 checkpoint needs no matplotlib

    panels = [("size (MB)", "size_fp32_bytes", "size_int8_bytes", 1e-6), ("val nats/char", "val_nats_per_char_fp32",
              "val_nats_per_char_int8", 1.0), ("generation (tokens/s)", "tokens_per_s_fp32", "tokens_per_s_int8", 1.0)]
    panels = [p for p in panels if report.get(p[1]) is not None and report.get(p[2]) is not None]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (title, k32, k8, unit) in zip(axes[0], panels, strict=True):
        values = [report[k32] * unit, report[k8] * unit]
        bars = ax.bar(["fp32", "int8"], values, color=["tab:blue", "tab:orange"])
        ax.bar_label(bars, fmt="%.4g")
        ax.set_title(title)
    fig.suptitle(f"int8 ({report.get('scheme', '')}) vs fp32: {report.get('params', 0) / 1e6:.1f}M parameters")
    save_figure(fig, path)

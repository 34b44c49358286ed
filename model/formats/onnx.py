"""Our GPT as ONNX files for onnxruntime (Python) and onnxruntime-web: fp32 `model.onnx` and int8
`model_quantized.onnx`, with past keys and values as inputs and outputs, so a decode step runs one token.

The graph is the model's own forward (model/gpt.py) with each layer's KV cache swapped for a ConcatCache: the
cache interface's update() appends the step's keys and values to the past ones it was given (the layout and names
transformers.js loads: input_ids, position_ids, past_key_values.N.key/value in; logits, present.N.key/value out) instead
of writing a preallocated buffer. An empty past (length 0) starts a sequence; the same graph runs a prompt, a decode
step and a slid window. The int8 file comes from onnxruntime's dynamic quantization: int8 weights, activations
quantized per call, the same idea as torch's quantize_dynamic (model/formats/int8.py).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from model import atomic
from model.gpt import GPT

MODEL = "model.onnx"
MODEL_INT8 = "model_quantized.onnx"
OPSET = 18
FP32_TOLERANCE = 1e-3  # largest |logit| difference onnxruntime's fp32 file may show against our model
INT8_SLACK = 0.01  # the int8 file may differ from fp32 by twice what torch's int8 model does, plus this (nats a position)


class OnnxExportError(RuntimeError):
    """A model could not be exported or its ONNX file disagrees with it; the message says what to do."""


def input_names(n_layer: int) -> list[str]:
    return ["input_ids", "position_ids"] + [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def output_names(n_layer: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


class ConcatCache(nn.Module):
    """A layer's cache for export: update() returns the past keys and values with this call's appended (the interface of
    model.gpt.KVCache, over tensors that are the graph's inputs and outputs instead of a buffer). A module, as the
    KVCache it stands in for, so that it can take that one's place."""

    def __init__(self) -> None:
        super().__init__()
        self.past: tuple[torch.Tensor, torch.Tensor] | None = None
        self.present: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = (torch.cat((past, new), dim=2) for past, new in zip(self.past, (k, v), strict=True))
        self.present = (keys, values)
        return keys, values


class WithPast(nn.Module):
    """model's forward over past keys and values given as tensors: (input_ids, position_ids, *pasts) -> (logits, *presents).

    Every row is at the same positions (position_ids' first row is used): the page decodes a request's sequences
    together, as the engine does alone. Past keys are at positions 0..past-1, so the mask of a query at position p lets
    it see keys 0..p; the model indexes it with its positions, as it indexes its own causal mask.
    """

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model
        self.caches = [ConcatCache() for _ in model.transformer.h]

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, *pasts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pos = position_ids[0]
        for i, cache in enumerate(self.caches):
            cache.past = (pasts[2 * i], pasts[2 * i + 1])
        length = pasts[0].shape[2] + input_ids.shape[1]
        keys = torch.arange(length, device=input_ids.device)
        rows = torch.arange(self.model.config.block_size, device=input_ids.device)
        self.model.causal_mask = torch.where(keys[None, :] <= rows[:, None], 0.0, float("-inf"))  # (block, past + T)
        logits, _ = self.model(input_ids, input_pos=pos)
        return (logits, *(t for cache in self.caches for t in cache.present))


@contextlib.contextmanager
def _export_mode(model: GPT) -> Iterator[WithPast]:
    """model with ConcatCaches in its layers, given back as it was afterwards."""
    saved = [block.attn.kv_cache for block in model.transformer.h], model.causal_mask
    wrapper = WithPast(model)
    for block, cache in zip(model.transformer.h, wrapper.caches, strict=True):
        block.attn.kv_cache = cache
    try:
        yield wrapper
    finally:
        for block, cache in zip(model.transformer.h, saved[0], strict=True):
            block.attn.kv_cache = cache
        model.causal_mask = saved[1]


def empty_past(model_config, batch: int = 1, length: int = 0) -> list[np.ndarray]:
    """Past keys and values of `length` positions (zeros) for every layer: what starts a sequence when length is 0."""
    hd = model_config.n_embd // model_config.n_head
    return [np.zeros((batch, model_config.n_head, length, hd), dtype=np.float32) for _ in range(2 * model_config.n_layer)]


def export_onnx(model: GPT, path: str | Path) -> Path:
    """Write model (fp32, eval) as an ONNX file at path with torch.onnx.export (the dynamo exporter), atomically."""
    if not isinstance(model, GPT):
        raise OnnxExportError("Only an fp32 GPT of this kit exports to ONNX; export the fp32 checkpoint an int8 one was made from.")
    config = model.config
    model = model.float().eval()
    n = config.n_layer
    # optimum's names: transformers.js sizes an empty past from the inputs' metadata, "batch_size" by the batch, other names 0
    batch = torch.export.Dim("batch_size", min=1, max=64)
    steps = torch.export.Dim("sequence_length", min=1, max=config.block_size)
    past = torch.export.Dim("past_sequence_length", min=0, max=config.block_size)
    example_t, example_past = min(2, config.block_size), 2
    ids = torch.zeros(2, example_t, dtype=torch.long)
    pos = torch.arange(example_past, example_past + example_t).expand(2, -1)
    pasts = tuple(torch.from_numpy(a) for a in empty_past(config, 2, example_past))
    shapes = ({0: batch, 1: steps}, {0: batch, 1: steps}, tuple({0: batch, 2: past} for _ in range(2 * n)))  # *pasts: one tuple
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _export_mode(model) as wrapper, torch.no_grad(), warnings.catch_warnings(), \
            contextlib.redirect_stdout(io.StringIO()), atomic.atomic_path(path) as tmp:
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper, (ids, pos, *pasts), dynamo=True, opset_version=OPSET,
                                    input_names=input_names(n), output_names=output_names(n), dynamic_shapes=shapes,
                                    optimize=True, external_data=False, verbose=False)
        program.save(str(tmp), external_data=False)
    return path


def quantize_onnx(fp32_path: str | Path, int8_path: str | Path) -> Path:
    """The int8 file of an fp32 ONNX file: onnxruntime's dynamic quantization (int8, one scale per tensor) of its MatMul
    weights and of the embedding its Gather reads (stored int8, dequantized after the lookup), as our int8 checkpoint
    stores the embedding int8 too."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    int8_path = Path(int8_path)
    with atomic.atomic_path(int8_path) as tmp, contextlib.redirect_stdout(io.StringIO()):
        quantize_dynamic(str(fp32_path), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gather"])
    return int8_path


def session(path: str | Path, threads: int = 1):
    """An onnxruntime CPU session on path (threads intra-op threads)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess, config, ids: np.ndarray, start: int, pasts: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """One call: ids (B, T) at positions start..start+T-1 over pasts; (logits (B, T, V), presents)."""
    pos = np.broadcast_to(np.arange(start, start + ids.shape[1], dtype=np.int64), ids.shape)
    feeds = dict(zip(input_names(config.n_layer), [ids.astype(np.int64), np.ascontiguousarray(pos), *pasts], strict=True))
    logits, *presents = sess.run(None, feeds)
    return logits, presents


def check_onnx(model: GPT, fp32_path: str | Path, int8_path: str | Path, seed: int = 0) -> dict[str, float]:
    """Run both files in onnxruntime against model on a random sequence, as a prompt then one token at a time over
    the cache: fp32 logits within FP32_TOLERANCE of model's; the int8 file's log-probabilities no further from model's
    (mean absolute difference, weighted by model's probabilities) than twice our torch int8 model's, plus INT8_SLACK.
    Raise OnnxExportError otherwise; return what was measured."""
    from model.formats.int8 import quantize_model

    config = model.config
    g = torch.Generator().manual_seed(seed)
    n = min(config.block_size, 12)
    ids = torch.randint(0, config.vocab_size, (2, n), generator=g)
    with torch.no_grad():
        expected = model(ids)[0].float().numpy()
        torch_int8 = quantize_model(model)(ids)[0].float().numpy()
    result = {"torch_int8_mean_abs_logprob": _logprob_gap(expected, torch_int8)}
    for name, path in (("fp32", fp32_path), ("int8", int8_path)):
        sess = session(path)
        split = n // 2
        logits, pasts = run(sess, config, ids[:, :split].numpy(), 0, empty_past(config, 2))
        got = [logits]
        for t in range(split, n):  # one token at a time over the cache
            logits, pasts = run(sess, config, ids[:, t:t + 1].numpy(), t, pasts)
            got.append(logits)
        got = np.concatenate(got, axis=1)
        if name == "fp32":
            result["fp32_max_abs"] = float(np.abs(got - expected).max())
            if not result["fp32_max_abs"] <= FP32_TOLERANCE:
                raise OnnxExportError(f"The exported {MODEL} differs from the model by {result['fp32_max_abs']:.2g} in a "
                                      "logit; please report this with the checkpoint's config.json.")
        else:
            result["int8_mean_abs_logprob"] = _logprob_gap(expected, got)
            if not result["int8_mean_abs_logprob"] <= 2 * result["torch_int8_mean_abs_logprob"] + INT8_SLACK:
                raise OnnxExportError(f"The int8 {MODEL_INT8} differs from the model by {result['int8_mean_abs_logprob']:.3g} "
                                      "in log-probability on average; please report this with the checkpoint's config.json.")
    return result


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _logprob_gap(expected: np.ndarray, got: np.ndarray) -> float:
    """Mean over positions of sum_v p(v) |log p(v) - log q(v)|: how far got's next-token distributions are from expected's."""
    lp, lq = log_softmax(expected), log_softmax(got)
    return float((np.exp(lp) * np.abs(lq - lp)).sum(-1).mean())

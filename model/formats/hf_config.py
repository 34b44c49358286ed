"""Hugging Face GPT-2 config.json to our GPTConfig, without torch: the torch import (model/formats/hf.py) and the NumPy
forward (model/numpy_gpt.py) read a GPT-2 folder's settings here, and refuse the same ones."""

from __future__ import annotations

from typing import Any

from model.config import GPTConfig
from model.formats.files import CheckpointError

TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
HF_ACT = {"gelu": "gelu_new", "relu2": "relu2"}  # our MLP kinds as transformers' ACT2FN names (gelu_new: tanh GELU)
GPT2_VOCAB = 50257
LN_EPS = 1e-5  # PyTorch's LayerNorm default, which our GPT uses; GPT-2's too


def config_from_hf(cfg: dict[str, Any], where: str) -> GPTConfig:
    """Our GPTConfig for a Hugging Face GPT-2 config.json, or a CheckpointError naming the setting we cannot run."""
    act = cfg.get("activation_function", "gelu_new")
    if act not in (*TANH_GELU, HF_ACT["relu2"]):
        raise CheckpointError(f"{where} uses activation_function {act!r}; this kit runs only GPT-2's tanh GELU ('gelu_new') "
                              "or ReLU squared ('relu2').")
    unsupported = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False}
    for key, ours in unsupported.items():
        if bool(cfg.get(key, ours)) != ours:
            raise CheckpointError(f"{where} sets {key}={cfg[key]}, an attention variant this kit does not implement.")
    try:
        eps = float(cfg.get("layer_norm_epsilon", LN_EPS))
        if abs(eps - LN_EPS) > 1e-12:
            raise CheckpointError(f"{where} has layer_norm_epsilon {eps}; this kit's LayerNorm uses GPT-2's {LN_EPS}, so it cannot run it.")
        n_embd = int(cfg.get("n_embd", 768))
        if cfg.get("n_inner") not in (None, 4 * n_embd):
            raise CheckpointError(f"{where} sets n_inner={cfg['n_inner']}; this kit's MLP is 4 * n_embd = {4 * n_embd} wide.")
        return GPTConfig(block_size=int(cfg.get("n_positions", cfg.get("n_ctx", 1024))), vocab_size=int(cfg.get("vocab_size", GPT2_VOCAB)),
                         n_layer=int(cfg.get("n_layer", 12)), n_head=int(cfg.get("n_head", 12)), n_embd=n_embd,
                         dropout=0.0, bias=True, mlp="relu2" if act == HF_ACT["relu2"] else "gelu")
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where} has an invalid GPT-2 setting: {e}") from None

"""Hugging Face directories: import GPT-2s as our GPT, and export our GPT as a GPT-2 or (rotary blocks) a GPT-NeoX.

Our module names are GPT-2's, so GPT-2 conversion is only: the optional "transformer." key prefix, GPT-2's Conv1D
weights stored as (in, out) where our Linear holds (out, in), and the tied lm_head kept once. A rotary GPT is
GPTNeoXForCausalLM with sequential residuals and rotary over the whole head; only its names differ and its fused
q/k/v rows, grouped per head. No network and no transformers import (but for the CTranslate2 shim at the end):
config.json is read as JSON, weights with safetensors or torch.load(weights_only=True).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from model.config import GPTConfig
from model.formats.checkpoint import (
    CONFIG,
    TIED_KEY,
    WEIGHTS,
    CheckpointError,
    build_model,
    read_json,
    save_tensors,
    write_json,
)
from model.formats.hf_config import GPT2_VOCAB, HF_ACT, LN_EPS, config_from_hf
from model.formats.hf_tokenizer import write_tokenizer_files
from model.gpt import GPT
from model.tokenizer import Tokenizer

SAFETENSORS = WEIGHTS  # the same file name as our own checkpoints
PYTORCH_BIN = "pytorch_model.bin"
PREFIX = "transformer."
CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")  # stored (in, out)
BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older transformers versions
TOKENIZER_KEY = "smallgpt_tokenizer"  # our exports record their tokenizer spec here; other GPT-2s use GPT-2's
GPT2_ARCH = "GPT2LMHeadModel"
NEOX_ARCH = "GPTNeoXForCausalLM"
ROPE_BASE = 10000  # rotary_tables' default base
NEOX_LAYER = {"ln_1": "input_layernorm", "attn.c_attn": "attention.query_key_value", "attn.c_proj": "attention.dense",
              "ln_2": "post_attention_layernorm", "mlp.c_fc": "mlp.dense_h_to_4h", "mlp.c_proj": "mlp.dense_4h_to_h"}
QK_NORM_REFUSAL = ("This model RMS-normalises queries and keys (qk_norm), which no standard transformers class computes "
                   "with our LayerNorm blocks, so it cannot be exported; train it with --no-qk-norm to export it.")


def hf_dir_config(path: str | Path) -> dict[str, Any] | None:
    """The config.json of a Hugging Face model directory (not one of our checkpoints), or None when path is not one."""
    cfg_path = Path(path) / CONFIG
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return cfg if isinstance(cfg, dict) and "model" not in cfg else None


def is_hf_dir(path: str | Path) -> bool:
    """True when path is a directory whose config.json describes a Hugging Face GPT-2 (and not one of our checkpoints)."""
    cfg = hf_dir_config(path)
    return cfg is not None and (cfg.get("model_type") == "gpt2" or GPT2_ARCH in (cfg.get("architectures") or []))


def read_hf_weights(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """The raw tensors of model.safetensors (preferred) or pytorch_model.bin, with a clear error when absent or corrupt."""
    hf_dir = Path(hf_dir)
    if (hf_dir / SAFETENSORS).is_file():
        path = hf_dir / SAFETENSORS
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}); download or copy it again.") from None
    if (hf_dir / PYTORCH_BIN).is_file():
        path = hf_dir / PYTORCH_BIN
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, foreign pickle, disallowed global: all mean "not plain tensors"
            raise CheckpointError(f"{path} is damaged or holds more than plain tensors ({type(e).__name__}); "
                                  "download or copy it again, or convert it to model.safetensors.") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path} does not hold a plain dict of tensors; it is not a GPT-2 weights file.")
        return state
    if any(hf_dir.glob("*.index.json")):
        raise CheckpointError(f"{hf_dir} holds sharded weights, which this kit does not read; save it unsharded "
                              "(save_pretrained(..., max_shard_size='100GB')).")
    raise CheckpointError(f"{hf_dir} has a GPT-2 config.json but no {SAFETENSORS} or {PYTORCH_BIN}; copy the weights file beside it.")


def state_from_hf(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF GPT-2 tensors renamed and transposed into our GPT's state dict (fp32; tied head once, mask buffers dropped)."""
    state = {}
    for key, value in hf_state.items():
        if key == TIED_KEY or key.endswith(BUFFERS):
            continue
        name = key if key.startswith(PREFIX) else PREFIX + key
        value = value.float()
        state[name] = value.t().contiguous() if name.endswith(CONV1D) else value
    return state


def load_hf(hf_dir: str | Path) -> tuple[GPT, dict[str, Any]]:
    """The GPT in a Hugging Face GPT-2 directory (eval mode, CPU) and a config.json-like meta in our format.

    The tokenizer is GPT-2's, unless the directory is one of our exports, whose config.json records its tokenizer spec.
    """
    hf_dir = Path(hf_dir)
    where = str(hf_dir / CONFIG)
    hf_cfg = read_json(hf_dir / CONFIG)
    config = config_from_hf(hf_cfg, where)
    spec = hf_cfg.get(TOKENIZER_KEY, {"name": "gpt2"})
    if not isinstance(spec, dict):
        raise CheckpointError(f"{where} has a damaged {TOKENIZER_KEY} entry; export the model again with python export_hf.py.")
    if spec.get("name") == "gpt2" and config.vocab_size < GPT2_VOCAB:
        raise CheckpointError(f"{where} has vocab_size {config.vocab_size} < {GPT2_VOCAB}: it does not use GPT-2's tokenizer, "
                              "the only one this kit can pair a Hugging Face model with.")
    hf_state = read_hf_weights(hf_dir)
    state = state_from_hf(hf_state)
    wte = state.get(PREFIX + "wte.weight")
    head = hf_state.get(TIED_KEY)
    if head is not None and wte is not None and (head.shape != wte.shape or not torch.equal(head.float(), wte)):
        raise CheckpointError(f"{hf_dir} has an lm_head that differs from its token embedding; this kit needs the tied head GPT-2 uses.")
    model = build_model(config, state, str(hf_dir))
    meta = {"kind": "fp32", "model": config.to_dict(), "tokenizer": spec, "train": {},
            "source": {"format": "huggingface", "path": str(hf_dir)}, "hf_config": hf_cfg}
    return model.eval(), meta


def hf_architecture(config: GPTConfig) -> str:
    """The transformers class an export of `config` is: GPT-2 for learned positions, GPT-NeoX for rotary; qk_norm is refused."""
    if config.qk_norm:
        raise CheckpointError(QK_NORM_REFUSAL)
    return NEOX_ARCH if config.rotary else GPT2_ARCH


def neox_config(config: GPTConfig) -> dict[str, Any]:
    """The model part of the config.json transformers.GPTNeoXForCausalLM needs for a rotary GPT of `config`.

    The rotary settings are written both the classic way (rotary_pct, rotary_emb_base) and as transformers 5's rope_parameters.
    """
    return {
        "model_type": "gpt_neox", "architectures": [NEOX_ARCH],
        "vocab_size": config.vocab_size, "max_position_embeddings": config.block_size, "hidden_size": config.n_embd,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head, "intermediate_size": 4 * config.n_embd,
        "hidden_act": HF_ACT[config.mlp], "layer_norm_eps": LN_EPS, "initializer_range": 0.02,
        "use_parallel_residual": False, "rotary_pct": 1.0, "rotary_emb_base": ROPE_BASE,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(ROPE_BASE), "partial_rotary_factor": 1.0},
        "attention_bias": config.bias, "hidden_dropout": config.dropout, "attention_dropout": config.dropout,
        "tie_word_embeddings": True, "bos_token_id": None, "eos_token_id": None, "torch_dtype": "float32",
    }


def hf_config(config: GPTConfig, tokenizer: Tokenizer | None) -> dict[str, Any]:
    """The config.json the transformers class of hf_architecture(config) needs for a GPT of `config`."""
    if hf_architecture(config) == NEOX_ARCH:
        cfg = neox_config(config)
    else:
        cfg = {
            "model_type": "gpt2", "architectures": [GPT2_ARCH],
            "vocab_size": config.vocab_size, "n_positions": config.block_size, "n_embd": config.n_embd,
            "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
            "activation_function": HF_ACT[config.mlp], "layer_norm_epsilon": LN_EPS, "initializer_range": 0.02,
            "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
            "scale_attn_weights": True, "tie_word_embeddings": True, "torch_dtype": "float32",
        }
    if tokenizer is not None:
        cfg[TOKENIZER_KEY] = tokenizer.spec
        if tokenizer.eot_token is not None:  # 50256 for GPT-2's tokenizer
            cfg["bos_token_id"] = cfg["eos_token_id"] = tokenizer.eot_token
    return cfg


def float_state(model: GPT) -> dict[str, torch.Tensor]:
    """Our GPT's weights as fp32 CPU tensors, the tied head once; a CheckpointError for a quantized model, which no export takes."""
    state = {}
    for key, value in model.state_dict().items():
        if key == TIED_KEY:
            continue
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise CheckpointError("This model is quantized (int8); export the fp32 checkpoint it was quantized from instead.")
        state[key] = value.detach().float().cpu()
    return state


def state_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """Our GPT's weights under GPT-2's key names with Conv1D-transposed weights; zero biases where ours has none."""
    state = {key: (value.t() if key.endswith(CONV1D) else value).contiguous() for key, value in float_state(model).items()}
    if not model.config.bias:  # GPT-2 has no bias-free variant: a zero bias computes the same thing
        for key in list(state):
            if (key.startswith(PREFIX + "h.") and key.endswith(".weight")) or key == PREFIX + "ln_f.weight":
                out_features = state[key].shape[-1] if key.endswith(CONV1D) else state[key].shape[0]
                state[key[: -len("weight")] + "bias"] = torch.zeros(out_features)
    return state


def neox_qkv(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Our fused c_attn weight or bias (rows [q; k; v], each split per head) with NeoX's row order: per head [q_h; k_h; v_h]."""
    return t.reshape(3, n_head, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()


def state_to_neox(model: GPT) -> dict[str, torch.Tensor]:
    """Our rotary GPT's weights under GPTNeoXForCausalLM's names, q/k/v rows regrouped per head.

    NeoX's attention has biases only with attention_bias (set to our bias); its MLP and LayerNorms always have them,
    so a bias-free model gets zero ones there: the function is unchanged. The tied head is embed_in, kept once.
    """
    ours = float_state(model)
    state = {"gpt_neox.embed_in.weight": ours.pop(PREFIX + "wte.weight")}
    names = {f"h.{i}.{src}": f"layers.{i}.{dst}" for i in range(model.config.n_layer) for src, dst in NEOX_LAYER.items()}
    names["ln_f"] = "final_layer_norm"
    for src, dst in names.items():
        weight = ours.pop(f"{PREFIX}{src}.weight")
        bias = ours.pop(f"{PREFIX}{src}.bias", None)
        if bias is None and ".attention." not in dst:
            bias = torch.zeros(weight.shape[0])
        if src.endswith("c_attn"):
            weight = neox_qkv(weight, model.config.n_head)
            bias = None if bias is None else neox_qkv(bias, model.config.n_head)
        state[f"gpt_neox.{dst}.weight"] = weight.contiguous()
        if bias is not None:
            state[f"gpt_neox.{dst}.bias"] = bias.contiguous()
    if ours:
        raise CheckpointError(f"This model has weights GPT-NeoX has no place for ({', '.join(sorted(ours))}); it cannot be exported.")
    return state


def export_hf(model: GPT, tokenizer: Tokenizer | None, out_dir: str | Path) -> Path:
    """Write `model` as a directory transformers.AutoModelForCausalLM.from_pretrained loads (model.safetensors + config.json)
    as the class hf_architecture names, with the tokenizer as GPT-2 tokenizer files (vocab.json, merges.txt) when given.

    The classic block is a GPT2LMHeadModel, a rotary one a GPTNeoXForCausalLM; qk_norm is refused before anything is written.
    A model trained with bias=False gets zero biases where the class has no bias-free option; the function is unchanged.
    Weights go first and config.json last, each atomically, so a crash never leaves a loadable-looking half directory.
    """
    out_dir = Path(out_dir)
    existing = hf_dir_config(out_dir) or {}
    if (out_dir / CONFIG).is_file() and not (is_hf_dir(out_dir) or existing.get("model_type") == "gpt_neox"):
        raise CheckpointError(f"{out_dir} already holds a checkpoint of this kit; export to another directory (--out).")
    state = state_to_neox(model) if hf_architecture(model.config) == NEOX_ARCH else state_to_hf(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tensors(out_dir / SAFETENSORS, state, {"format": "pt"})
    if tokenizer is not None:
        write_tokenizer_files(tokenizer, out_dir, model.config.block_size, model.config.vocab_size)
    write_json(out_dir / CONFIG, hf_config(model.config, tokenizer))
    return out_dir


@contextmanager
def neox_names_for_ctranslate2() -> Iterator[None]:
    """Lend CTranslate2 4.8's GPT-NeoX converter the two names transformers 5 dropped (config.rotary_pct,
    model.embed_out) while it converts a rotary export; our exports rotate the whole head, and the head is lm_head.
    Imports transformers (only here): for converting an export with ctranslate2.converters.TransformersConverter."""
    import transformers

    lent = []
    for cls, name, value in ((transformers.GPTNeoXConfig, "rotary_pct", 1.0),
                             (transformers.GPTNeoXForCausalLM, "embed_out", property(lambda self: self.lm_head))):
        if not hasattr(cls, name):
            setattr(cls, name, value)
            lent.append((cls, name))
    try:
        yield
    finally:
        for cls, name in lent:
            delattr(cls, name)

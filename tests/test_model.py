"""The GPT module: shapes, causality, the context limit, and KV-cached decoding equal to the plain forward, for the
classic GPT-2 block and its variants (rotary positions, ReLU², QK-norm)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_support import tiny_config

from model import config as config_module
from model.config import check_memory, memory_needed, param_count
from model.gpt import GPT

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"classic": {}, "rotary-relu2": {"rotary": True, "mlp": "relu2"}, "rotary-qknorm": {"rotary": True, "qk_norm": True}}


@pytest.fixture(params=list(VARIANTS))
def model(request) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config(**VARIANTS[request.param])).eval()


def test_shapes_and_loss(model):
    x = torch.randint(0, 256, (3, 16))
    logits, loss = model(x, x)
    assert logits.shape == (3, 16, 256)
    assert loss.shape == () and 4.5 < float(loss.detach()) < 6.5  # near ln(256) = 5.55 at init
    logits, loss = model(x[:, :5])
    assert logits.shape == (3, 5, 256) and loss is None
    assert model(x, last_only=True)[0].shape == (3, 1, 256)


def test_num_params_counts_tied_weights_once(model):
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - (0 if model.config.rotary else 16 * 32)  # learned positions are not counted
    assert model.lm_head.weight is model.transformer.wte.weight


def test_causality(model):
    x = torch.randint(0, 256, (2, 12))
    y = x.clone()
    y[:, 7] = (y[:, 7] + 1) % 256
    a, b = model(x)[0], model(y)[0]
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=0)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_sequence_longer_than_context_is_refused(model):
    with pytest.raises(ValueError, match="exceeds the context of 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_kv_cached_forward_equals_plain_forward(model):
    x = torch.randint(0, 256, (2, 16))
    full = model(x)[0]
    model.setup_caches(batch_size=2)
    prefill = model(x[:, :6], input_pos=torch.arange(6))[0]  # a prompt at once, then one token at a time
    torch.testing.assert_close(prefill, full[:, :6], rtol=1e-5, atol=1e-5)
    for t in range(6, 16):
        step = model(x[:, t:t + 1], input_pos=torch.tensor([t]))[0]
        torch.testing.assert_close(step[:, 0], full[:, t], rtol=1e-5, atol=1e-5)
    model.clear_caches()
    torch.testing.assert_close(model(x)[0], full)


def test_rotary_model_has_no_learned_positions_and_saves_no_tables():
    torch.manual_seed(0)
    model = GPT(tiny_config(rotary=True)).eval()
    assert "wpe" not in model.transformer and not any("wpe" in k for k in model.state_dict())
    assert not any("rope" in k for k in model.state_dict())  # the tables are rebuilt from the config, never saved
    x = torch.randint(0, 256, (1, 8))
    y = torch.cat([x[:, :1], x], dim=1)  # the same tokens one position later: rotary changes the logits
    assert not torch.allclose(model(x)[0][:, -1], model(y)[0][:, -1])


@pytest.mark.parametrize("bad,message", [({"mlp": "swish"}, "mlp must be one of gelu, relu2"),
                                         ({"rotary": True, "n_embd": 30, "n_head": 2}, "even head size")])
def test_impossible_variant_is_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**bad)


@pytest.mark.parametrize("variant", list(VARIANTS) + ["no-bias"])
def test_param_count_without_building_equals_the_model_s(variant):
    config = tiny_config(**({"bias": False} if variant == "no-bias" else VARIANTS[variant]))
    assert param_count(config) == GPT(config).num_params(non_embedding=False)


@pytest.mark.parametrize("shape,named", [({"vocab_size": 10**12}, "a vocabulary of 1,000,000,000,000"),
                                         ({"block_size": 10**10, "rotary": True}, "a context of 10,000,000,000 tokens"),
                                         ({"block_size": 10**10}, "a context of 10,000,000,000 tokens"),
                                         ({"n_embd": 100_000, "n_head": 4, "n_layer": 1}, "1 layer of width 100,000")])
def test_a_shape_too_big_for_this_machine_is_refused_before_anything_is_allocated(shape, named):
    """Every GPTConfig is checked against the machine's memory: one sentence saying how much, not an allocator failure."""
    with pytest.raises(ValueError, match="GB of memory to load and run, more than this machine's") as info:
        tiny_config(**shape)
    assert named in str(info.value) and "\n" not in str(info.value)


def test_the_memory_check_counts_weights_caches_and_training_state(monkeypatch):
    config = tiny_config()
    need, train_need = memory_needed(config), memory_needed(config, training=True)
    assert need > 4 * param_count(config) and train_need - need == 3 * 4 * param_count(config)
    monkeypatch.setattr(config_module, "machine_memory", lambda: need)
    check_memory(config)  # fits exactly
    with pytest.raises(ValueError, match=rf"needs about {train_need / 1e9:.1f} GB of memory to train"):
        check_memory(config, training=True)
    monkeypatch.setattr(config_module, "machine_memory", lambda: need - 1)
    with pytest.raises(ValueError, match="to load and run"):
        GPT(config)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_model_built_for_training_carries_no_kv_cache(variant):
    """A new GPT's only buffers are its rotary tables (for rotary variants): no KV cache, no mask over one. Generating
    adds them (setup_caches), clear_caches takes them away again."""
    model = GPT(tiny_config(**VARIANTS[variant]))
    tables = {"rope_cos", "rope_sin"} if model.config.rotary else set()
    assert {name for name, _ in model.named_buffers()} == tables
    model.setup_caches(2)
    assert {name for name, _ in model.named_buffers()} > tables
    model.clear_caches()
    assert {name for name, _ in model.named_buffers()} == tables


def test_importing_the_model_loads_only_the_model_its_config_and_torch():
    """model/gpt.py reads on its own: importing it brings no checkpoint, tokenizer, training or generation module."""
    code = "import sys, model.gpt; print(sorted(m for m in sys.modules if m == 'model' or m.startswith('model.')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["['model',", "'model.config',", "'model.gpt']"]


def test_the_attention_weights_are_the_forwards_own_and_causal(model):
    """need_weights returns each layer's softmax weights (B, H, T, T) from the same forward: the same logits as the
    fused path, each row summing to 1, nothing on a later position; over the KV cache, the rows of the same weights."""
    x = torch.randint(0, 256, (2, 10))
    logits, loss, weights = model(x, need_weights=True)
    torch.testing.assert_close(logits, model(x)[0], rtol=1e-5, atol=1e-5)
    assert loss is None and len(weights) == model.config.n_layer
    for w in weights:
        assert w.shape == (2, model.config.n_head, 10, 10)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, model.config.n_head, 10))
        assert torch.equal(w.triu(1), torch.zeros_like(w))  # no weight on a future token
    model.setup_caches(2)
    model(x[:, :6], input_pos=torch.arange(6))
    _, _, cached = model(x[:, 6:], input_pos=torch.arange(6, 10), need_weights=True)
    model.clear_caches()
    for w, c in zip(weights, cached, strict=True):  # the cache holds the context's 16 positions; 10 written
        torch.testing.assert_close(c[..., :10], w[:, :, 6:], rtol=1e-5, atol=1e-6)
        assert torch.equal(c[..., 10:], torch.zeros_like(c[..., 10:]))

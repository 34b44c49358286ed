"""The GPT module: shapes, causality, the context limit, and KV-cached decoding equal to the plain forward."""

from __future__ import annotations

import pytest
import torch
from train_support import tiny_config

from model.gpt import GPT


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config()).eval()


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
    assert model.num_params() == total - 16 * 32
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

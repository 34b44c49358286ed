"""The attention view's data (model/webapp/attention_view.py): the served int8 model's own weights of the prompt's last
position, the chart's table from the same forward, and the heatmap's rows, columns and percentages."""

from __future__ import annotations

import re

import pytest
import torch
from app_support import tiny_checkpoint

from model.formats.checkpoint import load_fp32
from model.generation.generate import prompt_tokens
from model.webapp import attention_view as av
from model.webapp.pool import ModelPool
from model.webapp.streaming import next_token_table

PROMPT = "ROMEO:\nWhat light through yonder window breaks?"


@pytest.fixture(scope="module")
def pool(tmp_path_factory, gpt2_tokenizer) -> ModelPool:
    return ModelPool(tiny_checkpoint(tmp_path_factory.mktemp("attention"), gpt2_tokenizer), copies=1)


def cells(page: str) -> list[list[float]]:
    """The heatmap's rows as numbers (each cell's exact percentage, from its title)."""
    return [[float(x) for x in re.findall(r'title="([\d.]+)%"', row)] for row in re.findall(r"<tr class.*?</tr>", page)]


def test_the_weights_are_the_served_int8_models_last_row_of_attention(pool):
    view = av.look(pool, PROMPT)
    ids = prompt_tokens(pool.first.tokenizer, PROMPT)
    cfg = pool.first.config
    assert view.weights.shape == (cfg.n_layer, cfg.n_head, len(ids)) and len(view.tokens) == len(ids)
    torch.testing.assert_close(view.weights.sum(-1), torch.ones(cfg.n_layer, cfg.n_head))
    assert "".join(view.tokens).replace("\u00b7", " ").replace("\\n", "\n") == PROMPT
    with torch.inference_mode():  # the int8 model's own forward, row of the last position
        _, _, served = pool.first.model(torch.tensor([ids]), need_weights=True)
        fp32, _ = load_fp32(pool.ckpt.parent / "fp32")
        _, _, unquantized = fp32(torch.tensor([ids]), need_weights=True)
    assert torch.equal(view.weights, torch.stack([w[0, :, -1] for w in served]))
    assert not torch.equal(view.weights, torch.stack([w[0, :, -1] for w in unquantized]))  # int8's, not fp32's
    # The chart, from the same forward: the /next_tokens endpoint's (its fused attention rounds a little otherwise)
    api = next_token_table(pool, PROMPT)
    assert view.table["probability"].tolist() == pytest.approx(api["probability"].tolist(), rel=1e-3)


def test_the_heatmap_has_a_row_per_token_and_a_column_per_layer_each_summing_to_100(pool):
    view = av.look(pool, PROMPT)
    page = av.heatmap_html(view)
    rows = cells(page)
    assert len(rows) == len(view.tokens) and all(len(r) == pool.first.config.n_layer for r in rows)
    for layer in range(pool.first.config.n_layer):
        assert sum(r[layer] for r in rows) == pytest.approx(100, abs=0.1 * len(rows))
    assert page.count('title="layer ') == pool.first.config.n_layer and "\u2192 next" in page and "averaged over the heads" in page
    one = av.heatmap_html(view, "head 2")
    assert "head 2" in one and cells(one) != rows  # one head is not the mean
    assert [r[0] for r in cells(one)] == pytest.approx((100 * view.weights[0, 1]).tolist(), abs=0.06)
    assert av.heatmap_html(view, "head 99") == page  # a head this model lacks (another model's choice): the mean


def test_a_long_prompt_shows_its_last_tokens_and_sums_the_earlier_ones(pool, monkeypatch):
    view = av.look(pool, " ".join(["word"] * 200))  # more tokens than the context: its last 64, as generation sees them
    assert len(view.tokens) == pool.first.config.block_size == 64
    assert len(cells(av.heatmap_html(view))) == av.SHOWN_TOKENS == 64
    monkeypatch.setattr(av, "SHOWN_TOKENS", 10)
    page = av.heatmap_html(view)
    rows = cells(page)
    assert len(rows) == 11 and "54 earlier tokens" in page
    assert rows[0] == pytest.approx((100 * view.weights.mean(1)[:, :54].sum(-1)).tolist(), abs=0.06)

"""What the "Under the hood" panel shows of a prompt, from one forward of the served model (its int8 weights and all):
the next-token table, and in each layer how much the prompt's last position, whose output predicts the next token,
attends to each token of the prompt. The weights are the model's own (GPT.forward with need_weights=True), drawn as
an HTML heatmap: a row per token, in the prompt's order, a column per layer, darker where the weight is larger."""

from __future__ import annotations

import html
from dataclasses import dataclass

import pandas as pd
import torch

from model.generation.generate import prompt_tokens
from model.webapp.pool import ModelPool
from model.webapp.streaming import top_tokens

MEAN = "all heads (mean)"  # the head choice that averages the heads
SHOWN_TOKENS = 64  # rows drawn at most: the prompt's last tokens; the weight on earlier ones is summed in one row

# The heatmap's look, in the page's CSS (server.py adds it). The table scrolls inside its box, which starts scrolled to
# its end (column-reverse), where the last tokens are; the header stays on top; a phone's 390 px hold 4 layers (L1..L4).
CSS = """
#attention-map .attention-scroll { max-height: 28rem; overflow: auto; display: flex; flex-direction: column-reverse; }
#attention-map table { border-collapse: collapse; font-size: 0.8rem; margin: 0; width: auto; }
#attention-map th, #attention-map td { border: 1px solid var(--border-color-primary); padding: 2px 5px; }
#attention-map thead th { position: sticky; top: 0; z-index: 1; background: var(--background-fill-primary); }
#attention-map .attention-caption { font-size: 0.8rem; margin: 0 0 4px 0; }
#attention-map tbody th { text-align: right; font-weight: normal; white-space: pre; font-family: var(--font-mono); }
#attention-map td { text-align: right; min-width: 2rem; font-variant-numeric: tabular-nums; }
#attention-map tr.last th { font-weight: bold; }
"""


@dataclass
class Look:
    """One forward over a prompt: its tokens as shown, the next-token table, and the attention weights of its last
    position over its tokens, (n_layer, n_head, T)."""

    tokens: list[str]
    table: pd.DataFrame
    weights: torch.Tensor


def token_label(text: str) -> str:
    """A token as a table row shows it: escapes for newlines and tabs, a middle dot for each space."""
    return repr(text)[1:-1].replace(" ", "\u00b7") or "''"


def look(pool: ModelPool, prompt: str) -> Look:
    """The panel's data for a prompt (the last context's worth of its tokens, as generation sees it). A plain forward
    reads no KV cache, so it runs beside the copy's batcher."""
    loaded = pool.first
    tokenizer = loaded.tokenizer
    ids = prompt_tokens(tokenizer, prompt)[-loaded.config.block_size:]
    with torch.inference_mode():
        # last_only: the output layer sees the last position alone, as next_token_table's forward (int8 quantizes
        # a layer's input with one scale over its rows, so the chart then matches the /next_tokens endpoint's)
        logits, _, weights = loaded.model(torch.tensor([ids]), last_only=True, need_weights=True)
    last = torch.stack([w[0, :, -1, :] for w in weights]).float()  # each layer's (H, T): the last query's row
    tokens = [token_label(tokenizer.decode([i])) for i in ids]
    return Look(tokens, top_tokens(tokenizer, logits[0, -1]), last)


def head_choices(n_head: int) -> list[str]:
    """The heads a visitor can look at: their mean, or one of them."""
    return [MEAN] + [f"head {h}" for h in range(1, n_head + 1)]


def chosen(weights: torch.Tensor, head: str) -> torch.Tensor:
    """(n_layer, T): the heads' mean, or the one head chosen (the mean for a choice this model does not have)."""
    n_head = weights.shape[1]
    if head in head_choices(n_head)[1:]:
        return weights[:, int(head.split()[1]) - 1]
    return weights.mean(dim=1)


def heatmap_html(view: Look, head: str = MEAN) -> str:
    """The heatmap as an HTML table: a row per prompt token (the last SHOWN_TOKENS; the weight on earlier ones summed
    in a first row), a column per layer; each cell the weight in percent (every column sums to 100), its shade growing
    with the weight (the square root, so that small weights still show)."""
    w = chosen(view.weights, head)  # (n_layer, T)
    n_layer, t = w.shape
    cut = max(0, t - SHOWN_TOKENS)
    head_row = "".join(f'<th scope="col" title="layer {layer + 1}">L{layer + 1}</th>' for layer in range(n_layer))
    rows = []
    if cut:
        rows.append(_row(f"{cut} earlier tokens", w[:, :cut].sum(dim=1), "earlier"))
    for i in range(cut, t):
        rows.append(_row(view.tokens[i] + (" \u2192 next" if i == t - 1 else ""), w[:, i], "last" if i == t - 1 else ""))
    which = "averaged over the heads" if head == MEAN or head not in head_choices(view.weights.shape[1]) else head
    caption = (f"Where the last token looks ({which}): each column is a layer (L1 the first), each row a token of the "
               "prompt; a cell is the share of the last token's attention on that token, in percent.")
    return (f'<p class="attention-caption">{html.escape(caption)}</p><div class="attention-scroll"><table>'
            f'<thead><tr><th scope="col">token</th>{head_row}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>')


def _row(label: str, weights: torch.Tensor, css_class: str) -> str:
    cells = []
    for x in weights.tolist():
        alpha = min(1.0, max(0.0, x)) ** 0.5
        ink = "#fff" if alpha > 0.6 else "inherit"
        cells.append(f'<td style="background: rgba(234, 88, 12, {alpha:.3f}); color: {ink}" title="{100 * x:.1f}%">'
                     f'{100 * x:.0f}</td>')
    return f'<tr class="{css_class}"><th scope="row">{html.escape(label)}</th>{"".join(cells)}</tr>'

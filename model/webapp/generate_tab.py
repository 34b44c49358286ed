"""The Generate tab: prompt, sampling settings, sequence boxes, and under the hood the next-token chart beside the
attention view (model/webapp/attention_view.py), with the /generate and /next_tokens endpoints. Which model serves a
request is asked per request, so a visitor's own model can serve it; with choose_model the tab also shows a "Model:
bundled / yours" choice (and the /use_model endpoint); the choice itself is kept by model/webapp/visitors.py."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr
import pandas as pd

from model.webapp.attention_view import CSS as ATTENTION_CSS
from model.webapp.attention_view import MEAN, head_choices, heatmap_html, look
from model.webapp.checks import InputError, check_request, prompt_text
from model.webapp.limits import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_SEQUENCES,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    MAX_NEW_TOKENS,
    MAX_PROMPT_CHARS,
    MAX_SEQUENCES,
)
from model.webapp.pool import ModelPool, model_card
from model.webapp.streaming import next_token_table, stream_sequences
from model.webapp.visitors import MODEL_CHOICES, ChooseModel, PoolFor

EXAMPLES = [
    "ROMEO:\n",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    "KING HENRY:\nOnce more unto the",
    "To be, or not to be",
]

FIRST_PROMPT = EXAMPLES[0]  # the prompt box starts with it, and the next-token chart is drawn for it
OFFER_CHARS = 60  # a prompt offered from a visitor's own text: the start of a line, at most this long
OFFER_EXAMPLES = 4  # examples offered from it: the starts of its first lines
OwnText = Callable[[gr.Request], str | None]  # the start of the text the visitor's own model trained on, if any

# Gradio hides a slider's min and max labels on screens up to 480 px wide; a phone's visitor needs them as much.
CSS = """
@media (width <= 480px) {
  #sampling .min_value, #sampling .max_value { display: inline !important; }
}
""" + ATTENTION_CSS


def line_start(line: str) -> str:
    """A line offered as a prompt: whole, with its newline, so the model writes the next line (as after "ROMEO:"), or,
    if longer than OFFER_CHARS, its start cut after a word."""
    if len(line) <= OFFER_CHARS:
        return line + "\n"
    cut = line[:OFFER_CHARS]
    return cut[:cut.rfind(" ")] if " " in cut.strip() else cut


def offers_from(text: str) -> list[str]:
    """The prompts offered for a model trained on text: the starts of its first OFFER_EXAMPLES distinct non-empty
    lines, the first of them in the prompt box. A text without one gets the bundled examples."""
    starts: list[str] = []
    for line in text.splitlines():
        start = line_start(line.strip())
        if line.strip() and start not in starts:
            starts.append(start)
        if len(starts) == OFFER_EXAMPLES:
            break
    return starts or list(EXAMPLES)


def build_generate_tab(pool: ModelPool, pool_for: PoolFor | None = None, choose_model: ChooseModel | None = None,
                       own_text: OwnText | None = None) -> None:
    """The tab's components and events, inside the enclosing gr.Blocks and gr.Tab. pool is the bundled model (the card
    describes it); pool_for(request) picks the model for each request, by default pool; choose_model, if given, backs a
    "Model: bundled / yours" radio whose choice pool_for then follows, and the card follows the choice. own_text(request)
    gives the start of the text the visitor's model trained on: choosing "yours" offers its first line as the prompt and
    its first lines as the examples (a model trained on a licence writes nonsense after "ROMEO:"); choosing "bundled"
    offers the bundled ones again."""
    pool_for = pool_for or (lambda request: pool)
    own_text = own_text or (lambda request: None)

    # A gr.Request parameter is filled by Gradio: it is not an API value (CheckedBlocks and the API docs skip it).
    def generate(prompt: str, max_new_tokens: float = DEFAULT_MAX_NEW_TOKENS, num_sequences: float = DEFAULT_SEQUENCES,
                 temperature: float = DEFAULT_TEMPERATURE, top_k: float = DEFAULT_TOP_K, top_p: float = DEFAULT_TOP_P,
                 seed: float = -1, request: gr.Request | None = None) -> Iterator[tuple[str, ...]]:
        served = pool_for(request)
        prompt, n, sampling, notes = check_request(prompt, max_new_tokens, num_sequences, temperature, top_k, top_p, seed, served)
        for note in notes:
            gr.Warning(note)
        for texts in stream_sequences(served, prompt, n, sampling, seeded=seed >= 0):  # seed: a number, checked
            yield tuple(texts)

    def next_tokens(prompt: str, request: gr.Request | None = None) -> pd.DataFrame:
        prompt = prompt_text(prompt, "to see what the model expects next")
        return next_token_table(pool_for(request), prompt[-MAX_PROMPT_CHARS:])

    # On the page a bad value (an empty prompt) is a warning that leaves the outputs as they were: a gr.Error would
    # cover every output with a red "Error" badge. The API endpoints keep the gr.Error, which tells a client it failed.
    @functools.wraps(generate)
    def generate_on_page(*values: Any) -> Iterator[tuple[Any, ...]]:
        try:
            yield from generate(*values)
        except InputError as e:
            gr.Warning(e.message)
            yield tuple(gr.skip() for _ in range(MAX_SEQUENCES))

    def hood_on_page(prompt: Any, head: Any, request: gr.Request) -> tuple[Any, str]:
        """The chart and the attention view always show the current prompt, from one forward: empty (no warning) while
        the prompt is."""
        try:
            prompt = prompt_text(prompt, "to see what the model expects next")
        except InputError:
            return None, ""
        view = look(pool_for(request), prompt[-MAX_PROMPT_CHARS:])
        return view.table, heatmap_html(view, head)

    def show_boxes(n: float) -> list[dict[str, Any]]:
        return [gr.update(visible=i < int(n)) for i in range(MAX_SEQUENCES)]

    def choose_on_page(choice: str, request: gr.Request) -> tuple[Any, ...]:
        """The card, the prompt and the examples of the model chosen, and the chart for that prompt on that model."""
        try:
            card_text = choose_model(choice, request)
        except InputError as e:  # only "yours" can fail, so the choice stays "bundled"
            gr.Warning(e.message)
            return "bundled", gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        text = own_text(request) if choice == "yours" else None
        offers = offers_from(text) if text is not None else list(EXAMPLES)
        heads = gr.Dropdown(choices=head_choices(pool_for(request).first.config.n_head), value=MEAN)  # its heads
        return (gr.skip(), card_text, *hood_on_page(offers[0], MEAN, request), heads, offers[0],
                gr.Dataset(samples=[[e] for e in offers]))

    if choose_model is not None:
        choice = gr.Radio(list(MODEL_CHOICES), value="bundled", label="Model",
                          info="bundled: the model this app ships with; yours: the one you trained in the Train tab",
                          elem_id="model-choice")
    card = gr.Markdown(model_card(pool), elem_id="model-card")
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(FIRST_PROMPT, label="Prompt", lines=4, elem_id="prompt",
                                placeholder="Type the start of a text, or click an example below")
            button = gr.Button("Generate", variant="primary", elem_id="generate")
            examples = gr.Examples(examples=[[e] for e in EXAMPLES], inputs=[prompt], label="Examples (click one)",
                                   elem_id="examples")
        with gr.Column(scale=1, elem_id="sampling"):
            max_new = gr.Slider(1, MAX_NEW_TOKENS, value=DEFAULT_MAX_NEW_TOKENS, step=1, label="max new tokens")
            num = gr.Slider(1, MAX_SEQUENCES, value=DEFAULT_SEQUENCES, step=1, label="number of sequences")
            temperature = gr.Slider(0, 2, value=DEFAULT_TEMPERATURE, step=0.05, label="temperature", info="0 = greedy")
            top_k = gr.Slider(0, 200, value=DEFAULT_TOP_K, step=1, label="top-k", info="0 = off")
            top_p = gr.Slider(0.05, 1, value=DEFAULT_TOP_P, step=0.05, label="top-p")
            seed = gr.Number(value=-1, precision=0, label="seed", elem_id="seed",
                             info="-1 = random; the same seed, prompt and settings give the same text")
    boxes = [gr.Textbox(label=f"Sequence {i + 1}", lines=6, visible=i < DEFAULT_SEQUENCES, elem_id=f"seq-{i + 1}")
             for i in range(MAX_SEQUENCES)]
    first = look(pool, FIRST_PROMPT)
    with gr.Accordion("Under the hood: what the model expects next, and where it looks", open=False, elem_id="under-the-hood"):
        with gr.Row():
            with gr.Column(min_width=300):
                gr.Markdown("Probabilities of the 10 most likely next tokens after the prompt as it is now (temperature 1, "
                            "before top-k/top-p); redrawn as you type.")
                chart = gr.BarPlot(first.table, x="token", y="probability", sort="-y", y_lim=[0, None], label="next token",
                                   height=360, x_label_angle=-90, elem_id="next-token-chart")
            with gr.Column(min_width=300):
                gr.Markdown("Attention: the next token is predicted from the prompt's last position, which in every "
                            "layer takes a weighted mean of what the tokens before it (and itself) pass on. The "
                            "darker a cell, the more that layer's last position looks at that token.")
                head = gr.Dropdown(head_choices(pool.first.config.n_head), value=MEAN, label="heads", elem_id="attention-head")
                attention = gr.HTML(heatmap_html(first), elem_id="attention-map")

    # preprocess=False: raw values reach check_request, whose errors name the parameter and its range.
    # The API endpoints have no trigger on the page (triggers=[]); the page's triggers call the *_on_page handlers.
    inputs = [prompt, max_new, num, temperature, top_k, top_p, seed]
    gr.on([], generate, inputs, boxes, api_name="generate", concurrency_id="model", preprocess=False)
    gr.on([button.click, prompt.submit], generate_on_page, inputs, boxes, api_visibility="private",
          concurrency_id="model", preprocess=False)
    gr.on([], next_tokens, [prompt], chart, api_name="next_tokens", concurrency_id="model", preprocess=False)
    # A changed prompt redraws the chart and the attention view (the latest prompt only: "always_last"), so they never
    # show an old prompt's; so does another head.
    gr.on([prompt.change, head.change], hood_on_page, [prompt, head], [chart, attention], api_visibility="private",
          concurrency_id="model", preprocess=False, trigger_mode="always_last", show_progress="hidden")
    num.change(show_boxes, [num], boxes, api_visibility="private", queue=False)
    if choose_model is not None:  # loading a visitor's model takes a moment: it waits in the "model" queue too
        gr.on([], choose_model, [choice], card, api_name="use_model", concurrency_id="model", preprocess=False)
        choice.input(choose_on_page, [choice], [choice, card, chart, attention, head, prompt, examples.dataset],
                     api_visibility="private", concurrency_id="model")

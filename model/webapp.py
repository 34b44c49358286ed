"""The Gradio app: a pool of loaded models, request checks, the streaming handler and the gr.Blocks UI."""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import queue
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the app never calls home

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from .checkpoint import CKPT_ENV, CheckpointError, default_checkpoint, read_json  # noqa: E402,F401  (re-exported)
from .config import GPTConfig  # noqa: E402
from .generate import SamplingConfig, prompt_tokens, slide_keep, stream  # noqa: E402
from .gpt import GPT  # noqa: E402
from .load import Loaded, load  # noqa: E402
from .trace import cached_forward  # noqa: E402

MAX_SEQUENCES = 5  # sequence boxes in the UI; the API returns one string per box
# The defaults of a request, in the UI and the API alike.
DEFAULT_SEQUENCES = 3
DEFAULT_MAX_NEW_TOKENS = 200
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 50
DEFAULT_TOP_P = 1.0
MAX_NEW_TOKENS = 500  # with MAX_SEQUENCES, bounds one request so it cannot starve the others
MAX_PROMPT_CHARS = 20_000  # longer prompts are cut (keeping the end) before tokenizing
UPDATE_INTERVAL_S = 0.05  # streamed text reaches the page at most 20 times a second: smooth, and cheap for Gradio
CONCURRENCY = 2  # requests generating at once: one per vCPU on a 2-vCPU Space, each with its own model copy
EXAMPLES = [
    "ROMEO:\n",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    "KING HENRY:\nOnce more unto the",
    "To be, or not to be",
]


class ModelPool:
    """CONCURRENCY copies of one checkpoint; each request borrows one, so no two share a KV cache."""

    def __init__(self, ckpt: str | Path, copies: int = CONCURRENCY):
        ckpt = Path(ckpt)
        if not ckpt.exists():
            raise CheckpointError(f"No checkpoint at {ckpt}: run python train.py then python quantize.py "
                                  f"(or pass --ckpt DIR, or set {CKPT_ENV}).")
        self.ckpt = ckpt
        self.size = max(1, copies)
        loaded = [load(ckpt, device="cpu") for _ in range(self.size)]
        self.first = loaded[0]  # its tokenizer and config serve request checks and the model card
        self.copies: queue.Queue[Loaded] = queue.Queue()
        for copy in loaded:
            self.copies.put(copy)

    def warm_up(self) -> None:
        """Before the first visitor: on every copy, make and optimize the traced one-token step for every number of
        sequences a request may ask for, and the window slide of the default request (about 1 s a copy here)."""
        block = self.first.config.block_size
        shapes = [(n, 1) for n in range(1, MAX_SEQUENCES + 1)] + [(DEFAULT_SEQUENCES, slide_keep(block))]
        for _ in range(self.size):
            with self.borrow() as loaded, torch.inference_mode():
                loaded.model.setup_caches(MAX_SEQUENCES)  # caches for the largest request: no request reallocates them
                for n, t in shapes:
                    forward = cached_forward(loaded.model, n, t)
                    for _ in range(2):  # TorchScript optimizes a trace over its first two calls
                        forward(torch.zeros(n, t, dtype=torch.long), torch.arange(t))

    @contextmanager
    def borrow(self) -> Iterator[Loaded]:
        """One model copy for the duration of a request (waits if all are busy)."""
        loaded = self.copies.get()
        try:
            yield loaded
        finally:
            self.copies.put(loaded)


CGROUP = Path("/sys/fs/cgroup")  # a container's CPU quota: cpu.max (cgroup v2) or cpu/cpu.cfs_quota_us (v1)


def _cpu_quota(cgroup: Path) -> int | None:
    """Whole CPUs allowed by a cgroup CPU quota (at least 1), or None when there is none or it cannot be read."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()  # v2: "QUOTA PERIOD" or "max PERIOD"
    except (OSError, ValueError):
        try:  # v1: quota -1 means none
            quota, period = ((cgroup / "cpu" / name).read_text().strip() for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
        except OSError:
            return None
    try:
        return max(1, int(quota) // int(period)) if int(quota) > 0 else None
    except ValueError:  # "max"
        return None


def available_cpus(cgroup: Path | None = None) -> int:
    """The CPUs this process may use: its affinity mask, capped by a container's CPU quota. A 2-vCPU Space runs on a
    bigger host, whose core count os.cpu_count() reports: threads sized by that would fight over 2 CPUs."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cpu_quota(cgroup or CGROUP)
    return max(1, min(n, quota) if quota else n)


def set_threads(concurrency: int = CONCURRENCY) -> int:
    """Give each concurrent request an equal share of the available CPUs; returns torch's thread count."""
    threads = max(1, available_cpus() // max(1, concurrency))
    torch.set_num_threads(threads)
    return threads


def model_card(pool: ModelPool) -> str:
    """Markdown facts about the served model: parameters, size, validation loss, tokenizer."""
    loaded = pool.first
    report = _optional_json(pool.ckpt / "report.json") or _optional_json(pool.ckpt / "metrics.json")
    params = report.get("params") or _param_count(loaded.config)
    size = report.get("size_int8_bytes") or sum(f.stat().st_size for f in pool.ckpt.glob("*.safetensors"))
    val = report.get("val_nats_per_char_int8") or report.get("val_nats_per_char")
    cfg = loaded.config
    rows = [
        f"**Parameters** {params / 1e6:.2f} M ({cfg.n_layer} layers, {cfg.n_head} heads, width {cfg.n_embd})",
        f"**Weights** {loaded.kind}, {size / 1e6:.1f} MB",
        f"**Validation loss** {val:.3f} nats/char" if isinstance(val, int | float) else "**Validation loss** not recorded",
        f"**Tokenizer** {loaded.tokenizer.name} ({loaded.tokenizer.n_vocab} tokens), context {cfg.block_size} tokens",
    ]
    return " · ".join(rows)


def _param_count(config: GPTConfig) -> int:
    """Parameters of a GPT of this shape (tied head once), counted on the meta device without allocating."""
    with torch.device("meta"):
        return GPT(config).num_params(non_embedding=False)


def _optional_json(path: Path) -> dict[str, Any]:
    try:
        return read_json(path)
    except CheckpointError:  # missing or damaged: the card falls back to what it can work out
        return {}


class InputError(gr.Error):
    """A bad request value: shown to the user, not logged with a traceback (the server is fine)."""

    def __init__(self, message: str):
        super().__init__(message, print_exception=False)


def _shown(value: Any) -> str:
    """value as an API caller wrote it (JSON: null, true, "4"), cut short, for a message."""
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(name: str, value: Any) -> float:
    """value as a finite float, else a gr.Error naming the parameter. Text, true/false and null are not numbers."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise InputError(f"{name} must be a number, got {_shown(value)}.")
    try:
        x = float(value)
    except OverflowError:  # an integer too large for a float
        x = math.inf
    if not math.isfinite(x):
        raise InputError(f"{name} must be a finite number, got {_shown(value)}.")
    return x


def _in_range(name: str, value: Any, low: float, high: float) -> float:
    """value as a float in [low, high], else a gr.Error saying which range."""
    x = _number(name, value)
    if not low <= x <= high:
        raise InputError(f"{name} must be between {low:g} and {high:g}, got {_shown(value)}.")
    return x


def _prompt_text(prompt: Any, purpose: str) -> str:
    """prompt if it is text with something in it, else a gr.Error saying what is wrong with it."""
    if not isinstance(prompt, str):
        raise InputError(f"The prompt must be text, got {_shown(prompt)}.")
    if not prompt.strip():
        raise InputError(f"The prompt is empty: type some text {purpose}.")
    return prompt


def complete_values(fn: Callable[..., Any], values: list[Any]) -> list[Any]:
    """values for fn's parameters, those left out at the end taking fn's defaults; a gr.Error if a value without a
    default is left out, or if there are more values than parameters."""
    params = [p for p in inspect.signature(fn).parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = ", ".join(p.name for p in params)
    if len(values) > len(params):
        raise InputError(f"{fn.__name__} takes at most {len(params)} values [{names}], got {len(values)}.")
    missing = params[len(values):]
    required = [p.name for p in missing if p.default is p.empty]
    if required:
        raise InputError(f"{', '.join(required)} is missing: {fn.__name__} takes the values [{names}] in this order; "
                         "those left out at the end take their defaults.")
    return [*values, *(p.default for p in missing)]


class _Blocks(gr.Blocks):
    """gr.Blocks that completes an API call sending fewer values than its event has inputs with the handler's defaults
    (Gradio itself logs a traceback and answers {"error": null}), and refuses one sending more (Gradio drops them)."""

    async def preprocess_data(self, block_fn: Any, inputs: list[Any], state: Any, explicit_call: bool = False) -> Any:
        if len(inputs) != len(block_fn.inputs):  # never from the page: only from a raw API call
            inputs = complete_values(block_fn.fn, inputs)
        return await super().preprocess_data(block_fn, inputs, state, explicit_call)


def check_request(prompt: Any, max_new_tokens: Any, num_sequences: Any, temperature: Any, top_k: Any, top_p: Any,
                  seed: Any, pool: ModelPool) -> tuple[str, int, SamplingConfig, list[str]]:
    """Validate one request: (prompt as the model will see it, sequences, sampling, notes for the user).

    Values out of range raise a gr.Error naming the parameter; a too-long prompt is cropped, with a note.
    """
    notes: list[str] = []
    prompt = _prompt_text(prompt, "for the model to continue")
    tokens = _in_range("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS)
    n = _in_range("num_sequences", num_sequences, 1, MAX_SEQUENCES)
    temp = _in_range("temperature", temperature, 0, 2)
    k = _in_range("top_k", top_k, 0, 1_000_000)
    p = _in_range("top_p", top_p, 1e-6, 1)
    s = _number("seed", seed)
    seed_value = random.randrange(2**31) if s < 0 else int(s) % 2**63

    if len(prompt) > MAX_PROMPT_CHARS:
        notes.append(f"The prompt has {len(prompt)} characters; only its last {MAX_PROMPT_CHARS} are used.")
        prompt = prompt[-MAX_PROMPT_CHARS:]
    tokenizer, block_size = pool.first.tokenizer, pool.first.config.block_size
    ids = tokenizer.encode(prompt)
    if len(ids) > block_size:
        notes.append(f"The prompt is {len(ids)} tokens but the model sees at most {block_size}: "
                     f"only its last {block_size} tokens are used.")
        prompt = tokenizer.decode_bytes(ids[-block_size:]).decode("utf-8", "ignore")  # a cut character is dropped
    sampling = SamplingConfig(max_new_tokens=int(tokens), temperature=temp,
                              top_k=int(min(k, tokenizer.n_vocab)) or None, top_p=p, seed=seed_value)
    return prompt, int(n), sampling, notes


def stream_sequences(pool: ModelPool, prompt: str, num_sequences: int, sampling: SamplingConfig,
                     interval: float | None = None) -> Iterator[list[str]]:
    """The full text of every sequence so far (always MAX_SEQUENCES strings): at once after the first decode step, then
    at most once per interval seconds (default UPDATE_INTERVAL_S), and at the end. Every update costs Gradio a few
    ms, more than a decode step."""
    interval = UPDATE_INTERVAL_S if interval is None else interval
    texts = [""] * num_sequences
    last, pending = -math.inf, False
    with pool.borrow() as loaded, torch.inference_mode():
        for new in stream(loaded.model, loaded.tokenizer, prompt, num_sequences, sampling, traced=True):
            texts = [t + piece for t, piece in zip(texts, new, strict=True)]
            pending = True
            if time.monotonic() - last >= interval:
                yield texts + [""] * (MAX_SEQUENCES - num_sequences)
                last, pending = time.monotonic(), False
    if pending:
        yield texts + [""] * (MAX_SEQUENCES - num_sequences)


def next_token_table(pool: ModelPool, prompt: str, k: int = 10) -> pd.DataFrame:
    """The k most likely next tokens after prompt (temperature 1), as rows of (token, probability)."""
    with pool.borrow() as loaded, torch.inference_mode():
        tokenizer, block_size = loaded.tokenizer, loaded.config.block_size
        ids = prompt_tokens(tokenizer, prompt)[-block_size:]
        logits, _ = loaded.model(torch.tensor([ids]), last_only=True)
    probs = torch.softmax(logits[0, -1, :tokenizer.n_vocab].float(), dim=-1)
    top = torch.topk(probs, k)
    labels = [f"{rank}. {tokenizer.decode([int(i)])!r}" for rank, i in enumerate(top.indices.tolist(), 1)]
    return pd.DataFrame({"token": labels, "probability": top.values.tolist()})


def build_demo(pool: ModelPool) -> gr.Blocks:
    """The UI; its "generate" endpoint takes prompt (named) and returns one string per sequence box."""

    def generate(prompt: str, max_new_tokens: float = DEFAULT_MAX_NEW_TOKENS, num_sequences: float = DEFAULT_SEQUENCES,
                 temperature: float = DEFAULT_TEMPERATURE, top_k: float = DEFAULT_TOP_K, top_p: float = DEFAULT_TOP_P,
                 seed: float = -1) -> Iterator[tuple[str, ...]]:
        prompt, n, sampling, notes = check_request(prompt, max_new_tokens, num_sequences, temperature, top_k, top_p, seed, pool)
        for note in notes:
            gr.Warning(note)
        for texts in stream_sequences(pool, prompt, n, sampling):
            yield tuple(texts)

    def next_tokens(prompt: str) -> pd.DataFrame:
        prompt = _prompt_text(prompt, "to see what the model expects next")
        return next_token_table(pool, prompt[-MAX_PROMPT_CHARS:])

    # On the page a bad value (an empty prompt) is a warning that leaves the outputs as they were: a gr.Error would
    # cover every output with a red "Error" badge. The API endpoints keep the gr.Error, which tells a client it failed.
    @functools.wraps(generate)
    def generate_on_page(*values: Any) -> Iterator[tuple[Any, ...]]:
        try:
            yield from generate(*values)
        except InputError as e:
            gr.Warning(e.message)
            yield tuple(gr.skip() for _ in range(MAX_SEQUENCES))

    @functools.wraps(next_tokens)
    def next_tokens_on_page(prompt: Any) -> Any:
        try:
            return next_tokens(prompt)
        except InputError as e:
            gr.Warning(e.message)
            return gr.skip()

    def show_boxes(n: float) -> list[dict[str, Any]]:
        return [gr.update(visible=i < int(n)) for i in range(MAX_SEQUENCES)]

    with _Blocks(title="smallgpt") as demo:
        gr.Markdown("# smallgpt\nA small GPT trained on one text file, quantized to int8, running on CPU. "
                    "Type the start of a text; the model continues it.")
        gr.Markdown(model_card(pool), elem_id="model-card")
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", lines=4, placeholder="Type the start of a text, or click an example below",
                                    elem_id="prompt")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                gr.Examples(examples=[[e] for e in EXAMPLES], inputs=[prompt], label="Examples (click one)")
            with gr.Column(scale=1):
                max_new = gr.Slider(1, MAX_NEW_TOKENS, value=DEFAULT_MAX_NEW_TOKENS, step=1, label="max new tokens")
                num = gr.Slider(1, MAX_SEQUENCES, value=DEFAULT_SEQUENCES, step=1, label="number of sequences")
                temperature = gr.Slider(0, 2, value=DEFAULT_TEMPERATURE, step=0.05, label="temperature", info="0 = greedy")
                top_k = gr.Slider(0, 200, value=DEFAULT_TOP_K, step=1, label="top-k", info="0 = off")
                top_p = gr.Slider(0.05, 1, value=DEFAULT_TOP_P, step=0.05, label="top-p")
                seed = gr.Number(value=-1, precision=0, label="seed", info="-1 = random; same seed, same text")
        boxes = [gr.Textbox(label=f"Sequence {i + 1}", lines=6, visible=i < DEFAULT_SEQUENCES, elem_id=f"seq-{i + 1}")
                 for i in range(MAX_SEQUENCES)]
        with gr.Accordion("Under the hood: what the model expects next", open=False):
            gr.Markdown("Probabilities of the 10 most likely next tokens after the prompt (temperature 1, before top-k/top-p).")
            probe = gr.Button("Show next-token probabilities")
            chart = gr.BarPlot(x="token", y="probability", sort="-y", label="next token", height=320,
                                elem_id="next-token-chart")

        # preprocess=False: raw values reach check_request, whose errors name the parameter and its range.
        # The API endpoints have no trigger on the page (triggers=[]); the page's triggers call the *_on_page handlers.
        inputs = [prompt, max_new, num, temperature, top_k, top_p, seed]
        gr.on([], generate, inputs, boxes, api_name="generate", concurrency_id="model", preprocess=False)
        gr.on([button.click, prompt.submit], generate_on_page, inputs, boxes, api_visibility="private",
              concurrency_id="model", preprocess=False)
        gr.on([], next_tokens, [prompt], chart, api_name="next_tokens", concurrency_id="model", preprocess=False)
        probe.click(next_tokens_on_page, [prompt], chart, api_visibility="private", concurrency_id="model", preprocess=False)
        num.change(show_boxes, [num], boxes, api_visibility="private", queue=False)
    return demo


def launch(pool: ModelPool, host: str | None = None, port: int | None = None, share: bool = False,
           prevent_thread_lock: bool = False) -> gr.Blocks:
    """Serve the app, as many requests at once as the pool has copies; on Spaces (SPACE_ID set) on 0.0.0.0:7860."""
    if os.environ.get("SPACE_ID"):
        host, port, share = host or "0.0.0.0", port or 7860, False
    set_threads(pool.size)
    pool.warm_up()
    demo = build_demo(pool)
    demo.queue(default_concurrency_limit=pool.size, max_size=64)
    demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=prevent_thread_lock,
                footer_links=["api", "gradio"], ssr_mode=False)
    return demo

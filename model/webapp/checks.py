"""What a request may ask for: its defaults and limits, and the checks that turn raw values (from the page or any API
client) into one clear gr.Error naming the parameter, never a traceback."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gradio as gr
from gradio.exceptions import InvalidPathError
from gradio.queueing import Event, Queue
from gradio.utils import get_function_params
from gradio_client.utils import is_file_obj_with_meta, traverse
from pydantic import ValidationError

from model.generation.generate import SamplingConfig
from model.webapp.limits import (
    MAX_NEW_TOKENS,
    MAX_PROMPT_CHARS,
    MAX_SEQUENCES,
)

if TYPE_CHECKING:
    from model.webapp.pool import ModelPool

class InputError(gr.Error):
    """A bad request value: shown to the user, not logged with a traceback (the server is fine)."""

    def __init__(self, message: str):
        super().__init__(message, print_exception=False)


def shown(value: Any) -> str:
    """value as an API caller wrote it (JSON: null, true, "4"), cut short, for a message."""
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(name: str, value: Any) -> float:
    """value as a finite float, else a gr.Error naming the parameter. Text, true/false and null are not numbers."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise InputError(f"{name} must be a number, got {shown(value)}.")
    try:
        x = float(value)
    except OverflowError:  # an integer too large for a float
        x = math.inf
    if not math.isfinite(x):
        raise InputError(f"{name} must be a finite number, got {shown(value)}.")
    return x


def _in_range(name: str, value: Any, low: float, high: float) -> float:
    """value as a float in [low, high], else a gr.Error saying which range."""
    x = _number(name, value)
    if not low <= x <= high:
        raise InputError(f"{name} must be between {low:g} and {high:g}, got {shown(value)}.")
    return x


def prompt_text(prompt: Any, purpose: str) -> str:
    """prompt if it is text with something in it, else a gr.Error saying what is wrong with it."""
    if not isinstance(prompt, str):
        raise InputError(f"The prompt must be text, got {shown(prompt)}.")
    if not prompt.strip():
        raise InputError(f"The prompt is empty: type some text {purpose}.")
    return prompt


def check_request(prompt: Any, max_new_tokens: Any, num_sequences: Any, temperature: Any, top_k: Any, top_p: Any,
                  seed: Any, pool: ModelPool) -> tuple[list[int], int, SamplingConfig, list[str]]:
    """Validate one request: (the prompt's token ids as the model will see them, sequences, sampling, notes for the
    user). Where a prompt from the page or the API enters: tokenized and cropped here, once.

    Values out of range raise a gr.Error naming the parameter; a too-long prompt is cropped, with a note.
    """
    notes: list[str] = []
    prompt = prompt_text(prompt, "for the model to continue")
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
        ids = ids[-block_size:]
    sampling = SamplingConfig(max_new_tokens=int(tokens), temperature=temp,
                              top_k=int(min(k, tokenizer.n_vocab)) or None, top_p=p, seed=seed_value)
    return ids, int(n), sampling, notes


def complete_values(fn: Callable[..., Any], values: list[Any]) -> list[Any]:
    """values for fn's parameters, those left out at the end taking fn's defaults; a gr.Error if a value without a
    default is left out, or if there are more values than parameters. Parameters Gradio fills itself (a gr.Request)
    take no value: Gradio's own list of API parameters leaves them out."""
    params = get_function_params(fn)  # (name, has_default, default, type hint)
    names = ", ".join(name for name, *_ in params)
    if len(values) > len(params):
        raise InputError(f"{fn.__name__} takes at most {len(params)} values [{names}], got {len(values)}.")
    missing = params[len(values):]
    required = [name for name, has_default, *_ in missing if not has_default]
    if required:
        raise InputError(f"{', '.join(required)} is missing: {fn.__name__} takes the values [{names}] in this order; "
                         "those left out at the end take their defaults.")
    return [*values, *(default for _, _, default, _ in missing)]


def file_error(fn: Callable[..., Any], blocks: list[Any], values: list[Any]) -> InputError:
    """The one sentence for a call whose values Gradio's file handling refused: a file input given something that is
    not an upload of this server, or a file sent where no file belongs. It names the first such parameter."""
    names = [name for name, *_ in get_function_params(fn)]
    for name, block, value in zip(names, blocks, values, strict=False):
        takes_file = getattr(block, "data_model", None) is not None
        if takes_file and value is not None:
            return InputError(f"{name} must be a file uploaded to this server (upload it first: gradio_client's "
                              f"handle_file does), or null; got {shown(value)}.")
        if not takes_file and _holds_file(value):
            return InputError(f"{name} cannot be a file, got {shown(value)}.")
    return InputError("A value is not a valid file: send files as uploads to this server (gradio_client's handle_file).")


def _odd_file_meta(value: Any) -> bool:
    """Whether value is or holds a dict with a text "path" and a "meta" that is not an object: Gradio's file check
    (gradio_client's is_file_obj_with_meta calls meta.get) raises AttributeError on it, a traceback and {"error": null}."""
    if isinstance(value, dict):
        if isinstance(value.get("path"), str) and "meta" in value and not isinstance(value["meta"], dict):
            return True
        return any(_odd_file_meta(v) for v in value.values())
    if isinstance(value, list):
        return any(_odd_file_meta(v) for v in value)
    return False


def _holds_file(value: Any) -> bool:
    """Whether value is or holds a file object (FileData with its meta), which Gradio checks as a file wherever it is."""
    found: list[Any] = []
    traverse(value, found.append, is_file_obj_with_meta)
    return bool(found)


EMPTY_SESSION = "session_hash must not be empty: leave it out, or send any non-empty text that names your session."


class GuardedQueue(Queue):
    """Gradio's queue, kept running whatever the API calls. Gradio 6.31 keeps each session's messages under the
    call's session_hash but sends them under the Event's, which is the event's own id when session_hash is "": the
    first message to such a call raises a KeyError, and when that happens in the queue's loop (telling the waiting
    calls their rank) the loop ends and every later call gets 503 "Queue is stopped" (docs/app.md, "A burst of API
    calls"). An empty session_hash is refused before it reaches the queue; and a message to a session whose messages
    are no longer kept (its reader left, or Gradio's cache of 2,000 sessions let it go) is dropped, as Gradio already
    drops those to an event whose reader left, instead of stopping the queue."""

    async def push(self, body: Any, request: Any, username: str | None) -> tuple[bool, Any, Any]:
        if body.session_hash == "":
            return False, EMPTY_SESSION, "error"  # HTTP 400 with this detail
        return await super().push(body, request, username)

    def send_message(self, event: Event, event_message: Any) -> None:
        if event.session_hash not in self.pending_messages_per_session:
            return
        super().send_message(event, event_message)


class CheckedBlocks(gr.Blocks):
    """gr.Blocks that completes an API call sending fewer values than its event has inputs with the handler's defaults
    (Gradio itself logs a traceback and answers {"error": null}), refuses one sending more (Gradio drops them), and
    answers one sending a value that is not valid file data with one sentence (Gradio: a traceback, {"error": null}).
    Its queue is a GuardedQueue, which no sequence of API calls stops."""

    def queue(self, *args: Any, **kwargs: Any) -> CheckedBlocks:
        super().queue(*args, **kwargs)
        self._queue.__class__ = GuardedQueue  # Gradio makes its Queue inside queue(); the subclass adds no state
        return self

    async def preprocess_data(self, block_fn: Any, inputs: list[Any], state: Any, explicit_call: bool = False) -> Any:
        if len(inputs) != len(block_fn.inputs):  # never from the page: only from a raw API call
            inputs = complete_values(block_fn.fn, inputs)
        for (name, *_), value in zip(get_function_params(block_fn.fn), inputs, strict=False):
            if _odd_file_meta(value):
                raise InputError(f"{name} holds a file object whose meta is not an object, got {shown(value)}; send files as "
                                 "uploads to this server (gradio_client's handle_file).")
        try:
            return await super().preprocess_data(block_fn, inputs, state, explicit_call)
        except (ValidationError, InvalidPathError):  # Gradio's file checks: FileData's model, or a path not uploaded
            raise file_error(block_fn.fn, block_fn.inputs, inputs) from None

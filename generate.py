"""Generate text from a checkpoint, streamed to the terminal; without --prompt, an interactive session.

    python generate.py --prompt "ROMEO:" --num-samples 3 --max-new-tokens 200 --top-k 50 --seed 1
    python generate.py                      # interactive: type a prompt; /help lists the commands
Default --ckpt: out/int8 if it exists, else out.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from model import numpy_gpt
from model.config import check_generation
from model.formats.checkpoint import CheckpointError
from model.formats.load import Loaded, load
from model.generation import generate as generation
from model.generation.generate import DEFAULT_SAMPLING, GENERATION_THREADS, SETTINGS, SamplingConfig, stream, with_setting
from model.tokenizer import TokenizerError

SETTABLE = ("num_samples", *SETTINGS)  # what /set can change
HELP = """Type a prompt and press Enter to continue it. Commands:
  /help                 this text
  /settings             show the current settings
  /set NAME VALUE       change one, e.g. /set temperature 0.8, /set top_k off, /set stop \\n\\n
  /reset                back to the settings given on the command line
  /quit                 leave (Ctrl-D too; Ctrl-C stops a generation)"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default=None, help="checkpoint directory (default: out/int8 if it exists, else out)")
    p.add_argument("--prompt", default=None, help="text to continue; leave out for an interactive session")
    p.add_argument("--num-samples", type=int, default=1, help="return sequences, decoded together (default 1)")
    d = DEFAULT_SAMPLING  # the defaults of a request, as the app's
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help=f"new tokens per sample; past the context the window slides (default {d.max_new_tokens})")
    p.add_argument("--temperature", type=float, default=d.temperature, help=f"0 means greedy (default {d.temperature})")
    p.add_argument("--top-k", type=int, default=d.top_k, help=f"sample among the k likeliest tokens; 0 is off (default {d.top_k})")
    p.add_argument("--top-p", type=float, default=d.top_p, help=f"nucleus sampling; 1.0 is off (default {d.top_p})")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL-style, >1 discourages repeats; 1.0 is off")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="subtracted per earlier occurrence; 0 is off")
    p.add_argument("--stop", action="append", default=[], help="stop at this text (repeatable); <|endoftext|> always stops")
    p.add_argument("--seed", type=int, default=None, help="same seed, same text (default: random)")
    p.add_argument("--threads", type=int, default=GENERATION_THREADS,
                   help=f"torch CPU threads (default {GENERATION_THREADS}: fastest for small models, quiet or busy CPU)")
    p.add_argument("--engine", choices=("torch", "numpy"), default="torch", help="numpy: model/numpy_gpt.py's NumPy forward, "
                   "to step through in a debugger (fp32 checkpoints, default out; no penalties; slow). Default torch: the engine")
    args = p.parse_args(argv)
    if args.num_samples < 1 or args.threads < 1:
        p.error("--num-samples and --threads must be at least 1.")
    return args


def default_ckpt() -> str:
    return "out/int8" if Path("out/int8").is_dir() else "out"


def show(loaded: Loaded, prompt: str, num_samples: int, sampling: SamplingConfig) -> None:
    """Stream sample 1 live while all samples decode together; then print the others, each under a header, and on
    stderr one line: tokens, seconds, tokens/s."""
    texts = [""] * num_samples
    header = (lambda i: f"\n--- sample {i + 1}/{num_samples} ---\n") if num_samples > 1 else (lambda i: "")
    print(header(0) + prompt, end="", flush=True)
    steps, start = 0, time.perf_counter()
    try:
        for new in engine_stream(loaded, prompt, num_samples, sampling):
            steps += 1
            print(new[0], end="", flush=True)
            texts = [t + n for t, n in zip(texts, new, strict=True)]
    finally:
        seconds = time.perf_counter() - start
        for i in range(1, num_samples):
            print(header(i) + prompt + texts[i], end="")
        print(flush=True)
        print(speed_line(steps * num_samples, seconds), file=sys.stderr, flush=True)


def engine_stream(loaded: Loaded, prompt: str, num_samples: int, sampling: SamplingConfig) -> Iterator[list[str]]:
    """stream() on the torch engine, or on the NumPy forward when loaded holds a numpy_gpt.NumpyGPT (--engine numpy)."""
    if not isinstance(loaded.model, numpy_gpt.NumpyGPT):
        return stream(loaded.model, loaded.tokenizer, prompt, num_samples, sampling)
    ids = generation.prompt_tokens(loaded.tokenizer, prompt, loaded.config.block_size)
    steps = numpy_gpt.decode_tokens(loaded.model, ids, num_samples, sampling, loaded.tokenizer.n_vocab)
    return generation.texts(loaded.tokenizer, steps, num_samples, sampling)


def speed_line(tokens: int, seconds: float) -> str:
    """One line on the speed of a generation: tokens, seconds, tokens/s."""
    return f"{tokens} tokens in {seconds:.2f} s: {tokens / max(seconds, 1e-9):.1f} tokens/s"


def interactive(loaded: Loaded, num_samples: int, sampling: SamplingConfig) -> None:
    """A prompt loop with /help, /settings, /set NAME VALUE, /reset and /quit."""
    start = (num_samples, sampling)
    print(f"{loaded.kind} model, context {loaded.config.block_size} tokens. /help for commands.")
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        cmd, *rest = line.strip().split(maxsplit=2) or [""]
        if cmd in ("/quit", "/exit"):
            return
        elif cmd == "/help":
            print(HELP)
        elif cmd == "/settings":
            print(f"  num_samples = {num_samples}")
            for f in dataclasses.fields(sampling):
                print(f"  {f.name} = {getattr(sampling, f.name)!r}")
        elif cmd == "/reset":
            num_samples, sampling = start
            print("settings reset to the command line's.")
        elif cmd == "/set":
            try:
                if len(rest) != 2:
                    raise ValueError(f"usage: /set NAME VALUE, NAME one of: {', '.join(SETTABLE)}.")
                name, value = rest
                if name not in SETTABLE:
                    raise ValueError(f"unknown setting {name!r}; choose one of: {', '.join(SETTABLE)}.")
                if name == "num_samples":
                    try:
                        n = int(value)
                    except ValueError:
                        raise ValueError(f"{value!r} is not a valid value for num_samples.") from None
                    if n < 1:
                        raise ValueError("num_samples must be at least 1.")
                    check_generation(loaded.config, n, sampling.max_new_tokens)
                    num_samples = n
                    print(f"  num_samples = {num_samples}")
                else:
                    changed = with_setting(sampling, name, value)
                    check_generation(loaded.config, num_samples, changed.max_new_tokens)
                    sampling = changed
                    print(f"  {name} = {getattr(sampling, name)!r}")
            except ValueError as e:
                print(f"error: {e}")
        elif cmd.startswith("/"):
            print(f"error: unknown command {cmd}; /help lists them.")
        elif line.strip():
            try:
                show(loaded, line, num_samples, sampling)
            except KeyboardInterrupt:
                print("\n(stopped)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                                  frequency_penalty=args.frequency_penalty, stop=tuple(args.stop), seed=args.seed)
        if args.engine == "numpy":
            np_model = numpy_gpt.load(args.ckpt or "out")
            loaded = Loaded(np_model, np_model.tokenizer, np_model.config, "fp32", np_model.meta)
        else:
            loaded = load(args.ckpt or default_ckpt())
        check_generation(loaded.config, args.num_samples, sampling.max_new_tokens)  # before the samples' caches exist
        if args.prompt is None:
            interactive(loaded, args.num_samples, sampling)
        else:
            show(loaded, args.prompt, args.num_samples, sampling)
    except (CheckpointError, TokenizerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

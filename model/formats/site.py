"""A checkpoint as a static web site: the int8 model runs in the visitor's browser (onnxruntime-web, WebAssembly), so
the site needs no server; any static host serves it, a Hugging Face static Space (free for every account) included.

The folder is self-contained: the page (web/index.html, app.js, style.css), the runtime files copied from web/'s pinned
npm packages (vendor/), the model (onnx/model.onnx, onnx/model_quantized.onnx, written by model/formats/onnx.py),
tokenizer.json, config.json in the layout transformers.js loads, smallgpt.json for the page, and a README with the
Space's front matter. The page requests nothing from any other host.
"""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from model import atomic
from model.formats import onnx
from model.formats.checkpoint import CheckpointError, read_config
from model.formats.hf import hf_config
from model.formats.hf_tokenizer import TOKENIZER_CONFIG, TOKENIZER_JSON, tokenizer_config, tokenizer_json
from model.formats.load import load
from model.generation.engine import slide_keep
from model.tokenizer import Tokenizer

WEB = Path(__file__).resolve().parents[2] / "web"  # the page's sources and its package.json
PAGE_FILES = ("index.html", "app.js", "style.css")
# (package folder in web/node_modules, file in it, name in vendor/): what the page imports, and the licences.
VENDOR = (
    ("onnxruntime-web", "dist/ort.wasm.min.mjs", "ort.wasm.min.mjs"),
    ("onnxruntime-web", "dist/ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.mjs"),
    ("onnxruntime-web", "dist/ort-wasm-simd-threaded.wasm", "ort-wasm-simd-threaded.wasm"),
    ("@huggingface/tokenizers", "dist/tokenizers.min.mjs", "tokenizers.min.mjs"),
    ("@huggingface/tokenizers", "LICENSE", "LICENSE.tokenizers.txt"),
)
MARKER = ".smallgpt-site"  # in every folder this writes: one it may replace
PAGE_LIMIT_BYTES = 200_000_000  # above this the int8 model is too large for most visitors' browsers: a warning
SETTINGS = "smallgpt.json"

README = """\
---
title: {title}
emoji: ✍️
colorFrom: indigo
colorTo: yellow
sdk: static
app_file: index.html
pinned: false
short_description: A small GPT that runs in your browser, no server
---

# {title}

A small GPT trained with smallgpt on one text file, quantized to int8 and run in your browser by onnxruntime-web
(WebAssembly): nothing you type leaves your computer, and once loaded the page works offline.
Type the start of a text; the model writes up to five continuations, streamed token by token.

{card}
Files: `onnx/model_quantized.onnx` (int8, what the page runs, {int8_mb:.1f} MB), `onnx/model.onnx` (fp32,
{fp32_mb:.1f} MB), `tokenizer.json`, `config.json`.

Serve it anywhere static: `python -m http.server` in this folder, then http://127.0.0.1:8000.
"""


@dataclass
class Site:
    """What export_site wrote: the folder, the int8 model's size, and a warning when it is too large for a page."""

    path: Path
    int8_bytes: int
    fp32_bytes: int
    checks: dict[str, float]
    warning: str | None = None


def vendor_sources() -> list[tuple[Path, str]]:
    """The runtime files to copy (source, name in vendor/); CheckpointError when `npm ci --prefix web` has not run."""
    web = WEB
    sources = [(web / "node_modules" / package / file, name) for package, file, name in VENDOR]
    missing = [str(src) for src, _ in sources if not src.is_file()]
    if missing:
        raise CheckpointError(f"The page's runtime files are missing ({missing[0]}); install them once with: npm ci --prefix web")
    return sources


def versions() -> str:
    """vendor/VERSIONS.txt: each copied package's name, version and licence, from its package.json."""
    web = WEB
    lines = []
    for package in dict.fromkeys(package for package, _, _ in VENDOR):
        meta = json.loads((web / "node_modules" / package / "package.json").read_text(encoding="utf-8"))
        lines.append(f"{meta['name']} {meta['version']} ({meta.get('license', 'see its package')} licence), from npm\n")
    return "".join(lines)


def settings(model_config, tokenizer: Tokenizer, title: str, card: str, sizes: dict[str, int]) -> dict:
    """smallgpt.json: what the page needs to run the model as the engine does."""
    if tokenizer.eot_token is None:
        raise CheckpointError("This model's tokenizer has no <|endoftext|>, which the page starts an empty prompt from; "
                              "train it with --tokenizer gpt2-compact, gpt2 or bytes.")
    return {"title": title, "card": card, "block_size": model_config.block_size, "n_layer": model_config.n_layer,
            "n_head": model_config.n_head, "n_embd": model_config.n_embd, "vocab_size": model_config.vocab_size,
            "n_vocab": tokenizer.n_vocab, "eot": tokenizer.eot_token, "keep": slide_keep(model_config.block_size),
            "files": sizes}


def export_site(ckpt: str | Path, out_dir: str | Path, title: str = "smallgpt") -> Site:
    """Write the static site of an fp32 checkpoint (ours or a Hugging Face GPT-2 folder) into out_dir, replacing an
    earlier export there, never another folder; nothing is left half-written."""
    ckpt, out_dir = Path(ckpt), Path(out_dir)
    if ckpt.resolve() == out_dir.resolve():
        raise CheckpointError(f"--out {out_dir} is the checkpoint itself; write the site to another folder.")
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MARKER).exists())):
        raise CheckpointError(f"{out_dir} exists and is not an earlier site export; pass an empty or new folder to --out.")
    if ckpt.is_dir() and (ckpt / "config.json").is_file() and read_config(ckpt).get("kind") == "int8":
        raise CheckpointError(f"{ckpt} is an int8 checkpoint; pass the fp32 checkpoint it was quantized from "
                              "(e.g. --ckpt out): the site makes its own int8 file from it.")
    vendor = vendor_sources()
    loaded = load(ckpt)
    model, tokenizer = loaded.model.float().eval(), loaded.tokenizer
    with atomic.atomic_dir(out_dir) as tmp:
        fp32_path, int8_path = tmp / "onnx" / onnx.MODEL, tmp / "onnx" / onnx.MODEL_INT8
        onnx.export_onnx(model, fp32_path)
        onnx.quantize_onnx(fp32_path, int8_path)
        checks = onnx.check_onnx(model, fp32_path, int8_path)
        fp32_bytes, int8_bytes = fp32_path.stat().st_size, int8_path.stat().st_size
        params = model.num_params(non_embedding=False)
        card = (f"A {params / 1e6:.2f}M-parameter GPT, context {model.config.block_size} tokens, tokenizer "
                f"{tokenizer.name} ({tokenizer.n_vocab} tokens), int8 {int8_bytes / 1e6:.1f} MB.")
        sizes = {"onnx/model.onnx": fp32_bytes, "onnx/model_quantized.onnx": int8_bytes}
        (tmp / SETTINGS).write_text(json.dumps(settings(model.config, tokenizer, title, card, sizes), indent=2) + "\n",
                                    encoding="utf-8")
        (tmp / TOKENIZER_JSON).write_text(tokenizer_json(tokenizer, model.config.vocab_size), encoding="utf-8")
        (tmp / TOKENIZER_CONFIG).write_text(json.dumps(tokenizer_config(tokenizer, model.config.block_size), indent=2) + "\n",
                                            encoding="utf-8")
        try:  # transformers.js reads config.json and generation_config.json; no transformers class computes qk_norm
            (tmp / "config.json").write_text(json.dumps(hf_config(model.config, tokenizer), indent=2) + "\n", encoding="utf-8")
            generation = {"bos_token_id": tokenizer.eot_token, "eos_token_id": tokenizer.eot_token}
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
        except CheckpointError:
            pass
        for name in PAGE_FILES:
            shutil.copy2(WEB / name, tmp / name)
        (tmp / "vendor").mkdir()
        for src, name in vendor:
            shutil.copy2(src, tmp / "vendor" / name)
        (tmp / "vendor" / "VERSIONS.txt").write_text(versions(), encoding="utf-8")
        (tmp / "README.md").write_text(README.format(title=title, card=card, int8_mb=int8_bytes / 1e6,
                                                     fp32_mb=fp32_bytes / 1e6), encoding="utf-8")
        (tmp / MARKER).write_text("written by python export_web.py; safe to replace\n", encoding="utf-8")
    warning = None
    if int8_bytes > PAGE_LIMIT_BYTES:
        warning = (f"the int8 model is {int8_bytes / 1e6:.0f} MB, more than a web page should make its visitors download "
                   f"(about {PAGE_LIMIT_BYTES / 1e6:.0f} MB); the site works, but loads slowly and may not fit a phone's memory.")
    return Site(out_dir, int8_bytes, fp32_bytes, checks, warning)


@contextmanager
def serve(folder: str | Path) -> Iterator[str]:
    """folder served over HTTP on a free port of 127.0.0.1, quietly, from a thread (the tests, bench/web.py): its URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()

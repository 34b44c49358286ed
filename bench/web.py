"""Benchmark: the static site in Chromium beside our Python int8 engine on one thread, in the same run.

    python bench/web.py                        # the default model: out (fp32, exported here) and out/int8
    python bench/web.py --site site            # an exported site as it is (its checkpoint still gives Python's side)
    python bench/web.py --score                # also: the whole validation split scored by the page's int8 and Python's

Prints, for one sequence of --new-tokens tokens from --prompt (the page's defaults: temperature 0.8, top-k 50):
  page tokens/s      in Debian's chromium (Playwright), the page's int8 model on one WebAssembly thread, after a warm-up
                     run; the median of --repeats runs, timed inside the page
  python tokens/s    our engine (model/generation) on the int8 checkpoint, torch on one thread, traced steps, the same
                     prompt and settings; the median of --repeats runs, alternating with the page's
  first token        ms from opening the page (navigation start) to the first token shown, cold: a fresh browser
                     context (empty cache), the page served from 127.0.0.1, generating as soon as the model is loaded
  page weight        every file the page fetched, as served and gzipped (gzip -6)
  --score            val nats/char over the whole validation split of --data: the page's int8 ONNX model beside our
                     Python int8 model, on the same windows (not timed)
and the CPU. Not a test: numbers depend on the machine and its load; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from model.formats.checkpoint import CheckpointError  # noqa: E402
from model.formats.load import load  # noqa: E402
from model.formats.site import export_site, serve  # noqa: E402
from model.generation.generate import decode_tokens, prompt_tokens, warm_up  # noqa: E402
from model.generation.sampling import SamplingConfig  # noqa: E402
from model.training.data import split_text, val_windows  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def python_seconds(int8, prompt_ids: list[int], sampling: SamplingConfig, n_vocab: int) -> float:
    start = time.perf_counter()
    for _ in decode_tokens(int8, prompt_ids, 1, sampling, n_vocab):
        pass
    return time.perf_counter() - start


def page_weight(folder: Path, urls: list[str]) -> tuple[int, int, list[str]]:
    """Bytes of the distinct files the page fetched, as served and gzipped, and their paths."""
    paths = sorted({urlparse(u).path.lstrip("/") or "index.html" for u in urls})
    raw = zipped = 0
    for p in paths:
        data = (folder / p).read_bytes()
        raw += len(data)
        zipped += len(gzip.compress(data, compresslevel=6))
    return raw, zipped, paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default="out", help="fp32 checkpoint (default: out); the site is exported from it unless --site")
    ap.add_argument("--int8-ckpt", help="Python's int8 checkpoint (default: CKPT/int8)")
    ap.add_argument("--site", help="an exported site folder to measure (default: export CKPT into a temporary folder)")
    ap.add_argument("--prompt", default="ROMEO:\n")
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--score", action="store_true", help="also score the whole validation split in the page and in Python")
    ap.add_argument("--data", default="input.txt", help="the text whose validation split --score scores (default: input.txt)")
    args = ap.parse_args()

    from playwright.sync_api import sync_playwright

    try:
        int8_dir = Path(args.int8_ckpt or Path(args.ckpt) / "int8")
        loaded = load(int8_dir)
        if loaded.kind != "int8":
            raise CheckpointError(f"{int8_dir} is not an int8 checkpoint: make one with python quantize.py --ckpt {args.ckpt}.")
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(args.site) if args.site else export_site(args.ckpt, Path(tmp) / "site").path
            result = measure(args, folder, loaded, sync_playwright)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result["cpu"] = cpu_name()
    print(json.dumps(result, indent=2))
    if "page_val_nats_per_char" in result:
        page_q, python_q = result["page_val_nats_per_char"], result["python_val_nats_per_char"]
        print(f"\nval nats/char over {result['scored_tokens']:,} tokens: page int8 {page_q:.4f}, Python int8 {python_q:.4f} "
              f"({page_q / python_q - 1:+.3%})")
    print(f"\npage {result['page_tokens_per_s']:.0f} tok/s, Python int8 (1 thread) {result['python_tokens_per_s']:.0f} "
          f"tok/s: ratio {result['ratio']:.2f}; first token {result['first_token_ms']:.0f} ms cold; page weight "
          f"{result['page_bytes'] / 1e6:.2f} MB ({result['page_gzip_bytes'] / 1e6:.2f} MB gzipped); on {result['cpu']}")
    return 0


def measure(args: argparse.Namespace, folder: Path, loaded, sync_playwright) -> dict:
    torch.set_num_threads(1)
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.8, top_k=50, seed=1)
    ids = prompt_tokens(loaded.tokenizer, args.prompt, loaded.config.block_size)
    warm_up(loaded.model, 1)
    python_seconds(loaded.model, ids, sampling, loaded.tokenizer.n_vocab)  # warm-up
    js = "([p, n]) => { const t = performance.now(); return window.smallgpt.generate(p, {maxNew: n, temperature: 0.8, " \
         "topK: 50, seed: 1}).then(rows => [rows[0].length, performance.now() - t]); }"
    page_s, python_s, produced = [], [], set()
    with serve(folder) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            cold = browser.new_context()  # a fresh context: nothing cached
            page = cold.new_page()
            urls: list[str] = []
            page.on("request", lambda r: urls.append(r.url))
            page.goto(url + "?autorun=1")
            page.wait_for_function("window.smallgpt && window.smallgpt.firstTokenAt !== null", timeout=300_000)
            first_ms = page.evaluate("window.smallgpt.firstTokenAt")
            page.wait_for_function("window.smallgpt.lastRun !== null", timeout=300_000)
            page.evaluate(js, [args.prompt, args.new_tokens])  # warm-up
            for _ in range(args.repeats):
                n, ms = page.evaluate(js, [args.prompt, args.new_tokens])
                produced.add(n)
                page_s.append(ms / 1000)
                python_s.append(python_seconds(loaded.model, ids, sampling, loaded.tokenizer.n_vocab))
            threads = page.evaluate("document.getElementById('engine-info').textContent")
            scores = score(page, loaded, Path(args.data)) if args.score else {}
            cold.close()
        finally:
            browser.close()
    raw, zipped, files = page_weight(folder, urls)
    if produced != {args.new_tokens}:  # a sequence that ended at <|endoftext|> is shorter: say so rather than divide wrongly
        print(f"note: the page produced {sorted(produced)} tokens in its runs (a sequence ends at <|endoftext|>)", file=sys.stderr)
    n = min(produced)
    page_tps, python_tps = n / statistics.median(page_s), args.new_tokens / statistics.median(python_s)
    return {"page_tokens_per_s": page_tps, "python_tokens_per_s": python_tps, "ratio": page_tps / python_tps,
            "first_token_ms": first_ms, "page_bytes": raw, "page_gzip_bytes": zipped, "files": files,
            "page_engine": threads, "new_tokens": args.new_tokens, "repeats": args.repeats, "prompt": args.prompt, **scores}


def score(page, loaded, data: Path) -> dict:
    """Val nats/char of the page's int8 model and of Python's over the whole validation split, on the same windows."""
    text = data.read_text(encoding="utf-8")
    val = np.array(loaded.tokenizer.encode(split_text(text)[1]), dtype=np.int64)
    windows = [val[s:s + n + 1].tolist() for s, n in val_windows(val, loaded.config.block_size)]
    chars = len(loaded.tokenizer.decode(val[1:].tolist()))
    with torch.no_grad():
        python = sum(float(F.cross_entropy(loaded.model(torch.tensor([w[:-1]]))[0][0], torch.tensor(w[1:]), reduction="sum"))
                     for w in windows)
    nats = page.evaluate("ws => window.smallgpt.score(ws)", windows)
    return {"scored_tokens": len(val) - 1, "page_val_nats_per_char": nats / chars, "python_val_nats_per_char": python / chars}


if __name__ == "__main__":
    sys.exit(main())

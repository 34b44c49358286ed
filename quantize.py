"""Quantize a trained checkpoint to int8 and report size, validation loss and generation speed against fp32.

    python quantize.py                      # out -> out/int8, after a plain python train.py
    python quantize.py --ckpt out --out out/int8 --data input.txt
The output folder is built beside --out and swapped in whole: a kill at any point leaves the old one or the new one.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import atomic
from model.formats.checkpoint import CONFIG, METRICS, WEIGHTS, CheckpointError, read_json, read_metrics, write_json
from model.formats.int8 import SCHEMES, file_size, plot_report, quantize_model, save_int8, tokens_per_second
from model.formats.load import load
from model.generation.generate import prompt_tokens
from model.paths import cannot_write, what_is
from model.progress import Progress
from model.tokenizer import TokenizerError
from model.training.data import DataError, prepare
from model.training.evaluate import evaluate_pair

ROWS = ["params", "size_fp32_bytes", "size_int8_bytes", "size_ratio", "val_nats_per_char_fp32", "val_nats_per_char_int8",
        "top1_agreement", "tokens_per_s_fp32", "tokens_per_s_int8"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default="out", help="fp32 checkpoint directory written by train.py (default: out)")
    p.add_argument("--out", default=None, help="int8 checkpoint directory to write (default: CKPT/int8)")
    p.add_argument("--scheme", choices=SCHEMES, default="per_channel", help="weight scales of the block Linears")
    p.add_argument("--data", default=None, help="text to validate on (default: the one recorded in CKPT/config.json)")
    p.add_argument("--eval-windows", type=int, default=None, help="score only this many validation windows (default: all)")
    p.add_argument("--gen-tokens", type=int, default=128, help="tokens generated per speed measurement")
    p.add_argument("--repeats", type=int, default=3, help="speed measurements per model (median reported)")
    p.add_argument("--prompt", default="\n", help="prompt of the speed measurement")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice, one per core)")
    args = p.parse_args(argv)
    if min(args.gen_tokens, args.repeats, args.eval_windows or 1, args.threads or 1) < 1:
        p.error("--gen-tokens, --repeats, --eval-windows and --threads must be positive integers.")
    return args


def text_path(args: argparse.Namespace, meta: dict[str, Any]) -> Path | None:
    """--data, else the training text recorded in config.json if it still exists, else None (with a note)."""
    if args.data:
        return Path(args.data)
    recorded = (meta.get("train") or {}).get("data")
    if recorded and Path(recorded).is_file():
        return Path(recorded)
    why = f"the recorded text {recorded} is missing" if recorded else "config.json records no training text"
    print(f"note: {why}; validation figures are skipped (pass --data PATH to get them).", file=sys.stderr)
    return None


def check_out(out: Path) -> None:
    """Refuse an --out this run may not replace whole: a link, a file, or a non-empty folder that is not an int8 checkpoint."""
    if out.is_symlink():  # replacing it whole would swap the link itself aside, not the folder it points to
        problem = what_is(out, "folder")
        if problem:  # it loops, or leads nowhere
            raise CheckpointError(f"--out {out} {problem}; pass a new or empty folder.")
        raise CheckpointError(f"--out {out} is a symbolic link; pass the folder it points to ({out.resolve()}) instead.")
    problem = cannot_write(out)  # where the new folder will be, or the old one, whose files go
    if problem is None and out.is_dir():  # the new folder is built beside the old one
        beside = cannot_write(out.parent)
        problem = beside and f"cannot be replaced: {out.parent} {beside}"
    if problem:
        raise CheckpointError(f"--out {out} {problem}; pass a folder you can write to.")
    atomic.recover_dir(out)  # first undo what a killed earlier run left (an old folder set aside, dead builds)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    try:
        is_int8 = out.is_dir() and read_json(out / CONFIG).get("kind") == "int8"
    except CheckpointError:
        is_int8 = False
    if not is_int8:
        raise CheckpointError(f"--out {out} exists and is not an int8 checkpoint, and quantize.py replaces it whole: "
                              "pass a new or empty folder, or an earlier quantize.py output.")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = Path(args.ckpt)
    out = Path(args.out) if args.out else ckpt / "int8"
    fp32 = load(ckpt)  # first: what is wrong with --ckpt (missing, a symbolic link that loops, ...) is said as such
    if os.path.realpath(out) == os.path.realpath(ckpt):  # realpath: a symbolic link that loops is said by check_out
        raise CheckpointError("--out must differ from --ckpt: writing int8 weights there would replace the fp32 checkpoint.")
    check_out(out)
    if fp32.kind != "fp32":
        raise CheckpointError(f"{ckpt} is already a quantized ({fp32.kind}) checkpoint: pass the fp32 one train.py wrote (e.g. out).")
    metrics = read_metrics(ckpt, fp32.model)  # refused if it describes other weights than those loaded
    data_path = text_path(args, fp32.meta)
    if data_path:  # read the validation text before writing anything, so a bad --data leaves no output behind
        with tempfile.TemporaryDirectory() as cache:
            td = prepare(data_path, cache, fp32.tokenizer)
            td.check(1)
            val, val_chars = np.array(td.val), td.val_chars
    with atomic.atomic_dir(out) as build:  # every file goes into build, which replaces out only once all are written
        steps = Progress(4 if data_path else 3, "step", "quantize")
        steps.update(0, "converting")
        save_int8(build, quantize_model(fp32.model, args.scheme), fp32.meta)
        if metrics is not None:
            write_json(build / METRICS, metrics)
        int8 = load(build)  # measure what was written, as users will load it
        done = 1
        model, qmodel, block = fp32.model, int8.model, fp32.config.block_size
        sizes = file_size(ckpt / WEIGHTS) if (ckpt / WEIGHTS).is_file() else sum(p.numel() * 4 for p in model.parameters())
        report: dict[str, Any] = {"fp32_checkpoint": str(ckpt), "int8_checkpoint": str(out), "scheme": args.scheme,
                                  "params": model.num_params(non_embedding=False), "size_fp32_bytes": sizes,
                                  "size_int8_bytes": file_size(build / WEIGHTS)}
        report["size_ratio"] = report["size_fp32_bytes"] / report["size_int8_bytes"]
        if data_path:
            report["val_data"] = str(data_path)
            steps.update(done, "evaluating fp32 and int8")  # one pass: both losses and the top-1 agreement
            ev32, ev8, report["top1_agreement"] = evaluate_pair(model.eval(), qmodel.eval(), val, val_chars, block,
                                                                max_windows=args.eval_windows)
            for name, ev in (("fp32", ev32), ("int8", ev8)):
                report[f"val_nats_per_token_{name}"] = ev["val_nats_per_token"]
                report[f"val_nats_per_char_{name}"] = ev["val_nats_per_char"]
            done += 1
        steps.update(done, "generation speed")
        prompt_ids = prompt_tokens(fp32.tokenizer, args.prompt, block)
        speed = tokens_per_second({"fp32": model, "int8": qmodel}, prompt_ids, args.gen_tokens, fp32.tokenizer.n_vocab, args.repeats)
        report.update(tokens_per_s_fp32=speed["fp32"], tokens_per_s_int8=speed["int8"], gen_tokens=args.gen_tokens, repeats=args.repeats,
                      threads=torch.get_num_threads())
        steps.update(done + 1, "writing report")
        write_json(build / "report.json", report)
        plot_report(report, build / "report.png")
        steps.update(done + 2, "done")
        steps.close()
    return report


def print_table(report: dict[str, Any]) -> None:
    print(f"{'metric':<24} {'value':>14}")
    for key in ROWS:
        value = report.get(key)
        shown = "skipped" if value is None else f"{value:,}" if isinstance(value, int) else f"{value:.4f}"
        print(f"{key:<24} {shown:>14}")
    print(f"wrote {report['int8_checkpoint']} (model.safetensors, config.json, report.json, report.png)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except (CheckpointError, DataError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

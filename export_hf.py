"""Export a checkpoint as a Hugging Face GPT-2 directory: python export_hf.py --ckpt out --out out/hf."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from model.checkpoint import CheckpointError
from model.hf import SAFETENSORS, export_checkpoint
from model.tokenizer import TokenizerError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write an fp32 checkpoint (or a Hugging Face GPT-2 directory) as a directory "
                                            "transformers.GPT2LMHeadModel.from_pretrained loads.")
    p.add_argument("--ckpt", default="out", help="checkpoint directory to export (default: out)")
    p.add_argument("--out", default="out/hf",
                   help="directory to write model.safetensors, config.json and tokenizer files into (default: out/hf)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        out = export_checkpoint(args.ckpt, args.out)
    except (CheckpointError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = (Path(out) / SAFETENSORS).stat().st_size
    print(f"wrote {out} (model.safetensors {size / 1e6:.1f} MB, config.json, vocab.json, merges.txt) in {time.perf_counter() - t0:.1f} s; "
          f"load it with transformers.GPT2LMHeadModel.from_pretrained({str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

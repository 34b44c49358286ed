"""Export a checkpoint as a Hugging Face directory (GPT-2, or GPT-NeoX for rotary models): python export_hf.py --ckpt out --out out/hf."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from model.formats.checkpoint import CONFIG, CheckpointError, read_json
from model.formats.export import export_checkpoint
from model.formats.hf import SAFETENSORS
from model.tokenizer import TokenizerError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write an fp32 checkpoint (or a Hugging Face GPT-2 directory) as a directory "
                                            "transformers.AutoModelForCausalLM.from_pretrained loads: a GPT2LMHeadModel, or a "
                                            "GPTNeoXForCausalLM for --rotary models. Models trained with --qk-norm cannot be exported.")
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
    arch = read_json(Path(out) / CONFIG)["architectures"][0]
    print(f"wrote {out} as a {arch} (model.safetensors {size / 1e6:.1f} MB, config.json, vocab.json, merges.txt) in "
          f"{time.perf_counter() - t0:.1f} s; load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

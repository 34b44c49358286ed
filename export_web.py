"""Write a checkpoint as a static web site that runs the int8 model in the browser: python export_web.py --ckpt out --out site."""

from __future__ import annotations

import argparse
import sys
import time

from model.formats.checkpoint import CheckpointError
from model.formats.onnx import OnnxExportError
from model.tokenizer import TokenizerError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write an fp32 checkpoint (or a Hugging Face GPT-2 directory) as a static web "
                                            "site: the model as ONNX (fp32 and int8) run in the visitor's browser by "
                                            "onnxruntime-web, no server. Upload the folder as a Hugging Face static Space, "
                                            "or serve it from any static host. Needs the page's runtime files once: "
                                            "npm ci --prefix web.")
    p.add_argument("--ckpt", default="out", help="fp32 checkpoint directory to export (default: out)")
    p.add_argument("--out", default="site", help="folder to write the site into (default: site)")
    p.add_argument("--title", default="smallgpt", help="the page's and the Space's title (default: smallgpt)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        from model.formats.site import export_site  # imports torch and onnx: after --help

        site = export_site(args.ckpt, args.out, args.title)
    except (CheckpointError, TokenizerError, OnnxExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {site.path} in {time.perf_counter() - t0:.0f} s: onnx/model_quantized.onnx {site.int8_bytes / 1e6:.1f} MB "
          f"(int8, what the page runs), onnx/model.onnx {site.fp32_bytes / 1e6:.1f} MB; onnxruntime agrees with the model "
          f"(fp32 logits within {site.checks['fp32_max_abs']:.1g}).")
    if site.warning:
        print(f"warning: {site.warning}", file=sys.stderr)
    print(f"try it: python -m http.server --directory {site.path} 8000, then open http://127.0.0.1:8000")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Serve a trained (int8) smallgpt checkpoint in a Gradio app, or export it as a Hugging Face Space folder."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # never call home

if os.environ.get("SPACES_ZERO_GPU"):  # a ZeroGPU Space: spaces must come before torch and gradio (docs/app.md, "ZeroGPU")
    try:
        import spaces  # noqa: F401
    except ImportError:
        sys.exit("error: this is a ZeroGPU Space (SPACES_ZERO_GPU is set) but the spaces package is missing: "
                 "add spaces to requirements.txt, or export again with python app.py --export-space DIR.")


def main() -> int:
    from model.formats.checkpoint import CKPT_ENV, CheckpointError, default_checkpoint
    from model.tokenizer import TokenizerError

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ckpt", type=Path, default=None,
                    help=f"checkpoint directory (default: ${CKPT_ENV}, else out/int8 as written by quantize.py)")
    ap.add_argument("--host", default=None, help="interface to bind (default 127.0.0.1; 0.0.0.0 on Spaces)")
    ap.add_argument("--port", type=int, default=None, help="port (default $GRADIO_SERVER_PORT or 7860)")
    ap.add_argument("--share", action="store_true", help="also serve through a temporary public gradio.live link")
    ap.add_argument("--export-space", type=Path, default=None, metavar="DIR",
                    help="instead of serving, write a self-contained Hugging Face Space folder to DIR")
    ap.add_argument("--space-hardware", default=None, metavar="{zero-gpu,cpu-basic}",
                    help="with --export-space: the Space's hardware; zero-gpu (the default) is what a free account can "
                         "create, cpu-basic needs a paid plan (docs/app.md, Deploy)")
    ap.add_argument("--no-train", action="store_true", help="serve without the Train tab (no training on this server)")
    args = ap.parse_args()
    if args.port is not None and not 1 <= args.port <= 65535:
        ap.error(f"--port must be from 1 to 65535, got {args.port}.")
    ckpt = args.ckpt or default_checkpoint()
    from model.webapp import ModelPool, launch  # gradio: seconds to import, so not before --help
    try:
        if args.export_space is not None:
            from model.webapp.space import DEFAULT_HARDWARE, export_space, site_note

            hardware = args.space_hardware or DEFAULT_HARDWARE
            out = export_space(ckpt, args.export_space, app_file=Path(__file__).resolve(), hardware=hardware)
            print(f"Space folder ({hardware}) written to {out}; upload it as described in docs/app.md, Deploy.")
            if (note := site_note()) is not None:
                print(f"note: {note}")
            return 0
        # SIGTERM (a stopped container, kill) exits through the atexit hooks: visitors' models and trainings go with it.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        # OSError: e.g. the port is taken
        launch(ModelPool(ckpt), host=args.host, port=args.port, share=args.share, train=not args.no_train)
    except (CheckpointError, TokenizerError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

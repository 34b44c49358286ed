"""Export a self-contained Hugging Face Space folder: app.py, the model package (with its GPT-2 vocabulary), the checkpoint,
train.py, quantize.py, export_web.py (with the static site's page and runtime files in web/) and input.txt for the Train
tab, requirements, README."""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path

import torch

from model.formats import site
from model.formats.checkpoint import SERVED_CKPT, TRAIN_STATE, CheckpointError, read_config
from model.webapp import zerogpu
from model.webapp.training_job import MAX_MINUTES  # off ZeroGPU (where the export runs): the CPU Space's limit

PACKAGE = Path(__file__).resolve().parents[1]  # model/, copied whole into the Space
CKPT_IN_SPACE = SERVED_CKPT  # the app's default checkpoint path, so the Space needs no flags
# Beside app.py: the Train tab runs them (export_web.py: the visitor's model as a static site; input.txt: if present).
TRAIN_TAB_FILES = ("train.py", "quantize.py", "export_web.py", "input.txt")
MARKER = ".smallgpt-space"  # marks a folder this function wrote, so re-exporting may replace it

HARDWARE = ("zero-gpu", "cpu-basic")  # --space-hardware: what the Space asks for; zero-gpu is what a free account can create
DEFAULT_HARDWARE = "zero-gpu"
FLAVOR = {"zero-gpu": "zero-a10g", "cpu-basic": "cpu-basic"}  # the hub's hardware flavour names (README's suggested_hardware)
PYTHON = {"zero-gpu": "3.12", "cpu-basic": "3.11"}  # ZeroGPU runs Python 3.12 or 3.10 only (the hub's ZeroGPU page)
SPACES_PACKAGE = "spaces"  # ZeroGPU installs its own; no bound, which could exclude it (zerogpu.py was read against 0.51.3)
# ZeroGPU installs torch from its own list of versions, so the zero-gpu export asks only for the lowest the app runs on.
# 2.5: torch.OutOfMemoryError (model/training/distributed.py); below it, fused AdamW on the CPU (2.4) and
# torch.amp.GradScaler (2.3); ZeroGPU offers no 2.3. Read from the code, not run on 2.5 here. Newer features fall back:
# torch.optim.Muon (2.9) gives way to AdamW, which the training log says (model/training/optim.py).
LOWEST_TORCH = "2.5"

# cpu-basic: the extra index serves CPU-only torch wheels (about 200 MB instead of a multi-GB CUDA build); pip takes
# 2.x.y+cpu from it, since a local version sorts above the plain one on PyPI.
# zero-gpu: torch's CUDA build, chosen by ZeroGPU from its supported versions (an exact pin outside its list fails the build:
# "No candidate PyTorch version found for ZeroGPU"): spaces reads torch.version.cuda at import
# (spaces/zero/torch/static.py), which the CPU build has as None; and the Train tab trains on the GPU.
REQUIREMENTS = {
    "cpu-basic": "--extra-index-url https://download.pytorch.org/whl/cpu\ntorch=={torch}\n",
    "zero-gpu": f"torch>={LOWEST_TORCH}\n{SPACES_PACKAGE}\n",
}
REQUIREMENTS_REST = """\
gradio=={gradio}
tiktoken>=0.7
numpy>=1.26
safetensors>=0.4
pandas>=2.0
tqdm>=4.66
matplotlib>=3.8
onnx=={onnx}
onnxruntime=={onnxruntime}
onnxscript=={onnxscript}
"""

ABOUT_HARDWARE = {
    "cpu-basic": "The Train tab trains a model of your own on a text you bring (1 to {max_minutes} minutes) on this Space's CPU, "
                 "then you generate from it and download it.",
    "zero-gpu": "The Train tab trains a model of your own on a text you bring on a ZeroGPU GPU, for at most {max_minutes} "
                "minutes and less when your text needs less, out of your daily ZeroGPU quota; then it is quantized to int8, "
                "you generate from it on the CPU and download it. Generating costs no GPU quota.",
}

README = """\
---
title: {title}
emoji: ✍️
colorFrom: indigo
colorTo: yellow
sdk: gradio
sdk_version: {gradio}
app_file: app.py
python_version: "{python}"
suggested_hardware: {flavor}
pinned: false
short_description: A small GPT, int8 on CPU, that continues your text
---

# {title}

A small GPT trained with smallgpt on one text file, quantized to int8 and served on CPU.
Type the start of a text; the model writes up to five continuations, streamed token by token.
The "Under the hood" panel shows the ten most likely next tokens after the prompt.
{about_hardware}

Checkpoint: `out/int8` ({kind}, {size_mb:.1f} MB weights). Tokenizer: {tokenizer}.
Run locally: `pip install -r requirements.txt && python app.py`.
"""


def torch_version() -> str:
    """The installed torch version without its local tag (2.13.0+cpu -> 2.13.0)."""
    return torch.__version__.split("+")[0]


def export_space(ckpt: str | Path, out_dir: str | Path, app_file: str | Path, title: str = "smallgpt",
                 hardware: str = DEFAULT_HARDWARE) -> Path:
    """Write the Space folder out_dir for hardware (one of HARDWARE), replacing an earlier export, never other folders;
    returns its path.

    The folder is built beside out_dir and renamed into place, so a failure leaves nothing half-written.
    """
    ckpt, out_dir, app_file = Path(ckpt), Path(out_dir), Path(app_file)
    if hardware not in HARDWARE:
        raise ValueError(f"Unknown Space hardware {hardware!r}: choose one of {', '.join(HARDWARE)}.")
    if not ckpt.exists():
        raise CheckpointError(f"No checkpoint at {ckpt}: run python train.py then python quantize.py (or pass --ckpt DIR).")
    meta = read_config(ckpt)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MARKER).exists())):
        raise CheckpointError(f"{out_dir} exists and is not an earlier Space export; pass an empty or new folder to --export-space.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)
    try:
        _fill(tmp, ckpt, meta, app_file, title, hardware)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _fill(dest: Path, ckpt: Path, meta: dict, app_file: Path, title: str, hardware: str) -> None:
    shutil.copy2(app_file, dest / "app.py")
    for name in TRAIN_TAB_FILES:
        if (app_file.parent / name).is_file():
            shutil.copy2(app_file.parent / name, dest / name)
    # The whole package, subpackages and GPT-2's vocabulary (gpt2.tiktoken) included: the Space starts offline.
    shutil.copytree(PACKAGE, dest / "model", ignore=shutil.ignore_patterns("__pycache__"))
    ckpt_dest = dest / CKPT_IN_SPACE
    ckpt_dest.mkdir(parents=True)
    for src in sorted(ckpt.iterdir()):
        if src.is_file() and src.name != TRAIN_STATE and not src.name.startswith("."):
            shutil.copy2(src, ckpt_dest / src.name)
    if site_note() is None:
        _copy_web(dest / site.WEB.name)
    tokenizer = str(meta["tokenizer"].get("name", "?"))  # read_config checked config.json, copied above
    size_mb = sum(f.stat().st_size for f in ckpt_dest.glob("*.safetensors")) / 1e6
    requirements = REQUIREMENTS[hardware].format(torch=torch_version()) + REQUIREMENTS_REST.format(
        gradio=version("gradio"), onnx=version("onnx"), onnxruntime=version("onnxruntime"), onnxscript=version("onnxscript"))
    (dest / "requirements.txt").write_text(requirements, encoding="utf-8")
    about = ABOUT_HARDWARE[hardware].format(max_minutes=zerogpu.MAX_MINUTES if hardware == "zero-gpu" else MAX_MINUTES)
    (dest / "README.md").write_text(README.format(title=title, gradio=version("gradio"), kind=meta.get("kind", "fp32"),
                                                  size_mb=size_mb, tokenizer=tokenizer, python=PYTHON[hardware],
                                                  flavor=FLAVOR[hardware], about_hardware=about), encoding="utf-8")
    (dest / MARKER).write_text("written by python app.py --export-space; safe to replace\n", encoding="utf-8")


def site_note() -> str | None:
    """Why an exported Space's Train tab will offer no web-site download (None: it will): the page's runtime files, which
    the Space carries in web/, are not installed here."""
    try:
        site.vendor_sources()
    except CheckpointError as e:
        why = str(e)
        return f"the Space's Train tab will offer no web-site download: {why[:1].lower()}{why[1:]}, then export again."
    return None


def _copy_web(dest: Path) -> None:
    """The static site's page and the runtime files it copies, in web/'s layout (site.py reads them there), with their
    packages' package.json (for vendor/VERSIONS.txt)."""
    for name in site.PAGE_FILES:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(site.WEB / name, dest / name)
    packages = [site.WEB / "node_modules" / package / "package.json" for package in dict.fromkeys(p for p, _, _ in site.VENDOR)]
    for src in [src for src, _ in site.vendor_sources()] + packages:
        target = dest / src.relative_to(site.WEB)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)

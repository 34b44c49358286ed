"""Benchmark: every stage after training, on one trained checkpoint (the default's, whatever size it chose): int8 beside
fp32 on the whole validation split (quantize.py), KV-cached logits beside uncached ones, the Hugging Face export's
logits beside ours in transformers, and CTranslate2 converting that export and decoding our greedy tokens.

    python bench/stages.py --ckpt runs/ladder/m40_s1337 --work /tmp/stages

Not a test: it needs a trained checkpoint and a minute or two; it prints numbers, and exits non-zero when a stage fails
its bound (int8 within 0.5% of fp32, logits within 1e-4).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.formats.checkpoint import read_json  # noqa: E402
from model.formats.export import export_checkpoint  # noqa: E402
from model.formats.hf import neox_names_for_ctranslate2  # noqa: E402
from model.formats.hf_tokenizer import token_strings  # noqa: E402
from model.formats.load import load  # noqa: E402
from model.generation.cache import filling, reserve  # noqa: E402
from model.generation.generate import SamplingConfig, decode_tokens  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INT8_BOUND = 0.005  # int8's val nats/char at most this fraction above fp32's
LOGIT_BOUND = 1e-4


def kv_cache_gap(model: torch.nn.Module, ids: torch.Tensor, prompt: int) -> float:
    """The largest gap between logits decoded one token at a time over the KV cache and one uncached forward."""
    with torch.inference_mode():
        full, _ = model(ids)
        reserve(model, ids.shape[0])
        with filling(model, torch.arange(ids.shape[0])):  # the prompt, as the engine prefills it
            first, _ = model(ids[:, :prompt], input_pos=torch.arange(prompt))
        steps = [model(ids[:, t:t + 1], input_pos=torch.tensor([t]))[0] for t in range(prompt, ids.shape[1])]
        model.clear_caches()
    cached = torch.cat([first, *steps], dim=1)
    return float((cached - full).abs().max())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="fp32 checkpoint directory written by train.py")
    p.add_argument("--work", default="bench/results/stages", help="where the int8, Hugging Face and CTranslate2 copies go")
    a = p.parse_args()
    work, failed = Path(a.work), []
    work.mkdir(parents=True, exist_ok=True)

    subprocess.run([sys.executable, "quantize.py", "--ckpt", a.ckpt, "--out", str(work / "int8"), "--repeats", "1"], cwd=ROOT,
                   check=True)
    report = read_json(work / "int8" / "report.json")
    fp32, int8 = report["val_nats_per_char_fp32"], report["val_nats_per_char_int8"]
    print(f"int8: val {int8:.4f} nats/char against fp32 {fp32:.4f} ({(int8 / fp32 - 1) * 100:+.2f}%)")
    failed += ["int8"] if int8 > fp32 * (1 + INT8_BOUND) else []

    loaded = load(a.ckpt)
    model, cfg = loaded.model.eval(), loaded.config
    ids = torch.randint(0, loaded.tokenizer.n_vocab, (3, cfg.block_size), generator=torch.Generator().manual_seed(0))
    gap = kv_cache_gap(model, ids, cfg.block_size // 2)
    print(f"KV cache: largest logit gap to the uncached forward {gap:.2e} ({cfg.n_layer}x{cfg.n_embd}, context {cfg.block_size})")
    failed += ["kv-cache"] if gap > LOGIT_BOUND else []

    import transformers
    hf_dir = export_checkpoint(a.ckpt, work / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.inference_mode():
        ours, theirs = model(ids)[0], hf(ids).logits[..., :model.config.vocab_size]
    gap = float((ours - theirs).abs().max())
    print(f"Hugging Face export ({type(hf).__name__}): largest logit gap {gap:.2e}")
    failed += ["hf"] if gap > LOGIT_BOUND else []

    import ctranslate2
    with neox_names_for_ctranslate2():
        ctranslate2.converters.TransformersConverter(str(hf_dir)).convert(str(work / "ct2"), quantization="float32", force=True)
    prompt = loaded.tokenizer.encode("ROMEO:")
    sampling = SamplingConfig(max_new_tokens=24, temperature=0)
    ours_tokens = [int(t[0]) for t in decode_tokens(model, prompt, 1, sampling, model.config.vocab_size)]
    strings = token_strings(hf_dir)
    generator = ctranslate2.Generator(str(work / "ct2"), device="cpu", intra_threads=1)
    result = generator.generate_batch([[strings[i] for i in prompt]], max_length=24, min_length=24, sampling_topk=1,
                                      include_prompt_in_result=False, end_token=[])
    same = result[0].sequences_ids[0] == ours_tokens
    print(f"CTranslate2: converted; its 24 greedy tokens {'are' if same else 'are NOT'} ours")
    failed += [] if same else ["ctranslate2"]
    print("all stages within bounds" if not failed else f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

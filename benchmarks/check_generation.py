"""Generation with a trained adapter on ONNX Runtime against PyTorch + peft, on a real model.

For each prompt, the first ``--tokens`` greedy tokens of four routes must equal those of
``peft.PeftModel`` on the original Hugging Face model with the same adapter: the onnxruntime-genai
folder with the adapter loaded at run time, the merged onnxruntime-genai folder, and the merged
plain-ONNX model (no KV cache). Prompts are tokenised as ids (same ids for every route).

    python -m benchmarks.check_generation models/smollm2-135m runs/sentiment/best --work /tmp/gen

Needs the export and genai extras (torch, transformers, peft, onnxruntime-genai).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

PROMPTS = [
    "Review: a gorgeous, witty, seductive movie. Sentiment:",
    "Review: the plot is boring and the acting is awful. Sentiment:",
    "The capital of France is",
    "Write a haiku about the sea.",
    "Question: what is 12 plus 30? Answer:",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colours are",
]


def torch_tokens(bundle_dir: Path, adapter: Path, prompts: list[list[int]], new: int) -> list:
    import torch
    from peft import PeftModel
    from zoo_ort.exporters.sources import load_model, resolve

    from zoo_ort.bundle import load_bundle

    source = resolve(load_bundle(bundle_dir).manifest.source.get("model"))
    base = load_model(source).eval()
    model = PeftModel.from_pretrained(copy.deepcopy(base), adapter).eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            gen = model.generate(
                torch.tensor([ids]), max_new_tokens=new, do_sample=False, pad_token_id=0
            )
            out.append(gen[0, len(ids) :].tolist())
    return out


def ort_tokens(folder: Path, adapter: Path | None, prompts: list[list[int]], new: int) -> list:
    from zoo_ort.generate import GenerationConfig, load_generator

    gen = load_generator(folder, adapter)
    config = GenerationConfig(max_new_tokens=new)
    return [list(gen.generate_ids(ids, config)) for ids in prompts]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("adapter", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/zoo-gen-check"))
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args(argv)
    from tokenizers import Tokenizer
    from zoo_ort.exporters.genai import build_genai_model, merge_adapter

    from zoo_ort.bundle import load_bundle

    bundle = load_bundle(args.bundle)
    tok = Tokenizer.from_file(str(bundle.tokenizer_path))
    prompts = [tok.encode(p).ids for p in PROMPTS]
    t0 = time.perf_counter()
    genai = build_genai_model(args.bundle, args.work / "genai", overwrite=True)
    merged = merge_adapter(args.bundle, args.adapter, args.work / "merged", overwrite=True)
    want = torch_tokens(args.bundle, args.adapter, prompts, args.tokens)
    routes = {
        "genai + adapter": ort_tokens(genai, args.adapter, prompts, args.tokens),
        "merged genai": ort_tokens(merged / "genai", None, prompts, args.tokens),
        "merged plain ONNX": ort_tokens(merged / "onnx", None, prompts, args.tokens),
    }
    base = ort_tokens(genai, None, prompts, args.tokens)
    eos = {bundle.manifest.tokenizer.get("eos_token_id")}
    # peft keeps generating past EOS only if EOS is not configured; cut both sides at EOS.
    want = [w[: next((i for i, t in enumerate(w) if t in eos), len(w))] for w in want]
    report = {
        "prompts": len(prompts),
        "tokens": args.tokens,
        "routes": {k: sum(a == b for a, b in zip(v, want, strict=True)) for k, v in routes.items()},
        "adapter_changes_tokens": sum(a != b for a, b in zip(base, want, strict=True)),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(report, indent=2))
    return 0 if all(n == len(prompts) for n in report["routes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

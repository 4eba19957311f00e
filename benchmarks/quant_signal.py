"""Does a quantized base keep the zeroth-order signal? A contender for :mod:`benchmarks.run`.

A ZO step lives on loss differences: ``g = (L(θ+εz) − L(θ−εz)) / 2ε`` with ε = 1e-2 moves the
loss by about 1e-2. A base whose rounding noise is larger than that returns ``g`` made of
noise, however fast it runs. So each base is scored on the same steps (same rows, same
directions, the initial adapter) and its ``g`` compared with the fp32 base's: correlation,
relative error, and the largest change of a row's loss; with the time of one forward of a
training step's rows next to it.

The bases are the benchmark's own (fp32, weight-only int8 ``MatMulNBits``, int4 if built) and
two made here with ONNX Runtime's ``quantize_dynamic`` (int8 weights per channel and uint8
activations quantized at run time, the fast integer kernels of a CPU without VNNI):

* ``int8-dynamic``: every MatMul with a constant weight;
* ``int8-dynamic-keep-down``: the same, but the MatMuls with the widest input (the MLP down
  projections, whose inputs carry the largest activation outliers) stay fp32.
"""

from __future__ import annotations

import functools
import logging
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.zoo_bench import (
    STAMP,
    prepare_run,
    step_queries,
    time_step_forward,
    write_derived,
)
from zoo_ort.io import read_json

DYNAMIC = ("int8-dynamic", "int8-dynamic-keep-down")


def _stamp(fp32: str, keep_down: bool) -> dict[str, Any]:
    """What a cached derived bundle was made from: rebuilt when the fp32 graph changes."""
    mtime_ns = (Path(fp32) / "model.onnx").stat().st_mtime_ns
    return {"fp32": str(Path(fp32).resolve()), "mtime_ns": mtime_ns, "keep_down": keep_down}


def _widest_input_matmuls(model: Any) -> list[str]:
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    weights = {
        n.name: shapes[n.input[1]]
        for n in model.graph.node
        if n.op_type == "MatMul" and len(shapes.get(n.input[1], ())) == 2
    }
    widest = max((s[0] for s in weights.values()), default=0)
    return [name for name, s in weights.items() if s[0] == widest]


def derive_dynamic(fp32: str, out: Path, keep_down: bool) -> Path:
    """A copy of the fp32 bundle with ``quantize_dynamic``'s base (cached in ``out``)."""
    stamp = _stamp(fp32, keep_down)
    cached = (out / "manifest.json").is_file() and (out / STAMP).is_file()
    if not (cached and read_json(out / STAMP) == stamp):
        quantize = functools.partial(_quantize_dynamic, keep_down=keep_down)
        write_derived(Path(fp32), out, "int8-dynamic", quantize, stamp)
    return out


def _quantize_dynamic(src: Path, dst: Path, keep_down: bool) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(src), load_external_data=False)
    exclude = _widest_input_matmuls(graph) if keep_down else []
    loggers = [logging.getLogger("onnxruntime.quantization"), logging.getLogger()]
    levels = [lg.level for lg in loggers]
    for lg in loggers:  # it logs every node, and warns about pre-processing on the root
        lg.setLevel(logging.ERROR)
    try:
        quantize_dynamic(
            str(src),
            str(dst),
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            reduce_range=True,  # 7-bit weights: AVX2's u8·s8 pairs must not saturate int16
            weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude,
            use_external_data_format=True,
        )
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _signal(bundle: str, steps: int, train_limit: int | None, **settings: Any) -> dict[str, Any]:
    p, _ = prepare_run(bundle, train_limit, **settings)
    s, batches = p.settings, p.batches()
    g, losses = [], []
    for step in range(steps):
        res = step_queries(p.engine, p, s, batches(step), step)
        g.extend(res.g.tolist())
        losses.extend(res.loss_plus.tolist() + res.loss_minus.tolist())
    times, _ = time_step_forward(p, replace(s, queries=1), repeats=3)
    return {"g": g, "pair_losses": losses, "forward_s": statistics.median(times)}


def quant_signal(
    bundles: dict[str, str],
    *,
    cache_dir: str,
    q: int = 8,
    B: int = 8,
    steps: int = 3,
    eps: float = 1e-2,
    seed: int = 0,
    threads: int | None = None,
    train_limit: int | None = None,
) -> dict[str, Any]:
    """Score every base of ``bundles`` (which must hold "fp32") plus the two dynamic ones on the
    same ``steps`` steps of ``q`` directions over ``B`` examples; compare each ``g`` with fp32's.

    ``forward_s`` is one forward of a q=1 step's 2·B rows (median of 3 after a warm-up).
    """
    cache = Path(cache_dir)
    fp32 = bundles["fp32"]
    tag = Path(fp32).name.removesuffix("-fp32")
    bases = dict(bundles)
    for name in DYNAMIC:
        path = cache / f"{tag}-{name}"
        bases[name] = str(derive_dynamic(fp32, path, keep_down=name.endswith("keep-down")))
    kw = dict(q=q, B=B, eps=eps, seed=seed, threads=threads)
    raw = {name: _signal(path, steps, train_limit, **kw) for name, path in bases.items()}
    ref_g = np.array(raw["fp32"]["g"])
    ref_l = np.array(raw["fp32"]["pair_losses"])
    rows = []
    for name, r in raw.items():
        g, losses = np.array(r["g"]), np.array(r["pair_losses"])
        same = name == "fp32"
        rows.append(
            {
                "base": name,
                "g_corr_vs_fp32": 1.0 if same else float(np.corrcoef(g, ref_g)[0, 1]),
                "g_rel_err_vs_fp32": float(np.linalg.norm(g - ref_g) / np.linalg.norm(ref_g)),
                "max_loss_change": float(np.abs(losses - ref_l).max()),
                "forward_s": r["forward_s"],
                "speedup_vs_fp32": raw["fp32"]["forward_s"] / r["forward_s"],
            }
        )
    return {
        "method": "quant_signal",
        "config": {"q": q, "B": B, "steps": steps, "eps": eps, "seed": seed},
        "g_values": len(ref_g),
        "g_std_fp32": float(ref_g.std()),
        "rows": rows,
        "raw": raw,
    }

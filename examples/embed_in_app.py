"""Embed zoo-ort in an app: settings -> (engine, data, adapter) -> train, through the public path.

``resolve`` layers the settings exactly as ``zoo-ort train`` does (built-in defaults < the
bundle's recipe < a TOML file < the app's values) and ``prepare`` builds the ONNX Runtime engine,
the task's data and the initial adapter from them. An app that brings its own engine passes
``prepare(settings, engine=...)`` (see ``embed_own_engine.py`` for such an engine).

Run: python examples/embed_in_app.py models/smollm2-135m runs/app
"""

from __future__ import annotations

import sys

from zoo_ort.app.wiring import adapter_saver, prepare, resolve
from zoo_ort.loop.train import train


def main(bundle: str, run_dir: str, steps: int = 20) -> dict[str, float]:
    settings = resolve(
        bundle, {"data": "sentiment", "steps": steps, "eval_every": 10, "out": run_dir}
    ).settings
    p = prepare(settings)
    before = p.evaluate({**p.frozen, **p.params})["accuracy"]
    # p.train(run_dir) is this call with p's own pieces; spelled out to show what the loop takes.
    result = train(
        p.engine,
        p.params,
        p.frozen,
        p.batches(),
        settings,
        run_dir,
        evaluate=p.evaluate,
        save_adapter=adapter_saver(p.bundle),
    )
    return {"before": before, "after": result.final_eval["accuracy"], "best": result.best_metric}


if __name__ == "__main__":
    r = main(sys.argv[1], sys.argv[2])
    print(f"dev accuracy {r['before']:.3f} -> {r['after']:.3f} (best {r['best']:.3f})")

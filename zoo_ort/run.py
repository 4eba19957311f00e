"""One training or evaluation run from a resolved configuration: the glue between the bundle, the
engine, the task data, the trainer and the adapter writers. The CLI is a thin layer over this, and
so is an app that embeds zoo-ort (see ``examples/``).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from zoo_ort.bundle import Bundle, load_bundle
from zoo_ort.config import load_toml, merge, save_toml
from zoo_ort.errors import ZooError

# Everything `zoo-ort train` can be told, with its built-in default. Recipe defaults (the bundle
# manifest's `defaults`), a TOML file and flags override these in that order.
RUN_DEFAULTS: dict[str, Any] = {
    "task": None,  # inferred from --data when it names a known task
    "data": None,
    "out": None,
    "steps": 500,
    "lr": 1e-3,
    "eps": 1e-2,
    "queries": 1,
    "batch_size": 16,
    "save_every": 100,
    "eval_every": 100,
    "eval_rows": 0,
    "eval_batch_size": 32,
    "seed": 0,
    "loss": "candidates",
    "optimizer": "sgd",
    "momentum": 0.0,
    "schedule": "constant",
    "warmup": 0,
    "weight_decay": 0.0,
    "estimator": "batched",
    "row_budget": 0,
    "max_length": 256,
    "template": None,
    "verbalizer": None,
    "label_field": None,
    "threads": None,
    "provider": "cpu",
    "fallback": None,
    "provider_option": None,
    "provider_options": None,  # resolved ORT option strings (written into the saved config)
}
EVAL_ONLY = {"split"}


def resolve_config(
    bundle: str | Path,
    given: Mapping[str, Any],
    config_file: str | Path | None = None,
    *,
    provider_flags: Mapping[str, Any] | None = None,
    for_training: bool = True,
) -> dict[str, Any]:
    """Defaults < the bundle's recipe defaults < ``config_file`` < ``given`` (None = not given)."""
    from zoo_ort.providers import parse_options

    b = load_bundle(bundle)
    known = set(RUN_DEFAULTS)
    recipe = {k: v for k, v in b.manifest.defaults.items() if k in known}
    toml = load_toml(config_file) if config_file else {}
    cfg = merge(
        RUN_DEFAULTS,
        recipe,
        toml,
        dict(given),
        known=known,
        where=["defaults", "recipe", str(config_file), "flags"],
    )
    cfg["bundle"] = str(bundle)
    if cfg.get("data") is None:
        raise ZooError(
            "no data: pass --data (a folder, a file, or 'sentiment' for the shipped set)"
        )
    if cfg.get("task") is None:
        from zoo_ort.tasks.spec import infer_task_name

        cfg["task"] = infer_task_name(str(cfg["data"])) or (
            "custom" if cfg.get("template") else None
        )
        if cfg["task"] is None:
            raise ZooError(f"cannot tell the task of {cfg['data']}: pass --task")
    if for_training and not cfg.get("out"):
        raise ZooError("no run folder: pass --out RUN")
    typed = dict(provider_flags or {})
    generic = list(cfg.get("provider_option") or [])
    saved = cfg.get("provider_options") or {}
    generic += [
        f"{k}={v}" for k, v in saved.items() if not any(g.startswith(f"{k}=") for g in generic)
    ]
    cfg["provider_options"] = parse_options(cfg["provider"], typed, generic)
    cfg["provider_option"] = None
    return cfg


def _engine(cfg: Mapping[str, Any], bundle: Bundle) -> Any:
    from zoo_ort.engine import OrtEngine

    return OrtEngine(
        bundle,
        provider=cfg["provider"],
        provider_options=cfg["provider_options"],
        fallback=cfg.get("fallback"),
        threads=cfg.get("threads"),
    )


def _task(cfg: Mapping[str, Any]) -> Any:
    from zoo_ort.tasks.spec import build_task

    return build_task(
        cfg["task"],
        template=cfg.get("template"),
        label_field=cfg.get("label_field"),
        verbalizer=cfg.get("verbalizer"),
    )


def _split_data(
    cfg: Mapping[str, Any], bundle: Bundle, split: str, limit: int | None = None
) -> Any:
    from zoo_ort.tasks.dataset import load_task_data
    from zoo_ort.tasks.encode import TextEncoder

    encoder = TextEncoder.from_bundle(bundle)
    return load_task_data(
        cfg["data"], split, _task(cfg), encoder, max_length=int(cfg["max_length"]), limit=limit
    )


def split_lora(bundle: Bundle, lora: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """(trained, frozen) LoRA tensors: per-row inputs are trained, shared ones frozen."""
    trained = {t.input for t in bundle.manifest.trainable()}
    params = {k: np.asarray(v, np.float32) for k, v in lora.items() if k in trained}
    frozen = {k: np.asarray(v, np.float32) for k, v in lora.items() if k not in trained}
    return params, frozen


def train_config(cfg: Mapping[str, Any]) -> Any:
    from zoo_ort.train import TrainConfig

    return TrainConfig(
        steps=int(cfg["steps"]),
        lr=float(cfg["lr"]),
        eps=float(cfg["eps"]),
        queries=int(cfg["queries"]),
        batch_size=int(cfg["batch_size"]),
        optimizer=str(cfg["optimizer"]),
        momentum=float(cfg["momentum"]),
        schedule=str(cfg["schedule"]),
        warmup=int(cfg["warmup"]),
        weight_decay=float(cfg["weight_decay"]),
        seed=int(cfg["seed"]),
        mode=str(cfg["estimator"]),
        row_budget=int(cfg["row_budget"]) or None,
        loss=str(cfg["loss"]),
        save_every=int(cfg["save_every"]),
        eval_every=int(cfg["eval_every"]),
        eval_at_start=True,
    ).validate()


def save_adapter(bundle: Bundle) -> Callable[[dict, Mapping, Path], None]:
    from zoo_ort.adapters import save_onnx_adapter, save_peft_adapter

    def save(params: dict[str, np.ndarray], frozen: Mapping[str, np.ndarray], folder: Path) -> None:
        save_peft_adapter(folder, bundle.manifest, params, frozen)
        save_onnx_adapter(Path(folder) / "adapter.onnx_adapter", bundle.manifest, params, frozen)

    return save


def _fingerprint(cfg: Mapping[str, Any], bundle: Bundle) -> dict[str, Any]:
    manifest = (bundle.path / "manifest.json").read_bytes()
    return {
        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
        "task": cfg["task"],
        "data": str(cfg["data"]),
        "max_length": int(cfg["max_length"]),
        "template": cfg.get("template"),
        "verbalizer": cfg.get("verbalizer"),
        "label_field": cfg.get("label_field"),
        "eval_rows": int(cfg["eval_rows"]),
    }


def train_run(
    cfg: Mapping[str, Any],
    *,
    resume: bool = False,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Train as ``cfg`` says; returns a summary (metrics and the lines the CLI shows)."""
    from zoo_ort.evaluate import evaluate
    from zoo_ort.metrics import plot
    from zoo_ort.tasks.batches import make_batch_fn
    from zoo_ort.train import BEST_DIR, FINAL_DIR, train

    emit = on_event or (lambda kind, info: None)
    bundle = load_bundle(cfg["bundle"])
    tcfg = train_config(cfg)
    run_dir = Path(cfg["out"])
    train_data = _split_data(cfg, bundle, "train")
    dev_data = _split_data(cfg, bundle, "dev")
    if tcfg.loss == "candidates" and train_data.is_lm:
        raise ZooError("loss 'candidates' needs classification data; use --loss lm for LM data")
    engine = _engine(cfg, bundle)
    params, frozen = split_lora(bundle, bundle.initial_lora())
    batches = make_batch_fn(train_data, tcfg.batch_size, tcfg.seed)
    metric = "loss" if dev_data.is_lm else "accuracy"
    tcfg = replace(tcfg, best_metric=metric, best_mode="min" if dev_data.is_lm else "max")

    def dev_eval(lora: dict[str, np.ndarray]) -> dict[str, float]:
        p, f = split_lora(bundle, lora)
        return evaluate(
            engine,
            p,
            f,
            dev_data,
            batch_size=int(cfg["eval_batch_size"]),
            limit=int(cfg["eval_rows"]) or None,
        )

    from zoo_ort.checkpoint import has_checkpoint

    continuing = has_checkpoint(run_dir)
    if continuing and not resume:
        raise ZooError(
            f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out"
        )
    saved_cfg = {k: v for k, v in cfg.items() if v is not None and k != "bundle"}
    comment = f"resolved settings of this run; replay: zoo-ort train {cfg['bundle']} --config FILE"
    if not continuing:  # a resumed run's settings are checked by train() before they are saved
        run_dir.mkdir(parents=True, exist_ok=True)
        save_toml(run_dir / "config.toml", saved_cfg, comment=comment)
    emit("message", {"text": _describe(cfg, train_data, dev_data, engine)})

    started = time.perf_counter()

    def on_step(info: dict[str, Any]) -> None:
        if info.get("kind") == "step":
            emit("step", info)
        if info.get("eval"):
            emit("eval", {"step": info["step"], "split": "dev", "metrics": info["eval"]})

    emit("start", {"steps": tcfg.steps, "step": 0})
    result = train(
        engine,
        params,
        frozen,
        batches,
        tcfg,
        run_dir,
        evaluate=dev_eval,
        save_adapter=save_adapter(bundle),
        on_step=on_step,
        resume=resume,
        should_stop=should_stop,
        fingerprint=_fingerprint(cfg, bundle),
    )
    if continuing:
        save_toml(run_dir / "config.toml", saved_cfg, comment=comment)
    plotted = plot(run_dir)
    lines = [f"run folder: {run_dir}"]
    if result.stopped:
        lines.append(f"stopped at step {result.step}; continue with the same command and --resume")
    evals = _evals(run_dir)
    if evals:
        first, last = evals[0], evals[-1]
        lines.append(
            f"dev {metric}: before {first[metric]:.4f} (step {first['step']}) -> "
            f"after {last[metric]:.4f} (step {last['step']})"
            + (
                f"; best {result.best_metric:.4f} at step {result.best_step}"
                if result.best_metric is not None
                else ""
            )
        )
    if not result.stopped:
        lines.append(
            f"adapters (PEFT + .onnx_adapter): {run_dir / FINAL_DIR}, {run_dir / BEST_DIR}"
        )
    lines.append(
        f"metrics: {run_dir / 'metrics.jsonl'}; "
        + (f"plot: {plotted.path}" if plotted.path else plotted.message)
    )
    lines.append(f"wall time this call: {time.perf_counter() - started:.0f} s")
    return {"result": result, "evals": evals, "lines": lines}


def _evals(run_dir: Path) -> list[dict[str, Any]]:
    from zoo_ort.metrics import read_metrics

    return [{"step": r["step"], **r["eval"]} for r in read_metrics(run_dir) if r.get("eval")]


def _describe(cfg: Mapping[str, Any], train_data: Any, dev_data: Any, engine: Any) -> str:
    rows = 2 * int(cfg["queries"]) * int(cfg["batch_size"])
    return (
        f"task {cfg['task']}: {len(train_data)} train / {len(dev_data)} dev examples; "
        f"{cfg['steps']} steps of q={cfg['queries']} x B={cfg['batch_size']} "
        f"({rows} rows per pass), lr {cfg['lr']}, eps {cfg['eps']}, loss {cfg['loss']}; "
        f"providers {', '.join(engine.active_providers)}"
    )


def eval_run(
    cfg: Mapping[str, Any], *, adapter: str | Path | None = None, split: str = "dev"
) -> dict[str, float]:
    """Evaluate the bundle (with ``adapter``, a PEFT folder, if given) on ``split``."""
    from zoo_ort.evaluate import evaluate

    bundle = load_bundle(cfg["bundle"])
    lora = bundle.initial_lora()
    if adapter is not None:
        from zoo_ort.adapters import load_peft_adapter

        lora = load_peft_adapter(adapter, bundle.manifest)
    data = _split_data(cfg, bundle, split)
    engine = _engine(cfg, bundle)
    params, frozen = split_lora(bundle, lora)
    return evaluate(
        engine,
        params,
        frozen,
        data,
        batch_size=int(cfg["eval_batch_size"]),
        limit=int(cfg["eval_rows"]) or None,
    )

"""From settings to a run: the one public path from :class:`~zoo_ort.settings.Settings` to
(engine, data, parameters), used by the CLI, by apps that embed zoo-ort and by the benchmarks.

``resolve`` layers the settings (defaults < recipe < TOML file < flags); ``prepare`` builds what
a run needs from them; ``train_run`` and ``eval_run`` are what ``zoo-ort train`` and ``zoo-ort
eval`` do.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from zoo_ort.bundle import Bundle, load_bundle
from zoo_ort.engine.protocol import Engine, LabeledBatch
from zoo_ort.errors import ZooError
from zoo_ort.settings import (
    FIELDS,
    HOLDOUT_PREFIX,
    Resolved,
    Settings,
    load_toml,
    resolve_settings,
    save_toml,
)


def resolve(
    bundle: str | Path,
    flags: Mapping[str, Any],
    config_file: str | Path | None = None,
    *,
    provider_flags: Mapping[str, Any] | None = None,
    provider_option: Sequence[str] | None = None,
    for_training: bool = True,
) -> Resolved:
    """Defaults < the bundle's recipe < ``config_file`` < ``flags`` (None = not given).

    ``provider_flags`` are the typed per-device flags (``cuda_device_id=...``) and
    ``provider_option`` the generic ``key=value`` strings; both become ``provider_options``.
    """
    from zoo_ort.providers import parse_options

    b = load_bundle(bundle)
    recipe = {k: v for k, v in b.manifest.defaults.items() if k in FIELDS}
    toml = load_toml(config_file) if config_file else {}
    toml.pop("bundle", None)  # a saved config replays onto whichever bundle is named
    given = dict(flags) | {"bundle": str(bundle)}
    resolved = resolve_settings([("recipe", recipe), (str(config_file), toml), ("flags", given)])
    s = resolved.settings
    if s.data is None:
        raise ZooError(
            "no data: pass --data (a folder, a file, or 'sentiment' for the shipped set)"
        )
    if s.task is None:
        s = replace(s, task=_infer_task(s))
    sources = dict(resolved.sources)
    if s.task == "lm" and s.sampler == "balanced" and sources["sampler"] == "recipe":
        # A recipe's balanced batches are tuned for labelled data; LM text has no labels to
        # balance, so the recipe's choice gives way (an explicit --sampler balanced is refused).
        s, sources["sampler"] = replace(s, sampler="shuffle"), "recipe (shuffle: LM data)"
    if for_training and not s.out:
        raise ZooError("no run folder: pass --out RUN")
    generic = list(provider_option or [])
    generic += [
        f"{k}={v}"
        for k, v in s.provider_options.items()
        if not any(g.startswith(f"{k}=") for g in generic)
    ]
    options = parse_options(s.provider, dict(provider_flags or {}), generic)
    if provider_flags or provider_option:
        sources["provider_options"] = "flags"
    return Resolved(replace(s, provider_options=options).validate(), sources)


def _infer_task(s: Settings) -> str:
    from zoo_ort.tasks.files import resolve_data
    from zoo_ort.tasks.spec import infer_task_name

    resolve_data(s.data)  # a path that does not exist is named as such before anything else
    task = infer_task_name(str(s.data)) or ("custom" if s.template else None)
    if task is None:
        raise ZooError(f"cannot tell the task of {s.data}: pass --task")
    return task


@dataclass
class Prepared:
    """What a run needs, built from its settings."""

    settings: Settings
    bundle: Bundle
    engine: Engine
    params: dict[str, np.ndarray]  # trained LoRA tensors (initial adapter)
    frozen: dict[str, np.ndarray]  # shared LoRA tensors
    train_data: Any  # TaskData, or None when not asked for
    dev_data: Any  # TaskData of the evaluation split
    holdout_data: Any = None  # TaskData of the held-back training rows (settings.holdout)

    def batches(self) -> Callable[[int], LabeledBatch]:
        """``batches(step)``: the training minibatch of ``step``, a pure function of the seed."""
        from zoo_ort.tasks.sampler import make_batch_fn

        s = self.settings
        return make_batch_fn(self.train_data, s.batch_size, s.seed, sampler=s.sampler)

    def train(self, run_dir: str | Path, **options: Any) -> Any:
        """:func:`zoo_ort.loop.train.train` on these pieces: its data order, dev evaluation and
        adapter files, unless ``options`` (any of ``train``'s keywords) say otherwise."""
        from zoo_ort.loop.train import train

        own = {"evaluate": self.evaluate, "save_adapter": adapter_saver(self.bundle)}
        return train(
            self.engine,
            self.params,
            self.frozen,
            self.batches(),
            self.settings,
            run_dir,
            **(own | options),
        )

    def evaluate(self, lora: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Score the evaluation split with ``lora`` (full LoRA tensors, no row dim), and all the
        held-back training rows, if any, under ``holdout_`` names."""
        from zoo_ort.loop.evaluate import evaluate

        params, frozen = split_lora(self.bundle, lora)
        s = self.settings
        metrics = evaluate(
            self.engine,
            params,
            frozen,
            self.dev_data,
            batch_size=s.eval_batch_size,
            limit=s.eval_rows or None,
        )
        if self.holdout_data is not None:
            held = evaluate(
                self.engine, params, frozen, self.holdout_data, batch_size=s.eval_batch_size
            )
            metrics |= {HOLDOUT_PREFIX + k: v for k, v in held.items()}
        return metrics


def prepare(
    settings: Settings,
    *,
    train: bool = True,
    split: str = "dev",
    engine: Engine | None = None,
    train_limit: int | None = None,
) -> Prepared:
    """Load the bundle, the task's data (``train`` split if asked, less its last
    ``settings.holdout`` rows, and ``split``), the initial adapter, and an
    :class:`~zoo_ort.engine.ort.OrtEngine` unless ``engine`` is given."""
    s = settings
    if s.bundle is None or s.data is None or s.task is None:
        raise ZooError("settings need a bundle, data and a task (see zoo_ort.app.wiring.resolve)")
    bundle = load_bundle(s.bundle)
    train_data = _split_data(s, bundle, "train", train_limit) if train else None
    holdout_data = None
    if train and s.holdout:
        if s.holdout >= len(train_data):
            raise ZooError(
                f"holdout {s.holdout} leaves no training rows (the training split has "
                f"{len(train_data)}); hold back fewer"
            )
        train_data, holdout_data = train_data.split_tail(s.holdout)
    dev_data = _split_data(s, bundle, split)
    if train and s.loss == "candidates" and train_data.is_lm:
        raise ZooError("loss 'candidates' needs classification data; use --loss lm for LM data")
    if train and s.sampler == "balanced" and train_data.is_lm:
        raise ZooError("sampler 'balanced' needs labelled classification data; use 'shuffle'")
    if engine is None:
        engine = _ort_engine(s, bundle)
    params, frozen = split_lora(bundle, bundle.initial_lora())
    return Prepared(s, bundle, engine, params, frozen, train_data, dev_data, holdout_data)


def _ort_engine(s: Settings, bundle: Bundle) -> Engine:
    """``OrtEngine``, or ``TrunkEngine`` for a trunk + head bundle (its cache checked first)."""
    from zoo_ort.engine.ort import OrtEngine

    options = dict(
        provider=s.provider,
        provider_options=s.provider_options,
        fallback=s.fallback,
        threads=s.threads,
    )
    if bundle.manifest.trunk is None:
        return OrtEngine(bundle, **options)
    from zoo_ort.engine.trunk import TrunkEngine, check_cache_budget

    rows = max(s.batch_size, s.eval_batch_size)
    check_cache_budget(bundle.manifest, s.trunk_cache_mb, rows, s.max_length)
    return TrunkEngine(bundle, trunk_cache_mb=s.trunk_cache_mb, **options)


def _split_data(s: Settings, bundle: Bundle, split: str, limit: int | None = None) -> Any:
    from zoo_ort.tasks.dataset import load_task_data
    from zoo_ort.tasks.encode import TextEncoder
    from zoo_ort.tasks.spec import build_task

    task = build_task(
        s.task, template=s.template, label_field=s.label_field, verbalizer=s.verbalizer
    )
    encoder = TextEncoder.from_bundle(bundle)
    return load_task_data(s.data, split, task, encoder, max_length=s.max_length, limit=limit)


def split_lora(bundle: Bundle, lora: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """(trained, frozen) LoRA tensors: per-row inputs are trained, shared ones frozen."""
    trained = {t.input for t in bundle.manifest.trainable()}
    params = {k: np.asarray(v, np.float32) for k, v in lora.items() if k in trained}
    frozen = {k: np.asarray(v, np.float32) for k, v in lora.items() if k not in trained}
    return params, frozen


def adapter_saver(bundle: Bundle) -> Callable[[dict, Mapping, Path], None]:
    """``save(params, frozen, folder)``: PEFT adapter + ``.onnx_adapter`` in ``folder``."""
    from zoo_ort.adapters import save_onnx_adapter, save_peft_adapter

    def save(params: dict[str, np.ndarray], frozen: Mapping[str, np.ndarray], folder: Path) -> None:
        save_peft_adapter(folder, bundle.manifest, params, frozen)
        save_onnx_adapter(Path(folder) / "adapter.onnx_adapter", bundle.manifest, params, frozen)

    return save


def _fingerprint(bundle: Bundle) -> dict[str, Any]:
    manifest = (bundle.path / "manifest.json").read_bytes()
    return {"manifest_sha256": hashlib.sha256(manifest).hexdigest()}


def saved_settings(s: Settings) -> dict[str, Any]:
    """The settings as the run folder's ``config.toml`` holds them (replay with ``--config``)."""
    return {k: v for k, v in s.to_dict().items() if k != "bundle"}


Event = Callable[[str, dict[str, Any]], None]


EngineScope = Callable[["Prepared"], AbstractContextManager[Any]]


def train_run(
    settings: Settings,
    *,
    resume: bool = False,
    on_event: Event | None = None,
    should_stop: Callable[[], bool] | None = None,
    engine_scope: EngineScope | None = None,
) -> dict[str, Any]:
    """Train as ``settings`` say; returns a summary (result, evaluations, lines to show).

    ``engine_scope(prepared)`` (e.g. Ray workers) is a context manager yielding the engine the
    loop steps with, in place of the prepared one; it may offer ``finish(result) -> dict``
    (merged into the summary) and ``note`` (appended to the run's description).
    """
    from zoo_ort.loop.checkpoint import has_checkpoint

    emit = on_event or (lambda kind, info: None)
    run_dir = Path(settings.out)  # type: ignore[arg-type]
    continuing = has_checkpoint(run_dir)
    if continuing and not resume:
        raise ZooError(
            f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out"
        )
    p = prepare(settings)
    comment = f"resolved settings of this run; replay: zoo-ort train {settings.bundle} --config F"
    if not continuing:  # a resumed run's settings are checked by train() before they are saved
        run_dir.mkdir(parents=True, exist_ok=True)
        save_toml(run_dir / "config.toml", saved_settings(settings), comment=comment)
    started = time.perf_counter()

    def on_step(info: dict[str, Any]) -> None:
        if info.get("kind") in ("step", "resume"):
            emit(info["kind"], info)
        if info.get("eval"):
            emit("eval", {"step": info["step"], "split": "dev", "metrics": info["eval"]})

    extra: dict[str, Any] = {}
    with engine_scope(p) if engine_scope else nullcontext(p.engine) as engine:
        p = replace(p, engine=engine)
        emit("message", {"text": describe(p) + getattr(engine, "note", "")})
        emit("start", {"steps": settings.steps, "step": 0})
        result = p.train(
            run_dir,
            on_step=on_step,
            resume=resume,
            should_stop=should_stop,
            fingerprint=_fingerprint(p.bundle),
        )
        if hasattr(engine, "finish"):
            extra = dict(engine.finish(result))
    if continuing and not result.already_finished:
        save_toml(run_dir / "config.toml", saved_settings(settings), comment=comment)
    from zoo_ort.app.summary import summary_lines

    evals = _evals(run_dir)
    lines = summary_lines(settings, result, run_dir, evals, time.perf_counter() - started)
    return {"result": result, "evals": evals, "lines": lines, **extra}


def _evals(run_dir: Path) -> list[dict[str, Any]]:
    from zoo_ort.loop.metrics import read_metrics

    return [{"step": r["step"], **r["eval"]} for r in read_metrics(run_dir) if r.get("eval")]


def describe(p: Prepared) -> str:
    from zoo_ort.zo.rows import groups

    s = p.settings
    rows = len(groups(s.estimator, s.queries)) * s.batch_size  # fzoo: (q + 1)·B, hizoo: (2q + 1)·B
    return (
        f"task {s.task}: {len(p.train_data)} train / {len(p.dev_data)} dev examples; "
        f"{s.steps} {s.estimator} steps of q={s.queries} x B={s.batch_size} "
        f"({rows} rows per step), lr {s.lr}, eps {s.eps}, loss {s.loss}; "
        f"providers {', '.join(getattr(p.engine, 'active_providers', ['custom engine']))}"
    )


def eval_run(
    settings: Settings, *, adapter: str | Path | None = None, split: str = "dev"
) -> dict[str, float]:
    """Evaluate the bundle (with ``adapter``, a PEFT folder or a run folder, if given)."""
    p = prepare(settings, train=False, split=split)
    lora = p.bundle.initial_lora()
    if adapter is not None:
        from zoo_ort.adapters import load_peft_adapter

        lora = load_peft_adapter(adapter_folder(adapter), p.bundle.manifest)
    return p.evaluate(lora)


def adapter_folder(path: str | Path) -> Path:
    """A PEFT adapter folder; a run folder stands for its ``best/`` adapter."""
    from zoo_ort.adapters import PEFT_CONFIG
    from zoo_ort.loop.train import BEST_DIR

    path = Path(path)
    if not (path / PEFT_CONFIG).exists() and (path / BEST_DIR / PEFT_CONFIG).exists():
        return path / BEST_DIR
    return path

"""Every setting of a run, its only built-in default, its help text and where its value came from.

Settings are layered: built-in defaults < the bundle's recipe (``manifest.defaults``) < a TOML
file (``--config``, e.g. a run's saved ``config.toml``) < flags. :func:`resolve_settings` merges
the layers, type-checks and validates the result, and records for each name the layer it came
from (``zoo-ort train ... --show-config`` prints that). The CLI builds its training flags from
:data:`FIELDS`, so a setting is declared once, here.
"""

from __future__ import annotations

import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from zoo_ort.errors import ZooError
from zoo_ort.io import atomic_write_text

# The names the trainer understands. They live here, beside the defaults, so that the loop, the
# CLI and the validation cannot drift apart; the modules that implement them check membership.
ESTIMATORS = ("batched", "sequential", "fzoo", "hizoo")
LOSSES = ("candidates", "lm")
OPTIMIZERS = ("sgd", "adam", "sign")
SCHEDULES = ("constant", "linear", "cosine")
SAMPLERS = ("shuffle", "balanced")
# Metrics of the held-back training rows (settings.holdout) carry this prefix beside the dev ones.
HOLDOUT_PREFIX = "holdout_"


def _s(default: Any, help: str, section: str, *, flag: bool = True) -> Any:
    meta = {"help": help, "section": section, "flag": flag}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Settings:
    """One run's settings. Sections: data, train, eval, run, engine."""

    # -- data
    data: str | None = _s(None, "Data folder or file ('sentiment': the shipped set)", "data")
    task: str | None = _s(None, "sst2, rte, boolq, sentiment, lm or custom [from --data]", "data")
    template: str | None = _s(None, "Prompt template, e.g. '{text} It was'", "data")
    verbalizer: str | None = _s(None, "Label words, e.g. '0= bad,1= good'", "data")
    label_field: str | None = _s(None, "Label column/field of custom data", "data")
    max_length: int = _s(256, "Truncate examples to this many tokens", "data")
    sampler: str = _s(
        "shuffle",
        "shuffle (a permutation per epoch) or balanced (every batch split evenly across labels)",
        "data",
    )
    # -- train
    steps: int = _s(1000, "Optimisation steps", "train")
    lr: float = _s(1e-2, "Peak learning rate", "train")
    eps: float = _s(1e-2, "Perturbation size ε", "train")
    queries: int = _s(1, "Random directions q per step", "train")
    batch_size: int = _s(16, "Examples B per step", "train")
    estimator: str = _s(
        "batched",
        "batched (P-RGE: one pass of 2qB rows), sequential (MeZO), fzoo (Rademacher, one-sided, "
        "std-normalised; q >= 2) or hizoo (diagonal-Hessian preconditioned)",
        "train",
    )
    hizoo_smooth: float = _s(
        1e-8, "HiZOO: EMA weight α of the diagonal Hessian estimate (paper: 1e-8)", "train"
    )
    row_budget: int = _s(0, "Most rows per forward pass (0: no limit)", "train")
    loss: str = _s(
        "candidates", "candidates (MeZO's label-word CE) or lm (label-token NLL)", "train"
    )
    optimizer: str = _s("sgd", "sgd, adam or sign", "train")
    momentum: float = _s(0.0, "Momentum (sgd, sign)", "train")
    betas: tuple[float, float] = _s((0.9, 0.999), "Adam's betas", "train", flag=False)
    adam_eps: float = _s(1e-8, "Adam's epsilon", "train", flag=False)
    schedule: str = _s("constant", "constant, linear or cosine (to 0 after warm-up)", "train")
    warmup: int = _s(0, "Linear warm-up steps", "train")
    weight_decay: float = _s(0.0, "Weight decay (adam: decoupled; sgd, sign: L2)", "train")
    seed: int = _s(0, "Run seed (data order and directions)", "train")
    max_non_finite: int = _s(10, "Abort after more skipped (non-finite) steps", "train", flag=False)
    # -- eval
    eval_every: int = _s(100, "Evaluate on the dev split every K steps (0: at the end)", "eval")
    eval_rows: int = _s(0, "Evaluate on the first R dev rows (0: all)", "eval")
    eval_batch_size: int = _s(32, "Rows per evaluation pass", "eval")
    holdout: int = _s(
        0,
        "Hold back the last H training rows (never trained on) and pick best/ on them, not on "
        "the dev split, which is then only reported (0: pick on the dev split)",
        "eval",
    )
    eval_at_start: bool = _s(True, "Also evaluate the initial adapter", "eval", flag=False)
    best_metric: str = _s(
        "auto", "Dev metric picking best/ (auto: accuracy, or loss for LM)", "eval", flag=False
    )
    time_limit: str | None = _s(
        None,
        "Stop after this much training time (e.g. 90s, 10m, 1.5h; evaluations not counted): "
        "final eval, adapters, checkpoint; --resume continues",
        "train",
    )
    # -- run
    bundle: str | None = _s(None, "Bundle folder made by `zoo-ort export`", "run", flag=False)
    out: str | None = _s(None, "Run folder", "run", flag=False)
    save_every: int = _s(100, "Checkpoint every K steps (0: only at the end)", "run")
    keep_checkpoints: int = _s(2, "Checkpoints kept", "run", flag=False)
    # -- engine
    provider: str = _s("cpu", "Execution provider (see `zoo-ort providers`)", "engine", flag=False)
    fallback: str | None = _s(None, "Fall back to this provider (only 'cpu')", "engine", flag=False)
    threads: int | None = _s(None, "CPU threads for ONNX Runtime", "engine")
    trunk_cache_mb: float = _s(
        512.0, "Memory for cached trunk outputs of two-graph bundles (0: no cache)", "engine"
    )
    provider_options: dict[str, str] = _s({}, "Resolved EP options", "engine", flag=False)

    def validate(self) -> Settings:
        for problem in _problems(self):
            raise ZooError(f"bad setting: {problem}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON/TOML-ready values (tuples as lists, None kept)."""
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @property
    def best(self) -> tuple[str, str]:
        """(metric, "max" | "min") that picks the best adapter; LM data is scored by loss, and
        with ``holdout`` the metric is the held-back rows' (``holdout_accuracy``, ...)."""
        metric = self.best_metric
        if metric == "auto":
            metric = "loss" if self.task == "lm" else "accuracy"
        if self.holdout and not metric.startswith(HOLDOUT_PREFIX):
            metric = HOLDOUT_PREFIX + metric  # scored on the held-back training rows
        low = any(k in metric for k in ("loss", "nll", "perplexity"))
        return metric, "min" if low else "max"

    @property
    def time_limit_s(self) -> float | None:
        """``time_limit`` in seconds (None: no limit)."""
        return None if self.time_limit is None else _seconds(self.time_limit)

    def identity(self) -> dict[str, Any]:
        """What a resumed run must share with the original: everything that moves parameters."""
        return {k: v for k, v in self.to_dict().items() if k not in RESUME_SAFE}


FIELDS = {f.name: f for f in fields(Settings)}
DEFAULTS = Settings()
# Free to change between a run and its resumption: where it runs and how often it saves.
RESUME_SAFE = frozenset(
    {
        "bundle",
        "out",
        "time_limit",
        "save_every",
        "keep_checkpoints",
        "max_non_finite",
        "eval_batch_size",
    }
    | {"provider", "fallback", "threads", "provider_options", "trunk_cache_mb"}
)


def _problems(s: Settings) -> list[str]:
    checks = [
        (s.steps >= 1, f"steps must be >= 1 (got {s.steps})"),
        (s.lr >= 0, f"lr must be >= 0 (got {s.lr})"),
        (s.eps > 0, f"eps must be > 0 (got {s.eps})"),
        (s.queries >= 1, f"queries must be >= 1 (got {s.queries})"),
        (s.batch_size >= 1, f"batch_size must be >= 1 (got {s.batch_size})"),
        (s.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}"),
        (s.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}"),
        (s.estimator in ESTIMATORS, f"estimator must be one of {', '.join(ESTIMATORS)}"),
        (0.0 <= s.hizoo_smooth <= 1.0, f"hizoo_smooth must be in [0, 1] (got {s.hizoo_smooth})"),
        # FZOO divides by the spread of its perturbed losses: one query has none, and two have a
        # spread |L1 - L2|/sqrt(2) near zero whenever they score alike, so the step blows up
        # (measured: q=2 diverged at the recipe's lr where q=4 did not; selection.md §4).
        (
            s.estimator != "fzoo" or s.queries >= 3,
            f"estimator fzoo needs queries >= 3 (got {s.queries}): it divides by the spread of "
            "the perturbed losses, which two or fewer cannot estimate",
        ),
        (s.loss in LOSSES, f"loss must be one of {', '.join(LOSSES)}"),
        (s.sampler in SAMPLERS, f"sampler must be one of {', '.join(SAMPLERS)}"),
        (s.warmup >= 0, "warmup must be >= 0"),
        (0.0 <= s.momentum < 1.0, "momentum must be in [0, 1)"),
        (len(s.betas) == 2 and all(0 <= b < 1 for b in s.betas), "betas must be in [0, 1)"),
        (s.row_budget >= 0, "row_budget must be >= 0"),
        (s.save_every >= 0 and s.eval_every >= 0, "save_every and eval_every must be >= 0"),
        (s.eval_rows >= 0 and s.eval_batch_size >= 1, "eval_rows >= 0, eval_batch_size >= 1"),
        (s.holdout >= 0, "holdout must be >= 0 (0: pick best/ on the dev split)"),
        (s.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
        (s.seed >= 0, "seed must be >= 0"),
        (s.max_non_finite >= 0, "max_non_finite must be >= 0"),
        (s.max_length >= 2, "max_length must be >= 2"),
        (s.threads is None or s.threads >= 1, "threads must be >= 1"),
        (s.trunk_cache_mb >= 0, "trunk_cache_mb must be >= 0 (0: no cache)"),
        (s.time_limit is None or _seconds(s.time_limit) is not None, _TIME_HELP),
    ]
    return [msg for ok, msg in checks if not ok]


_TIME_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_TIME_HELP = "time_limit must be a positive duration such as 600, 90s, 10m or 1.5h"


def _seconds(text: str) -> float | None:
    """``"10m"`` -> 600.0; None when it does not parse or is not positive."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|min|h)?\s*", str(text).lower())
    if not m:
        return None
    value = float(m.group(1)) * _TIME_UNITS[m.group(2) or ""]
    return value if value > 0 else None


def _coerce(key: str, value: Any, hint: Any) -> Any:
    bad = ZooError(f"setting {key}: {value!r} is not a valid {getattr(hint, '__name__', hint)}")
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, _UnionType) else ()
    if type(None) in options:
        if value is None:
            return None
        (hint,) = [o for o in options if o is not type(None)]
    if hint is bool or hint is str:
        if not isinstance(value, hint):
            raise bad
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        return float(value)
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list | tuple) or len(value) != 2:
            raise bad
        return tuple(_coerce(key, v, float) for v in value)
    if typing.get_origin(hint) is dict:
        if not isinstance(value, Mapping):
            raise bad
        return {str(k): str(v) for k, v in value.items()}
    raise bad


_UnionType = type(int | None)
_HINTS = typing.get_type_hints(Settings)


@dataclass(frozen=True)
class Resolved:
    settings: Settings
    sources: dict[str, str]  # name -> the layer its value came from ("default" if none)


def resolve_settings(layers: list[tuple[str, Mapping[str, Any]]]) -> Resolved:
    """Merge ``(layer name, values)`` pairs, later layers winning; ``None`` means "not given".

    Unknown names and wrong types are a :class:`ZooError` naming the layer.
    """
    values: dict[str, Any] = {}
    sources = dict.fromkeys(FIELDS, "default")
    for where, layer in layers:
        unknown = sorted(set(layer) - set(FIELDS))
        if unknown:
            raise ZooError(
                f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}"
            )
        for key, value in layer.items():
            if value is None:
                continue
            try:
                values[key] = _coerce(key, value, _HINTS[key])
            except ZooError as e:
                raise ZooError(f"{where}: {e}") from None
            sources[key] = where
    return Resolved(replace(DEFAULTS, **values).validate(), sources)


def settings(**values: Any) -> Settings:
    """``Settings`` from keyword values, type-checked and validated (for library users)."""
    return resolve_settings([("arguments", values)]).settings


def default_of(name: str) -> Any:
    f = FIELDS[name]
    return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]


# -- TOML ------------------------------------------------------------------------------------------


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ZooError(f"{path}: config file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ZooError(f"{path}: not valid TOML ({e})") from None
    # A saved run config nests everything under [train]; a hand-written one may be flat.
    return dict(data.get("train", data))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dumps_toml(config: Mapping[str, Any], table: str = "train", comment: str = "") -> str:
    """A flat config (one level of sub-tables allowed) as TOML; ``None`` values are left out."""
    scalars = {k: v for k, v in config.items() if v is not None and not isinstance(v, Mapping)}
    tables = {k: v for k, v in config.items() if isinstance(v, Mapping) and v}
    lines = (
        [f"# {c}" for c in comment.splitlines()]
        + [f"[{table}]"]
        + [f"{k} = {_toml_value(v)}" for k, v in scalars.items()]
    )
    for name, sub in tables.items():
        lines += ["", f"[{table}.{name}]"]
        lines += [f"{_toml_value(str(k))} = {_toml_value(v)}" for k, v in sub.items()]
    return "\n".join(lines) + "\n"


def save_toml(
    path: str | Path, config: Mapping[str, Any], table: str = "train", comment: str = ""
) -> None:
    atomic_write_text(path, dumps_toml(config, table, comment))

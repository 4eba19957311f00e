"""Whether an execution provider can be used on this machine, and if not, why."""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import logging
import platform
import sys
from typing import Any

import onnxruntime as ort
from zoo_ort.providers.options import get_spec
from zoo_ort.providers.spec import ProviderSpec
from zoo_ort.providers.table import PROVIDERS

log = logging.getLogger(__name__)

_ARCH = {
    "amd64": "x86_64",
    "x86_64": "x86_64",
    "x64": "x86_64",
    "aarch64": "arm64",
    "arm64": "arm64",
}
_registered: dict[str, str] = {}  # plugin registration name -> library path (once per process)


def current_platform() -> str:
    """``"linux-x86_64"``, ``"windows-arm64"``, ``"macos-arm64"``, ``"android-arm64"``, ..."""
    if sys.platform == "android" or hasattr(sys, "getandroidapilevel"):
        os_name = "android"
    elif sys.platform == "ios":
        os_name = "ios"
    elif sys.platform.startswith("win"):
        os_name = "windows"
    elif sys.platform == "darwin":
        os_name = "macos"
    else:
        os_name = sys.platform.rstrip("0123456789")
    machine = platform.machine().lower()
    return f"{os_name}-{_ARCH.get(machine, machine)}"


def platform_supported(spec: ProviderSpec, here: str | None = None) -> bool:
    here = here or current_platform()
    os_name = here.split("-", 1)[0]
    return any(p in ("any", here, os_name) for p in spec.platforms)


@functools.cache
def installed_onnxruntime() -> str:
    """The installed ONNX Runtime distributions, e.g. ``"onnxruntime 1.32.0"``."""
    found = []
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name == "onnxruntime" or name.startswith("onnxruntime-") or name == "ort-nightly":
            found.append(f"{name} {dist.version}")
    return ", ".join(sorted(set(found))) or f"onnxruntime {ort.__version__}"


def _plugin_module(spec: ProviderSpec) -> Any | None:
    if spec.plugin is None or importlib.util.find_spec(spec.plugin.module) is None:
        return None
    return importlib.import_module(spec.plugin.module)


def register_plugin(spec: ProviderSpec) -> bool:
    """Register ``spec``'s plugin library with ORT if its package is installed; True if done."""
    plugin = spec.plugin
    if plugin is None:
        return False
    if plugin.registration_name in _registered:
        return True
    module = _plugin_module(spec)
    if module is None:
        return False
    path = str(getattr(module, plugin.path_function)())
    try:
        ort.register_execution_provider_library(plugin.registration_name, path)
    except Exception as e:  # ORT raises its own Fail type; "already registered" is fine
        if "already registered" not in str(e).lower():
            log.warning("could not register %s from %s: %s", plugin.registration_name, path, e)
            return False
    _registered[plugin.registration_name] = path
    return True


def plugin_devices(spec: ProviderSpec) -> list[Any]:
    """The ``OrtEpDevice``s ORT offers for ``spec`` through the plugin-EP API (maybe none)."""
    register_plugin(spec)
    get = getattr(ort, "get_ep_devices", None)
    if get is None:  # ORT older than the plugin-EP API
        return []
    name = spec.plugin.registration_name if spec.plugin else spec.ort_name
    return [d for d in get() if d.ep_name == name]


def availability(name: str) -> tuple[bool, str]:
    """``(usable, why)``: can ``name`` create sessions here, and the reason either way."""
    spec = get_spec(name)
    here = current_platform()
    if spec.name == "cpu":
        return True, f"always available ({installed_onnxruntime()})"
    if not platform_supported(spec, here):
        return False, (
            f"{spec.ort_name} runs on {', '.join(spec.platforms)}; this machine is {here}"
        )
    if spec.ort_name in ort.get_available_providers():
        return True, f"built into the installed {installed_onnxruntime()}"
    devices = plugin_devices(spec)
    if devices:
        kinds = sorted({str(d.device.type).rsplit(".", 1)[-1] for d in devices})
        return True, f"plugin EP with {len(devices)} device(s) ({', '.join(kinds)})"
    if spec.plugin is not None and _plugin_module(spec) is not None:
        return False, f"{spec.plugin.package} is installed but found no device for {spec.ort_name}"
    return False, (
        f"{spec.ort_name} is not in the installed {installed_onnxruntime()}; "
        f"it needs {spec.package}"
    )


def describe_all() -> list[dict[str, Any]]:
    """Every table entry with its availability here, for ``zoo-ort providers``."""
    rows = []
    for spec in PROVIDERS.values():
        available, why = availability(spec.name)
        rows.append(
            {
                "name": spec.name,
                "ort_name": spec.ort_name,
                "available": available,
                "why": why,
                "package": spec.package,
                "platforms": list(spec.platforms),
                "static_shapes": spec.static_shapes,
                "precision": spec.precision,
                "io_binding": spec.io_binding_device is not None,
                "plugin": spec.plugin.package if spec.plugin else None,
                "constraints": list(spec.constraints),
                "note": spec.note,
                "options": [
                    {
                        "name": o.name,
                        "kind": o.kind,
                        "default": o.default,
                        "zoo_default": o.zoo_default,
                        "choices": list(o.choices),
                        "help": o.help,
                        "ort_key": o.ort_key,
                        "cli_flag": o.cli_flag,
                    }
                    for o in spec.options
                ],
            }
        )
    return rows

"""An ``InferenceSession`` on a chosen execution provider, with an explicit fallback policy.

ONNX Runtime quietly runs on the CPU when an EP cannot be created; zoo-ort does not: the session's
providers are checked afterwards and anything but the asked-for EP is an error, unless the caller
allowed ``fallback="cpu"``.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import onnxruntime as ort
from zoo_ort.providers.availability import (
    availability,
    installed_onnxruntime,
    plugin_devices,
    register_plugin,
)
from zoo_ort.providers.options import get_spec
from zoo_ort.providers.spec import SESSION_CONFIG_PREFIXES, ProviderSpec

from zoo_ort.errors import ZooError

log = logging.getLogger(__name__)

FALLBACKS = (None, "cpu")
SessionExtra = Mapping[str, str] | Callable[[ort.SessionOptions], None] | None


def split_options(options: Mapping[str, object] | None) -> tuple[dict[str, str], dict[str, str]]:
    """``(provider options, session config entries)`` from one ``{key: value}`` mapping."""
    provider, session = {}, {}
    for key, value in (options or {}).items():
        text = str(value)
        (session if key.startswith(SESSION_CONFIG_PREFIXES) else provider)[key] = text
    return provider, session


def _one_line(error: BaseException) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(error).__name__


@contextmanager
def _ort_log_capture(lines: list[str]) -> Iterator[None]:
    """Collect ORT's warnings while a session is created (they explain silent EP fallbacks)."""
    install = getattr(ort, "set_default_logger_callback", None)
    if install is None:
        yield
        return

    def callback(severity: int, category: str, logid: str, where: str, message: str) -> None:
        lines.append(message)
        log.debug("onnxruntime: %s", message)

    try:
        install(callback, 2)
    except Exception:  # an ORT without a Python-created environment: keep its own logger
        yield
        return
    try:
        yield
    finally:
        install(None, 2)


@contextmanager
def _quiet(lines: list[str]) -> Iterator[None]:
    """ORT's log and Python warnings during session creation go to ``lines``, not the terminal."""
    with warnings.catch_warnings(record=True) as caught, _ort_log_capture(lines):
        warnings.simplefilter("always")
        yield
    for w in caught:
        lines.append(str(w.message))
        log.debug("onnxruntime warning: %s", w.message)


def _session_options(
    spec: ProviderSpec,
    intra_op_threads: int | None,
    session_config: Mapping[str, str],
    extra: SessionExtra,
) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only: warnings are captured and logged, not printed
    if intra_op_threads is not None:
        if intra_op_threads < 1:
            raise ZooError(f"threads must be at least 1 (got {intra_op_threads})")
        so.intra_op_num_threads = int(intra_op_threads)
    for attr, value in spec.session_settings:
        if attr == "execution_mode":
            value = getattr(ort.ExecutionMode, str(value))
        setattr(so, attr, value)
    for key, value in session_config.items():
        so.add_session_config_entry(key, value)
    if callable(extra):
        extra(so)
    elif extra:
        for key, value in extra.items():
            so.add_session_config_entry(str(key), str(value))
    return so


def _cpu_session(path: str, threads: int | None, extra: SessionExtra) -> ort.InferenceSession:
    so = _session_options(get_spec("cpu"), threads, {}, extra)
    try:
        return ort.InferenceSession(
            path, sess_options=so, providers=["CPUExecutionProvider"], enable_fallback=0
        )
    except Exception as e:
        raise ZooError(f"{path}: ONNX Runtime cannot load this model ({_one_line(e)})") from None


def _select_devices(spec: ProviderSpec, options: dict[str, str]) -> list[Any]:
    """The plugin EP's devices narrowed by the user's options (consumes an index option)."""
    devices = plugin_devices(spec)
    sel = spec.device_selection
    if sel.type_option:
        want = dict(sel.type_map).get(options.get(sel.type_option, ""))
        typed = [d for d in devices if str(d.device.type).rsplit(".", 1)[-1] == want]
        devices = typed or devices
    if sel.index_option and sel.index_option in options:
        index = int(options.pop(sel.index_option))
        if index >= len(devices):
            raise ZooError(
                f"{spec.name}: device {index} asked for, but ORT found {len(devices)} device(s)"
            )
        devices = [devices[index]]
    return devices


def _fill_module_defaults(spec: ProviderSpec, options: dict[str, str]) -> None:
    if spec.plugin is None or not spec.plugin.module_defaults:
        return
    import importlib

    module = importlib.import_module(spec.plugin.module)
    for key, function, unless in spec.plugin.module_defaults:
        if not any(k in options for k in unless) and hasattr(module, function):
            options[key] = str(getattr(module, function)())


def _create(
    path: str, spec: ProviderSpec, provider_options: dict[str, str], so: ort.SessionOptions
) -> ort.InferenceSession:
    if spec.name == "cpu":
        return ort.InferenceSession(
            path, sess_options=so, providers=["CPUExecutionProvider"], enable_fallback=0
        )
    if spec.ort_name in ort.get_available_providers():
        # Built into this ORT build: the classic providers list (CPU takes what the EP cannot).
        device = provider_options.get("device_id")
        providers: list[Any] = [(spec.ort_name, provider_options)]
        providers += [(c, {"device_id": device} if device else {}) for c in spec.companions]
        providers.append("CPUExecutionProvider")
        return ort.InferenceSession(path, sess_options=so, providers=providers, enable_fallback=0)
    # A plugin EP (QNN >= 2.0, ORT's bundled CUDA plugin): register, pick devices, attach.
    register_plugin(spec)
    options = dict(provider_options)
    _fill_module_defaults(spec, options)
    devices = _select_devices(spec, options)
    if not devices:
        raise ZooError(f"{spec.ort_name}: ORT lists no device for this plugin EP")
    so.add_provider_for_devices(devices, options)
    return ort.InferenceSession(path, sess_options=so, enable_fallback=0)


def make_session(
    model_path: str | os.PathLike,
    provider: str,
    options: Mapping[str, object] | None = None,
    *,
    fallback: str | None = None,
    intra_op_threads: int | None = None,
    session_options_extra: SessionExtra = None,
) -> ort.InferenceSession:
    """An ``InferenceSession`` for ``model_path`` on ``provider`` (a table name).

    ``options`` are ORT option strings as :func:`parse_options` returns them (session config
    keys included). ``fallback="cpu"`` allows running on the CPU when the EP is missing or
    cannot start; without it that is a :class:`ZooError`. ``session_options_extra`` is either
    a mapping of extra session config entries or a callable that edits the ``SessionOptions``.
    """
    spec = get_spec(provider)
    if fallback not in FALLBACKS:
        raise ZooError(f"fallback must be 'cpu' or nothing (got {fallback!r})")
    path = os.fspath(model_path)
    if not os.path.isfile(path):
        raise ZooError(f"{path}: model file not found")
    provider_options, session_config = split_options(options)

    def fall_back(reason: str) -> ort.InferenceSession:
        if fallback != "cpu":
            raise ZooError(reason + "; pass --fallback cpu to run on the CPU instead")
        log.warning("%s; falling back to the CPU", reason)
        return _cpu_session(path, intra_op_threads, session_options_extra)

    usable, why = availability(spec.name)
    if not usable:
        return fall_back(f"provider {spec.name} is not usable here: {why}")

    so = _session_options(spec, intra_op_threads, session_config, session_options_extra)
    ort_log: list[str] = []
    try:
        with _quiet(ort_log):
            session = _create(path, spec, provider_options, so)
    except ZooError:
        raise
    except Exception as e:  # ORT's Fail/InvalidArgument/...: EP options, drivers, the model
        if spec.name == "cpu":
            raise ZooError(
                f"{path}: ONNX Runtime cannot load this model ({_one_line(e)})"
            ) from None
        return fall_back(f"{spec.ort_name} could not start ({_one_line(e)})")

    if spec.ort_name not in session.get_providers():
        hint = next((m for m in reversed(ort_log) if spec.ort_name in m or "fail" in m.lower()), "")
        detail = f": {_one_line(Exception(hint))}" if hint else ""
        reason = (
            f"ONNX Runtime could not start {spec.ort_name} and would run on "
            f"{', '.join(session.get_providers())}{detail} (installed: {installed_onnxruntime()})"
        )
        if fallback != "cpu":
            raise ZooError(reason + "; pass --fallback cpu to accept that")
        log.warning("%s; running on the CPU", reason)
    return session

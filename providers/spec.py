"""The shape of one execution-provider entry: its options, constraints and how ORT gets it.

The table itself is :mod:`zoo_ort.providers.table`; these classes only describe its rows, so
adding an EP is adding data, never a branch in the session code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Option kinds: how a value is checked and how it is spelt for ORT (every ORT option is a string).
KINDS = ("int", "bytes", "bool", "choice", "str", "path")

# ORT keys with these prefixes are session config entries (SessionOptions.add_session_config_entry),
# not provider options: e.g. QNN's context cache ("ep.context_enable").
SESSION_CONFIG_PREFIXES = ("session.", "ep.context_", "optimization.")


@dataclass(frozen=True)
class ProviderOption:
    """One typed option of an execution provider."""

    name: str  # zoo-ort's name, e.g. "device_id"
    kind: str  # one of KINDS
    default: object  # ORT's own default (shown to users); None: ORT decides / unset
    help: str  # one line
    ort_key: str  # the key ORT reads, e.g. "gpu_mem_limit" or "NNAPI_FLAG_USE_FP16"
    choices: tuple[str, ...] = ()  # for kind "choice"
    cli_flag: str | None = None  # typed CLI flag, e.g. "--cuda-device-id"
    zoo_default: object = None  # what zoo-ort sets when the user says nothing (None: leave to ORT)
    minimum: int | None = None  # for "int"/"bytes"
    bool_strings: tuple[str, str] = ("1", "0")  # how this EP spells true / false

    @property
    def session_config(self) -> bool:
        return self.ort_key.startswith(SESSION_CONFIG_PREFIXES)


@dataclass(frozen=True)
class PluginLibrary:
    """A plugin EP shipped as a separate Python package (ORT's plugin-EP API).

    Registration: ``onnxruntime.register_execution_provider_library(registration_name,
    module.<path_function>())``; the EP is then attached with
    ``SessionOptions.add_provider_for_devices(devices, options)`` for the ``OrtEpDevice``s whose
    ``ep_name`` is ``registration_name``.
    """

    module: str  # importable module, e.g. "onnxruntime_qnn"
    package: str  # pip name, e.g. "onnxruntime-qnn"
    path_function: str  # module function returning the shared library's path
    registration_name: str  # also the EP name its devices report
    # Options filled from module functions when none of ``unless`` is set by the user, e.g. QNN's
    # backend_path from onnxruntime_qnn.get_qnn_htp_path(): (ort_key, function, unless-keys).
    module_defaults: tuple[tuple[str, str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True)
class DeviceSelection:
    """How a plugin EP's ``OrtEpDevice``s are narrowed by the user's options."""

    # option whose value picks a hardware type, and the map value -> OrtHardwareDeviceType name
    type_option: str | None = None
    type_map: tuple[tuple[str, str], ...] = ()
    # option whose integer value indexes the EP's devices (e.g. CUDA's device_id); it is consumed
    # by the selection and not passed on as an EP option
    index_option: str | None = None


@dataclass(frozen=True)
class ProviderSpec:
    """One execution provider: identity, how to get it, its options and what it demands."""

    name: str  # zoo-ort's short name: "cpu", "cuda", ...
    ort_name: str  # ORT's provider name: "CUDAExecutionProvider"
    package: str  # what brings it: a pip package, an ORT build, a mobile package
    platforms: tuple[str, ...]  # "linux-x86_64", "windows-arm64", "android", "macos", ... or "any"
    options: tuple[ProviderOption, ...] = ()
    constraints: tuple[str, ...] = ()  # one line each, for people
    static_shapes: bool = False  # True: the EP needs static input shapes (export with --static)
    precision: str = "fp32"  # what the EP runs best: "fp32", "fp16", "quantized"
    # IO binding: the OrtDevice type of device-resident inputs ("cuda"), or None (host feeds)
    io_binding_device: str | None = None
    plugin: PluginLibrary | None = None
    device_selection: DeviceSelection = field(default_factory=DeviceSelection)
    # other ORT providers listed after this one (before CPU), e.g. TensorRT -> CUDA
    companions: tuple[str, ...] = ()
    # SessionOptions attributes the EP requires, e.g. DirectML: enable_mem_pattern=False
    session_settings: tuple[tuple[str, object], ...] = ()
    note: str = ""  # anything else a user must know, one line

    def option(self, key: str) -> ProviderOption | None:
        """The option called ``key`` (zoo name, CLI-style name or ORT key), or None."""
        for opt in self.options:
            if key in (opt.name, opt.ort_key) or (
                opt.cli_flag and key == opt.cli_flag.lstrip("-").replace("-", "_")
            ):
                return opt
        return None

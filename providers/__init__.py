"""Execution providers: the table, availability checks and session creation.

``PROVIDERS`` is data (one :class:`ProviderSpec` per EP); everything else reads it.
"""

from zoo_ort.providers.availability import (
    availability,
    current_platform,
    describe_all,
    plugin_devices,
    register_plugin,
)
from zoo_ort.providers.options import get_spec, parse_options
from zoo_ort.providers.session import make_session, split_options
from zoo_ort.providers.spec import (
    KINDS,
    SESSION_CONFIG_PREFIXES,
    DeviceSelection,
    PluginLibrary,
    ProviderOption,
    ProviderSpec,
)
from zoo_ort.providers.table import PROVIDERS

__all__ = [
    "KINDS",
    "PROVIDERS",
    "SESSION_CONFIG_PREFIXES",
    "DeviceSelection",
    "PluginLibrary",
    "ProviderOption",
    "ProviderSpec",
    "availability",
    "current_platform",
    "describe_all",
    "get_spec",
    "make_session",
    "parse_options",
    "plugin_devices",
    "register_plugin",
    "split_options",
]

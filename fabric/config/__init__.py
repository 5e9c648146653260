"""One typed configuration for fabric: the model, its keys, and the effective configuration of a process.

* :mod:`.model` -- the msgspec Structs (``FabricConfig`` and a section per area), bounds and cross-field rules;
* :mod:`.keys` -- the keys derived from the model, and their environment names (one rule);
* :mod:`.sources` -- reading a TOML file, the environment and flags into settings;
* :mod:`.load` -- merging them (defaults < file < environment < flags) and checking every value.

The service kit (:func:`fabric.service.main`), ``fabric up`` and ``fabric config`` read
the configuration through :func:`load_config`; services get their section through
:class:`fabric.service.ServiceSettings`'s ``config`` and never read the environment.
docs/config.md documents every key.
"""

from __future__ import annotations

from .keys import DEPRECATED_ENV, KEYS, env_name
from .load import CONFIG_FILE_NAME, Loaded, check_section, load_config, validate_file
from .model import (
    DEFAULT_NATS_URL,
    FabricConfig,
    GatewayConfig,
    MemConfig,
    NatsConfig,
    PoolConfig,
    SandboxConfig,
    TasksConfig,
    TelemetryConfig,
    UpConfig,
    default_node,
)
from .sources import ConfigError, ConfigIssue

__all__ = ["FabricConfig", "NatsConfig", "UpConfig", "SandboxConfig", "MemConfig", "PoolConfig", "TelemetryConfig",
           "TasksConfig", "GatewayConfig",
           "DEFAULT_NATS_URL", "KEYS", "DEPRECATED_ENV", "env_name", "CONFIG_FILE_NAME", "Loaded", "load_config",
           "validate_file", "check_section", "ConfigError", "ConfigIssue", "default_node"]

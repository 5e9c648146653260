"""The keys of the configuration, derived from the model: paths, types, defaults and environment names.

Nothing here is a hand-written list of keys: :data:`KEYS` walks
:class:`~.model.FabricConfig`, so a field added to the model is a key, with its
environment name, at once.  The one naming rule: ``FABRIC_`` + the dotted path
upper-cased with ``.`` -> ``_`` (``mem.capacity`` -> ``FABRIC_MEM_CAPACITY``).

:data:`DEPRECATED_ENV` is the exception kept for one release: the two variables
named before the rule existed, still read, with a warning.
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass
from typing import Any

import msgspec

from ..cluster import CLUSTERED_ENV
from ..credentials import CREDENTIALS_ENV
from ..launch import SERVICE_MODULES_ENV
from ..protocol.env import CORE_ID_ENV, MARKER_ENV, PROC_ENV, STAGING_ENV
from ..signing import SIGNING_KEY_ENV
from .model import FabricConfig

__all__ = ["Key", "KEYS", "SECTIONS", "DEPRECATED_ENV", "NOT_CONFIG_ENV", "env_name", "closest_env_name",
           "section_prefixes"]


@dataclass(frozen=True)
class Key:
    """One leaf of the configuration."""

    path: str  # "mem.capacity"
    type: Any  # its annotation, bounds included (Annotated[...])
    default: Any

    @property
    def env(self) -> str:
        return env_name(self.path)

    @property
    def is_list(self) -> bool:
        return typing.get_origin(_bare(self.type)) is list

    @property
    def is_table(self) -> bool:
        return typing.get_origin(_bare(self.type)) is dict


def env_name(path: str) -> str:
    """The environment variable of key *path*: ``FABRIC_`` + the path upper-cased, ``.`` -> ``_``."""
    return "FABRIC_" + path.upper().replace(".", "_")


def _bare(tp: Any) -> Any:
    """*tp* without ``Annotated`` and without ``| None``."""
    if typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if type(None) in typing.get_args(tp) and len(args) == 1:
        return _bare(args[0])
    return tp


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, msgspec.Struct)


def _walk(cls: type[msgspec.Struct], prefix: str, keys: dict[str, Key], sections: dict[str, type]) -> None:
    hints = typing.get_type_hints(cls, include_extras=True)
    for field in msgspec.structs.fields(cls):
        path = prefix + field.name
        tp = hints[field.name]
        if _is_section(tp):
            sections[path] = tp
            _walk(tp, path + ".", keys, sections)
        else:
            default = field.default if field.default is not msgspec.NODEFAULT else field.default_factory()
            keys[path] = Key(path, tp, default)


KEYS: dict[str, Key] = {}
#: section path -> its Struct ("mem" -> MemConfig)
SECTIONS: dict[str, type] = {}
_walk(FabricConfig, "", KEYS, SECTIONS)

#: old variable -> the key it sets; read for one release, with a deprecation warning
DEPRECATED_ENV: dict[str, str] = {
    "FABRIC_NODE_TTL_S": "telemetry.node_ttl_s",
    "FABRIC_WORKER_SPIN_US": "pool.worker_spin_us",
}

#: FABRIC_* variables that are not configuration (process markers, build switches, test hooks): never errors
NOT_CONFIG_ENV: tuple[str, ...] = (
    PROC_ENV, CORE_ID_ENV, MARKER_ENV, STAGING_ENV, SERVICE_MODULES_ENV,
    # setup.py's build switches (read at build time, never by fabric)
    "FABRIC_DEBUG", "FABRIC_SANITIZE",
    # the client's credentials file and signing key: not service settings
    CREDENTIALS_ENV, SIGNING_KEY_ENV,
    # set by the supervisor of a clustered node for its services (fabric.cluster)
    CLUSTERED_ENV,
)


def section_prefixes() -> list[str]:
    """``FABRIC_MEM_``, ``FABRIC_NATS_``...: a variable under one of these must name a key."""
    return [env_name(section) + "_" for section in SECTIONS]


def closest_env_name(name: str) -> str | None:
    """The valid variable *name* most likely meant (FABRIC_MEM_CAPACTY -> FABRIC_MEM_CAPACITY)."""
    match = difflib.get_close_matches(name, [k.env for k in KEYS.values()], n=1, cutoff=0.6)
    return match[0] if match else None

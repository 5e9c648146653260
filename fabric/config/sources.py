"""Reading the layers of the configuration: a TOML file, the environment, command-line flags.

Each reader turns its source into :class:`Setting` s -- one per key it sets, with a
label saying where it came from (the file's path, ``env FABRIC_X``, ``flag --x``) --
and :class:`ConfigIssue` s for what names no key.  Values are not checked here; that
is :mod:`.load`'s job, which merges the layers and checks every value against the model.

The environment follows the one naming rule of :mod:`.keys`.  Only a variable under
a section's prefix (``FABRIC_MEM_...``) that names no key is an error; other
``FABRIC_*`` variables (process markers, build switches) are not configuration.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .keys import DEPRECATED_ENV, KEYS, NOT_CONFIG_ENV, SECTIONS, closest_env_name, env_name, section_prefixes

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["Setting", "ConfigIssue", "ConfigError", "read_file", "read_env", "flag_settings"]


@dataclass(frozen=True)
class Setting:
    """One key set by one source."""

    path: str
    value: Any
    source: str  # "default", "file PATH", "env FABRIC_X", "flag --x"
    #: the value is text to convert ("123" for an int): true for the environment
    from_text: bool = False


@dataclass(frozen=True)
class ConfigIssue:
    """One thing wrong with the configuration: the key path (None for the whole source), what, and where."""

    path: str | None
    message: str
    source: str

    def __str__(self) -> str:
        return f"{self.path + ': ' if self.path else ''}{self.message} ({self.source})"


class ConfigError(ValueError):
    """The configuration is invalid; ``issues`` lists every problem found, not just the first."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("invalid configuration:\n" + "\n".join(f"  {issue}" for issue in issues))


def _suggest(path: str) -> str:
    match = difflib.get_close_matches(path, [*KEYS, *SECTIONS], n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


def _flatten(table: Mapping[str, Any], prefix: str, label: str, settings: list[Setting],
             issues: list[ConfigIssue]) -> None:
    for name, value in table.items():
        path = prefix + name
        if path in SECTIONS:
            if isinstance(value, dict):
                _flatten(value, path + ".", label, settings, issues)
            else:
                issues.append(ConfigIssue(path, f"expected a table, got {type(value).__name__}", label))
        elif path in KEYS:
            settings.append(Setting(path, value, label))
        else:
            issues.append(ConfigIssue(path, "unknown key" + _suggest(path), label))


def read_file(path: Path) -> tuple[list[Setting], list[ConfigIssue]]:
    """The settings of a TOML file, and what in it names no key (or why it cannot be read)."""
    label = f"file {path}"
    settings: list[Setting] = []
    issues: list[ConfigIssue] = []
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        issues.append(ConfigIssue(None, f"cannot read the file: {exc.strerror or exc}", label))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        issues.append(ConfigIssue(None, f"not valid TOML: {exc}", label))
    else:
        _flatten(data, "", label, settings, issues)
    return settings, issues


def _env_value(path: str, raw: str) -> Any:
    """The text of a variable as the shape its key takes: a list for lists, a table for tables."""
    key = KEYS[path]
    if key.is_list:
        return [part.strip() for part in raw.split(",") if part.strip()]
    if key.is_table:
        # owner=bytes,owner=bytes (the environment's form of a table; the file uses a TOML table)
        table: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in raw.split(","))):
            owner, sep, value = part.partition("=")
            if not sep or not owner.strip():
                raise ValueError(f"expected owner=bytes, got {part!r}")
            table[owner.strip()] = value.strip()
        return table
    return raw


def read_env(environ: Mapping[str, str]) -> tuple[list[Setting], list[ConfigIssue], list[str]]:
    """The settings of the environment, the variables that look like keys but name none, and deprecation warnings.

    An empty variable counts as unset (as it always did).
    """
    settings: list[Setting] = []
    issues: list[ConfigIssue] = []
    warnings: list[str] = []
    by_env = {key.env: key.path for key in KEYS.values()}
    prefixes = section_prefixes()
    for name in sorted(environ):
        raw = environ[name]
        if name in by_env:
            path = by_env[name]
        elif name in DEPRECATED_ENV:
            path = DEPRECATED_ENV[name]
            new = env_name(path)
            if environ.get(new):
                warnings.append(f"{name} is deprecated and ignored: {new} is set too")
                continue
            warnings.append(f"{name} is deprecated: use {new} (the old name goes in the next release)")
        else:
            if name.startswith(tuple(prefixes)) and name not in NOT_CONFIG_ENV:
                hint = closest_env_name(name)
                issues.append(ConfigIssue(None, f"{name}: names no configuration key"
                                          + (f"; did you mean {hint}?" if hint else ""), f"env {name}"))
            continue
        if not raw.strip():
            continue
        try:
            value = _env_value(path, raw)
        except ValueError as exc:
            issues.append(ConfigIssue(path, str(exc), f"env {name}"))
            continue
        settings.append(Setting(path, value, f"env {name}", from_text=True))
    return settings, issues, warnings


def flag_settings(flags: Mapping[str, tuple[str, Any]]) -> list[Setting]:
    """Settings from command-line flags: key path -> (flag, value); a flag not given is left out (None)."""
    return [Setting(path, value, f"flag {flag}") for path, (flag, value) in flags.items() if value is not None]

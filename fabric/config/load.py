"""The effective configuration: defaults < TOML file < environment < flags, every value checked.

:func:`load_config` is what the kit (``run_service``), ``fabric up`` and ``fabric
config`` call.  It reads the layers (:mod:`.sources`), checks every value on its own
against its key's type and bounds -- so *every* error is reported, each with its key
path and source, not just the first -- lets the later layer win, then builds the
:class:`~.model.FabricConfig`, whose cross-field rules are checked last.

The file is ``--config FILE`` when given (then it must exist), else
``<state-dir>/fabric.toml`` when that exists; the state directory it is looked for
in comes from the flag, else ``FABRIC_STATE_DIR``, else the per-user default.
"""

from __future__ import annotations

import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from .keys import KEYS, Key, env_name
from .model import HINTS, FabricConfig
from .sources import ConfigError, ConfigIssue, Setting, flag_settings, read_env, read_file

__all__ = ["Loaded", "load_config", "validate_file", "check_section", "CONFIG_FILE_NAME"]

#: the file looked for in the state directory when no --config is given
CONFIG_FILE_NAME = "fabric.toml"


@dataclass
class Loaded:
    """The effective configuration, where each key's value came from, and warnings to log."""

    config: FabricConfig
    #: key path -> "default", "file PATH", "env FABRIC_X" or "flag --x"
    sources: dict[str, str]
    #: the configuration file read, if any
    file: Path | None = None
    warnings: list[str] = field(default_factory=list)


def _error_path(exc: msgspec.ValidationError) -> str:
    """The key path msgspec names at the end of its message (``- at `$.telemetry```): "telemetry", or ""."""
    at = re.search(r" - at `\$\.?([^`]*)`$", str(exc))
    return at.group(1) if at else ""


def _message(exc: msgspec.ValidationError) -> str:
    """msgspec's message as ours: ``Expected `int`, got `str``` -> ``expected int, got str``."""
    text = re.sub(r" - at `\$[^`]*`$", "", str(exc)).replace("`", "").replace(" | null", "")
    return text[:1].lower() + text[1:]


def _value_message(exc: msgspec.ValidationError, value: Any, path: str = "", text_value: bool = False) -> str:
    """:func:`_message`, with the value when msgspec did not name it (bounds: "expected int >= 0, got -1").

    A *text_value* (the environment's) is shown as written, without quotes.
    """
    text = _message(exc)
    shown = value if text_value and isinstance(value, str) else repr(value)
    text = text if "got" in text or "value" in text else f"{text}, got {shown}"
    return f"{text} ({HINTS[path]})" if path in HINTS else text


def _check(setting: Setting, issues: list[ConfigIssue]) -> tuple[bool, Any]:
    """(ok, the value converted to its key's type); an issue for each thing wrong with it."""
    key: Key = KEYS[setting.path]
    strict = not setting.from_text
    if key.is_table:
        if not isinstance(setting.value, dict):
            issues.append(ConfigIssue(setting.path, f"expected a table, got {type(setting.value).__name__}",
                                      setting.source))
            return False, None
        out: dict[str, Any] = {}
        ok = True
        for name, item in setting.value.items():
            try:
                out[name] = msgspec.convert(item, _annotation_of_dict_value(key.type), strict=strict)
            except msgspec.ValidationError as exc:
                issues.append(ConfigIssue(f"{setting.path}.{name}", _value_message(exc, item, text_value=not strict),
                                          setting.source))
                ok = False
        return ok, out
    try:
        return True, msgspec.convert(setting.value, key.type, strict=strict)
    except msgspec.ValidationError as exc:
        issues.append(ConfigIssue(setting.path, _value_message(exc, setting.value, setting.path, not strict),
                                      setting.source))
        return False, None


def _annotation_of_dict_value(tp: Any) -> Any:
    if typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return typing.get_args(tp)[1]


def _nest(values: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in values.items():
        *sections, name = path.split(".")
        table = out
        for section in sections:
            table = table.setdefault(section, {})
        table[name] = value
    return out


def _build(layers: list[list[Setting]], issues: list[ConfigIssue]) -> tuple[FabricConfig | None, dict[str, str]]:
    values: dict[str, Any] = {}
    sources = {path: "default" for path in KEYS}
    for layer in layers:
        for setting in layer:
            ok, value = _check(setting, issues)
            if ok:  # a bad value is reported and leaves the layer below in place
                values[setting.path] = value
                sources[setting.path] = setting.source
    try:
        return msgspec.convert(_nest(values), FabricConfig), sources
    except msgspec.ValidationError as exc:  # a cross-field rule (each value passed on its own)
        section = _error_path(exc)
        if not any(issue.path and issue.path.startswith(section) for issue in issues):
            involved = sorted({sources[p] for p in KEYS if p.startswith(section) and sources[p] != "default"})
            issues.append(ConfigIssue(section or None, _message(exc), ", ".join(involved) or "default"))
        return None, sources


def _state_dir(flags: Mapping[str, tuple[str, Any]], environ: Mapping[str, str]) -> Path:
    flag = flags.get("state_dir", ("", None))[1]
    if flag:
        return Path(flag)
    if environ.get(env_name("state_dir")):
        return Path(environ[env_name("state_dir")])
    from ..state import default_state_dir

    return default_state_dir()


def load_config(*, config_file: Path | None = None, flags: Mapping[str, tuple[str, Any]] | None = None,
                environ: Mapping[str, str] | None = None) -> Loaded:
    """The effective configuration (see the module docstring); ConfigError listing every problem.

    *flags* maps key paths to ``(flag, value)``, e.g. ``{"node": ("--node", "n1")}``;
    a value of None is a flag not given.  *environ* defaults to ``os.environ``.
    """
    flags = flags or {}
    environ = os.environ if environ is None else environ
    issues: list[ConfigIssue] = []
    file = config_file
    if file is None:
        candidate = _state_dir(flags, environ) / CONFIG_FILE_NAME
        file = candidate if candidate.is_file() else None
    file_settings: list[Setting] = []
    if file is not None:
        file_settings, file_issues = read_file(file)
        issues += file_issues
    env_settings, env_issues, warnings = read_env(environ)
    issues += env_issues
    config, sources = _build([file_settings, env_settings, flag_settings(flags)], issues)
    if issues or config is None:
        raise ConfigError(issues)
    return Loaded(config, sources, file, warnings)


def validate_file(path: Path) -> list[ConfigIssue]:
    """Every problem of the TOML file *path* on its own (over the defaults; no environment, no flags)."""
    settings, issues = read_file(path)
    _build([settings], issues)
    return issues


def check_section(section: msgspec.Struct) -> None:
    """Check *section*'s bounds (its constructor checks only the cross-field rules); ValueError naming the key.

    For sections made in code (a service's keyword overrides), which no conversion checked.
    """
    from .keys import SECTIONS

    name = next((p for p, cls in SECTIONS.items() if cls is type(section)), type(section).__name__)
    try:
        msgspec.convert(msgspec.to_builtins(section), type(section))
    except msgspec.ValidationError as exc:
        raise ValueError(f"{name}.{_error_path(exc)}: {_message(exc)}") from None

"""``fabric config show`` and ``fabric config validate``: the effective configuration, and checking a file.

``show`` prints every key of the configuration (:mod:`fabric.config`) with its
effective value and where it came from -- ``default``, ``file PATH``, ``env VAR``
or ``flag --x`` -- as a table or, with ``--json``, one document.  It reads what a
service would: ``--config FILE`` or ``<state-dir>/fabric.toml``, then the
environment.  ``validate FILE`` checks one file on its own and reports every problem
(key path and what is wrong), exit 1, or says the file is valid, exit 0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from .cli_common import ConfigFileOption, console, err, escape, load_config_or_fail, out

__all__ = ["config_app"]

config_app = typer.Typer(
    name="config",
    help="Show the effective configuration, or check a configuration file (docs/config.md).",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _text(path: str, value: Any) -> str:
    if value is None:
        from .config.model import UNSET_MEANS

        return f"- ({UNSET_MEANS[path]})" if path in UNSET_MEANS else "-"
    return json.dumps(value) if not isinstance(value, str) else value


@config_app.command()
def show(
    config_file: ConfigFileOption = None,
    state_dir: Annotated[Path | None, typer.Option(
        "--state-dir", show_default=False,
        help="State directory whose fabric.toml is read (without --config). Default: state_dir, "
             "else the per-user state dir.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Print the effective configuration and where each value came from (default, file, env VAR, flag)."""
    import msgspec

    from .config import KEYS

    loaded = load_config_or_fail(config_file, {
        "state_dir": ("--state-dir", str(state_dir) if state_dir is not None else None)})
    flat = _flatten(msgspec.to_builtins(loaded.config))
    for warning in loaded.warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}")
    if as_json:
        doc = {
            "file": str(loaded.file) if loaded.file else None,
            "config": msgspec.to_builtins(loaded.config),
            "sources": loaded.sources,
            "env": {path: key.env for path, key in KEYS.items()},
        }
        out.print_json(json.dumps(doc))
        return
    out.print(f"configuration file: {escape(str(loaded.file)) if loaded.file else '(none)'}")
    table = Table(box=None, header_style="bold")
    for column in ("key", "value", "source", "env"):
        table.add_column(column)
    for path, key in KEYS.items():
        table.add_row(path, escape(_text(path, flat.get(path))), escape(loaded.sources[path]), key.env)
    console().print(table)


def _flatten(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    from .config.keys import SECTIONS

    flat: dict[str, Any] = {}
    for name, value in doc.items():
        if prefix + name in SECTIONS:
            flat.update(_flatten(value, prefix + name + "."))
        else:
            flat[prefix + name] = value
    return flat


@config_app.command()
def validate(
    file: Annotated[Path, typer.Argument(show_default=False, dir_okay=False, help="The TOML file to check.")],
) -> None:
    """Check a configuration file: every problem with its key path (exit 1), or that it is valid (exit 0)."""
    from .config import validate_file

    issues = validate_file(file)
    if not issues:
        out.print(f"{escape(str(file))}: valid")
        return
    err.print(f"[bold red]error:[/] {escape(str(file))}: {len(issues)} problem{'s' if len(issues) != 1 else ''}")
    for issue in issues:
        err.print(f"  {escape(f'{issue.path}: {issue.message}' if issue.path else issue.message)}")
    raise typer.Exit(1)

"""What every ``fabric`` command shares: the options, the consoles, failing cleanly, finding the fabric.

The command modules (:mod:`fabric.cli_up`, :mod:`fabric.cli_down`,
:mod:`fabric.cli_status`, :mod:`fabric.cli_nodes`, :mod:`fabric.cli_req`) build on
this one; :mod:`fabric.cli` puts them together into the ``fabric`` command.

Expected failures (port in use, a fabric already running, no responders) print
one clear line on stderr and exit 1 (:func:`fail`); tracebacks are for bugs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console

from .state import FabricState, StateDir, default_state_dir

if TYPE_CHECKING:
    from .config import Loaded

__all__ = ["out", "err", "console", "StateDirOption", "NatsUrlOption", "ServicesOption", "ConfigFileOption", "fail",
           "escape", "state_of", "state_flag", "parse_services", "find_nats_url", "connect", "load_config_or_fail",
           "CliNats", "credentials_for"]

# soft wrap: a long path or URL stays on one line (and copy-pastable) when piped
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

StateDirOption = Annotated[
    Path | None,
    typer.Option("--state-dir", envvar="FABRIC_STATE_DIR", show_default=False,
                 help="State directory of this fabric (pids, logs, NATS store). Default: the per-user state dir."),
]
NatsUrlOption = Annotated[
    str | None,
    typer.Option("--nats-url", envvar="FABRIC_NATS_URL", show_default=False,
                 help="NATS to use. Default: the one of the fabric running in --state-dir."),
]
ServicesOption = Annotated[
    str | None,
    typer.Option("--services", show_default=False, help="Comma-separated service names. Default: all known."),
]

ConfigFileOption = Annotated[
    Path | None,
    typer.Option("--config", show_default=False, dir_okay=False,
                 help="Configuration file (TOML, docs/config.md). Default: <state-dir>/fabric.toml when it exists."),
]


def console() -> Console:
    """The console for tables: piped output has no terminal width to fit, so every column shows in full."""
    return out if out.is_terminal else Console(highlight=False, width=250)


def fail(message: str, hint: str | None = None) -> NoReturn:
    """Print an expected failure (no traceback) and exit 1."""
    err.print(f"[bold red]error:[/] {escape(message)}")
    if hint:
        err.print(f"  {escape(hint)}")
    raise typer.Exit(1)


def escape(text: str) -> str:
    """*text* with rich markup escaped (paths and service output may hold brackets)."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def state_of(state_dir: Path | None) -> StateDir:
    """The state directory a command's ``--state-dir`` names (the per-user default without one)."""
    return StateDir(state_dir if state_dir is not None else default_state_dir())


def state_flag(state: StateDir) -> str:
    """The ``--state-dir`` a follow-up command needs (empty for the default)."""
    return "" if state.path == StateDir(default_state_dir()).path else f" --state-dir {state.path}"


def parse_services(raw: str | None) -> dict[str, str]:
    """``--services`` as name -> module (every known service without one); fails on an unknown name."""
    from .supervisor import service_modules

    try:
        known = service_modules()
    except ValueError as exc:
        fail(str(exc))
    if raw is None:
        return known
    names = [n.strip() for n in raw.split(",") if n.strip()]
    if not names:
        fail("--services is empty", f"known services: {', '.join(known)}")
    unknown = [n for n in names if n not in known]
    if unknown:
        fail(f"unknown service(s): {', '.join(unknown)}", f"known services: {', '.join(known)}")
    return {n: known[n] for n in dict.fromkeys(names)}


# the state dir of the command now running (one per process), as find_nats_url() resolved it
_command_state: StateDir | None = None


def find_nats_url(nats_url: str | None, state: StateDir) -> tuple[str, FabricState | None]:
    """The NATS to talk to (``--nats-url``, else the running fabric's) and the running fabric, if any.

    *state* is also where :func:`connect` then finds the admin credentials.
    """
    global _command_state
    _command_state = state
    running = state.running()
    if nats_url:
        return nats_url, running
    if running is None:
        stale = state.read()
        if stale is not None and stale.phase in ("starting", "ready", "stopping"):
            fail(f"the supervisor of the fabric in {state.path} is gone (pid {stale.supervisor_pid})",
                 f"`fabric down{state_flag(state)}` stops what it left running; then `fabric up` again")
        fail(f"no fabric is running in {state.path}",
             "start one with `fabric up`, pass --state-dir, or give the NATS to use with --nats-url")
    return running.nats_url, running


def load_config_or_fail(config_file: Path | None, flags: dict[str, tuple[str, Any]]) -> Loaded:
    """The effective configuration (:func:`fabric.config.load_config`); every problem on stderr and exit 1."""
    from .config import ConfigError, load_config

    try:
        return load_config(config_file=config_file.absolute() if config_file else None, flags=flags)
    except ConfigError as exc:
        err.print(f"[bold red]error:[/] invalid configuration ({len(exc.issues)} "
                  f"problem{'s' if len(exc.issues) != 1 else ''}):")
        for issue in exc.issues:
            err.print(f"  {escape(str(issue))}")
        raise typer.Exit(1) from None


class CliNats:
    """A command's NATS connection: requests go out in the user form of its credentials (an admin's: plain)."""

    def __init__(self, nc: Any, user: str | None) -> None:
        self.nc = nc
        self.user = user

    def subject(self, subject: str) -> str:
        from .protocol.permissions import subject_for

        return subject_for(self.user, subject)

    async def request(self, subject: str, payload: bytes = b"", timeout: float = 2.0,
                      headers: dict[str, str] | None = None) -> Any:
        return await self.nc.request(self.subject(subject), payload, timeout=timeout, headers=headers)

    def __getattr__(self, name: str) -> Any:  # subscribe, close, flush...: the connection's own
        return getattr(self.nc, name)


def credentials_for(state: StateDir | None) -> Any:
    """The credentials a command connects with: ``$FABRIC_CREDENTIALS``, else the admin's of *state*; or None."""
    from .credentials import CREDENTIALS_ENV, CredentialsError, find_credentials

    try:
        return find_credentials(state=state or _command_state)
    except CredentialsError as exc:
        fail(str(exc), f"check ${CREDENTIALS_ENV}")


async def connect_system(state: StateDir, running: FabricState) -> Any:
    """A connection to *running*'s own nats-server in the system account (its servers' reports: routes, the
    JetStream meta group); it raises what ``nats.connect`` raises (the callers say what it means for them)."""
    import nats

    from .auth import AuthRealm
    from .credentials import read_credentials

    async def quiet(*_: Any) -> None:  # a closed connection is the caller's to report; nats-py would print it
        return None

    creds = read_credentials(AuthRealm(state, running.node).system_credentials)
    return await nats.connect(running.nats_url, connect_timeout=5, allow_reconnect=False, max_reconnect_attempts=0,
                              error_cb=quiet, name="fabric-cli-system", **creds.connect_options())


async def connect(url: str, state: StateDir | None = None) -> CliNats:
    """A NATS connection for one command: no reconnects, no error chatter; fails cleanly if NATS is not there.

    It authenticates with :func:`credentials_for` (*state*: the fabric's state dir, the default one without).
    """
    import nats

    from .credentials import REFUSED_CREDENTIALS, UNTRUSTED_CERTIFICATE, refusal
    from .protocol.permissions import ADMIN

    async def quiet(*_: Any) -> None:
        return None

    creds = credentials_for(state)
    auth = creds.connect_options() if creds is not None else {}
    try:
        nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False, max_reconnect_attempts=0,
                                error_cb=quiet, disconnected_cb=quiet, closed_cb=quiet, name="fabric-cli", **auth)
    except Exception as exc:
        text = str(exc) or type(exc).__name__
        why = refusal(text)
        if why == UNTRUSTED_CERTIFICATE:
            fail(f"NATS at {url} runs TLS with a certificate this command does not trust",
                 "use credentials issued by that fabric ($FABRIC_CREDENTIALS): they carry its CA")
        if why == REFUSED_CREDENTIALS:
            if creds is None:
                fail(f"NATS at {url} requires credentials",
                     "set $FABRIC_CREDENTIALS to a credentials file (`fabric user add NAME` issues them), or pass "
                     "the --state-dir of the fabric whose admin you are")
            fail(f"NATS at {url} refused the credentials of user {creds.user!r} ({creds.path})",
                 "the user was removed, or the file belongs to another fabric")
        fail(f"cannot connect to NATS at {url}: {text}",
             "is the fabric up? (`fabric status --state-dir ...`, or check --nats-url)")
    return CliNats(nc, creds.user if creds is not None and creds.role != ADMIN else None)

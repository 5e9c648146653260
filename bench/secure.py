"""What auth and TLS cost: fabric's round trips beside a bare nats-py echo under the same security.

    python bench/secure.py [--quick]

Runs, one after the other on free loopback ports, three fabrics (``fabric up`` with the
allocator and the spawner): without auth (``--no-auth``), with auth (the default), and
with auth and TLS (``--tls``).  In each, a bare nats-py responder in its own process
connects with the same credentials (and the same CA) as the fabric's client, so the
peer pays what the fabric pays.  The fabric's client is a user of role ``client``
(``fabric user add``): its requests take the user form, as a real user's do.

Ratios (above 1: fabric is better; measured in alternating windows, p50):

* ``overhead_vs_nats_echo_<mode>``: a remote 1 KiB read vs the echo answering 1 KiB
  (target >= 0.8, as bench/mem.py's plain one);
* ``warm_job_vs_nats_echo_<mode>``: an empty job on a warm pool (tests/cores/echo.c) vs
  an empty echo (target >= 0.67, as bench/spawn.py's);
* ``tls_rtt_vs_plain``: the bare echo's p50 without auth over its p50 with auth and TLS
  (how much slower an authenticated TLS round trip is: below 1 means slower).

The last line is one JSON object ``{"bench": "secure", "ratios": {...}, "results": {...},
"machine": {...}}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._common import NATS_RESPONDER, machine, parse_args, progress
from bench._common import atimed as timed

MODES = {"plain": ["--no-auth"], "auth": [], "tls": ["--tls"]}
KIB = 1024


def fabric(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FABRIC_CREDENTIALS", "FABRIC_NATS_URL")}
    env["PYTHONPATH"] = str(REPO)
    env["FABRIC_MEM_CAPACITY"] = str(64 << 20)
    return subprocess.run([sys.executable, "-m", "fabric.cli", *args, "--state-dir", str(state)], env=env,
                          capture_output=True, text=True, timeout=120)


def p50_us(xs: list[float]) -> float:
    return statistics.median(xs) * 1e6


async def measure(url: str, creds: str | None, node: str, state: Path, quick: bool) -> dict[str, float]:
    import nats

    from fabric import AsyncFabricClient
    from fabric.credentials import read_credentials
    from tests._cores import TEST_CORES, build_core

    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("FABRIC_CREDENTIALS", None)
    if creds:
        # the peer authenticates as the fabric's admin: nkey auth and TLS like the client, and any subject
        env["FABRIC_CREDENTIALS"] = str(state / "auth" / "admin.creds")
    echo = subprocess.Popen([sys.executable, "-c", NATS_RESPONDER, url], stdout=subprocess.PIPE, env=env)
    assert echo.stdout is not None
    echo.stdout.readline()
    options = read_credentials(env["FABRIC_CREDENTIALS"]).connect_options() if creds else {}
    windows, per = (6, 100) if quick else (20, 200)
    try:
        nc = await nats.connect(url, **options)
        so = build_core(TEST_CORES / "echo.c", state / "cores")
        async with AsyncFabricClient(url, local=False, credentials=creds) as fc:
            buf = await fc.rmalloc(KIB)
            await fc.rwrite(buf, b"y" * KIB)
            core = await fc.load_core("echo", so, node=node, min_workers=1, max_workers=1)
            req = b"r" * 160

            async def read() -> None:
                await fc.rread(buf, KIB)

            async def echo_1k() -> None:
                await nc.request(f"bench.bus.{KIB}", req, timeout=5)

            async def job() -> None:
                await core.run(b"")

            async def echo_0() -> None:
                await nc.request("bench.bus.0", b"", timeout=5)

            for fn in (read, echo_1k, job, echo_0):
                await timed(fn, 100)
            samples: dict[str, list[float]] = {"read": [], "echo_1k": [], "job": [], "echo_0": []}
            for _ in range(windows):
                samples["read"] += await timed(read, per)
                samples["echo_1k"] += await timed(echo_1k, per)
                samples["job"] += await timed(job, per)
                samples["echo_0"] += await timed(echo_0, per)
            await core.unload()
            await fc.rfree(buf)
        await nc.close()
    finally:
        echo.terminate()
        echo.wait()
    return {k: p50_us(v) for k, v in samples.items()}


def main() -> None:
    args = parse_args(__doc__, "fewer samples")
    log = progress("secure")
    results: dict[str, Any] = {}
    ratios: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="fabric-bench-secure-") as tmp:
        for mode, flags in MODES.items():
            state = Path(tmp) / mode
            up = fabric(state, "up", "-d", "--nats-port", "0", "--services", "allocator,spawner", *flags)
            if up.returncode != 0:
                sys.exit(f"fabric up {' '.join(flags)} failed:\n{up.stdout}\n{up.stderr}")
            try:
                st = json.loads((state / "state.json").read_text())
                creds = None
                if st.get("credentials"):
                    added = fabric(state, "user", "add", "bench", "-o", str(state / "bench.creds"))
                    if added.returncode != 0:
                        sys.exit(f"fabric user add failed:\n{added.stdout}\n{added.stderr}")
                    creds = str(state / "bench.creds")
                log(f"{mode}: fabric up {' '.join(flags) or '(auth on)'}; measuring")
                r = asyncio.run(measure(st["nats_url"], creds, st["node"], state, args.quick))
            finally:
                fabric(state, "down", "--purge")
            for k, v in r.items():
                results[f"{k}_p50_us_{mode}"] = round(v, 1)
            ratios[f"overhead_vs_nats_echo_{mode}"] = round(r["echo_1k"] / r["read"], 3)
            ratios[f"warm_job_vs_nats_echo_{mode}"] = round(r["echo_0"] / r["job"], 3)
            log(f"{mode}: read {r['read']:.0f} µs vs echo {r['echo_1k']:.0f} µs; "
                f"job {r['job']:.0f} µs vs echo {r['echo_0']:.0f} µs")
    ratios["tls_rtt_vs_plain"] = round(results["echo_0_p50_us_plain"] / results["echo_0_p50_us_tls"], 3)
    print(json.dumps({"bench": "secure", "ratios": ratios, "results": results,
                      "targets": {"overhead_vs_nats_echo": 0.8, "warm_job_vs_nats_echo": 0.67},
                      "machine": machine()}))


if __name__ == "__main__":
    main()

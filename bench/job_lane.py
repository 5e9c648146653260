"""The spawner's job lane, design against design (issue 13): which NATS path a warm job takes.

    python bench/job_lane.py [--quick]

One nats-server, three spawners as their own processes (``python -m fabric.services.spawner``,
uvloop), each with another ``FABRIC_JOB_LANE`` (a temporary switch): ``own`` (the lane's own
connection + the reply link), ``kit`` (the lane on the service kit's connection + the reply
link), ``nolink`` (the kit's connection, every reply through the loop); the bare nats-py echo
responder of ``bench/_common.py`` as the peer.  Each design gets a 1-worker echo pool
(empty ``run`` p50, windows alternating across the designs and the echo) and a 2-worker one
(``map`` of 10,000 16-byte jobs, rounds alternating).  Ratios are against ``own``: above 1 =
that design is faster.
"""

from __future__ import annotations

import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._common import NATS_RESPONDER, machine, parse_args, progress, stop_process
from bench.spawn import p50_us, timed
from tests._spawner import wait_ready

log = progress("job_lane")
DESIGNS = ("own", "kit", "nolink")


def start_spawner(url: str, node: str, state_dir: Path, design: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, FABRIC_JOB_LANE=design)
    return subprocess.Popen([sys.executable, "-m", "fabric.services.spawner", "--nats-url", url, "--node", node,
                             "--state-dir", str(state_dir)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=open(state_dir / "spawner.log", "wb"), env=env)


async def run(url: str, nodes: dict[str, str], state: Path, quick: bool) -> dict[str, Any]:
    import nats

    from fabric import AsyncFabricClient
    from tests._cores import TEST_CORES, build_core

    so = build_core(TEST_CORES / "echo.c", state / "cores")
    results: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    async with AsyncFabricClient(url, local=False) as fc:
        for node in nodes.values():
            await wait_ready(fc, node, timeout_s=30.0)
        nc = await nats.connect(url)
        try:
            # empty run
            cores = {d: await fc.load_core("echo", so, node=n, min_workers=1, max_workers=1) for d, n in nodes.items()}
            windows, per_window = (6, 50) if quick else (20, 100)

            async def echo() -> None:
                await nc.request("bench.bus.0", b"q" * 16, timeout=10)

            samples: dict[str, list[float]] = {d: [] for d in (*DESIGNS, "echo")}
            for _ in range(50):
                for c in cores.values():
                    await c.run(b"")
                await echo()
            for w in range(windows):
                order = list(DESIGNS[w % 3:] + DESIGNS[:w % 3])  # rotate who goes first
                for d in order:
                    c = cores[d]
                    samples[d] += await timed(lambda c=c: c.run(b""), per_window)  # type: ignore[misc]
                samples["echo"] += await timed(echo, per_window)
            for c in cores.values():
                await c.unload()
            p50 = {d: p50_us(s) for d, s in samples.items()}
            log("empty run p50: " + ", ".join(f"{d} {v:.0f} µs" for d, v in p50.items()))
            for d in DESIGNS:
                results[f"{d}_empty_run_p50_us"] = round(p50[d], 1)
                ratios[f"{d}_run_vs_own"] = round(p50["own"] / p50[d], 3)
                ratios[f"{d}_run_vs_echo"] = round(p50["echo"] / p50[d], 3)
            results["echo_p50_us"] = round(p50["echo"], 1)

            # map
            cores = {d: await fc.load_core("echo", so, node=n, min_workers=2, max_workers=2) for d, n in nodes.items()}
            n, rounds = 10_000, (3 if quick else 7)
            items = [os.urandom(16) for _ in range(n)]
            rates: dict[str, list[float]] = {d: [] for d in DESIGNS}
            for c in cores.values():
                assert await c.map(items[:1000]) == items[:1000]
            for r in range(rounds):
                for d in DESIGNS[r % 3:] + DESIGNS[:r % 3]:
                    t0 = time.perf_counter()
                    out = await cores[d].map(items)
                    rates[d].append(n / (time.perf_counter() - t0))
                    if out != items:
                        raise RuntimeError("map returned wrong outputs")
            for c in cores.values():
                await c.unload()
            med = {d: statistics.median(v) for d, v in rates.items()}
            log("map jobs/s: " + ", ".join(f"{d} {v:,.0f}" for d, v in med.items()))
            for d in DESIGNS:
                results[f"{d}_map_jobs_per_s"] = round(med[d])
                ratios[f"{d}_map_vs_own"] = round(med[d] / med["own"], 3)
        finally:
            await nc.close()
    return {"results": results, "ratios": ratios}


def main() -> None:
    args = parse_args(__doc__, "fewer samples")
    import uvloop

    from tests._nats import start_nats

    with tempfile.TemporaryDirectory(prefix="fabric-lane-bench-") as tmp:
        server = start_nats(Path(tmp) / "nats")
        nodes = {d: f"bench-{d}-{secrets.token_hex(3)}" for d in DESIGNS}
        procs = []
        for d, node in nodes.items():
            state = Path(tmp) / f"state-{d}"
            state.mkdir()
            procs.append(start_spawner(server.url, node, state, d))
        responder = subprocess.Popen([sys.executable, "-c", NATS_RESPONDER, server.url], stdout=subprocess.PIPE)
        procs.append(responder)
        try:
            assert responder.stdout is not None
            responder.stdout.readline()
            out = uvloop.run(run(server.url, nodes, Path(tmp), args.quick))
        finally:
            for proc in procs:
                stop_process(proc)
            server.stop()
    print(json.dumps({"bench": "job_lane", **out, "machine": machine()}))


if __name__ == "__main__":
    main()

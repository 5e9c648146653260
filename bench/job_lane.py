"""The spawner's job lane: what the reply link buys a warm job (issue 13).

    python bench/job_lane.py [--quick]

One nats-server and two spawners as their own processes (uvloop, as ``fabric up`` runs
them), each with a 1-worker and then a 2-worker echo pool: ``link``, the spawner as it
is (the job lane on the service kit's connection, successful ``run`` jobs answered from
the reader thread on the reply link, ``services/spawner/pool_reply.py``), and
``nolink``, the same spawner whose reply link declines to connect (as on a server that
wants TLS), so every reply goes through the event loop.  The peer: the bare nats-py
echo responder of ``bench/_common.py``.  Figures: an empty ``run``'s p50 (windows
alternating across the spawners and the echo, the order rotating) and ``map`` of 10,000
16-byte jobs (rounds alternating).  Ratios: ``run_link_vs_nolink`` = nolink p50 / link
p50 and ``map_link_vs_nolink`` = link rate / nolink rate (above 1: the link helps);
``run_<design>_vs_echo`` = echo p50 / job p50.

How the lane came onto the kit's connection: at commit e55f67c this script ran a third
spawner whose lane had a connection of its own (a temporary ``FABRIC_JOB_LANE`` switch,
since removed); docs/benchmarks.md has those figures.
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
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._common import NATS_RESPONDER, machine, parse_args, progress, stop_process
from bench.spawn import p50_us, timed
from tests._spawner import wait_ready

log = progress("job_lane")
DESIGNS = ("link", "nolink")

#: the spawner with a reply link that never connects: ``python -c NO_LINK_SPAWNER <spawner args>``
NO_LINK_SPAWNER = r"""
from fabric.service import main
from fabric.services.spawner import pool_reply
from fabric.services.spawner.service import SpawnerService
def declined(self, timeout=5.0):  # as on a server that wants TLS: the loop answers every job
    self.usable = False
    return False
pool_reply.ReplyLink.connect = declined
SpawnerService.own_process = True
main(SpawnerService)
"""


def start_spawner(url: str, node: str, state_dir: Path, design: str) -> subprocess.Popen[bytes]:
    how = ["-m", "fabric.services.spawner"] if design == "link" else ["-c", NO_LINK_SPAWNER]
    return subprocess.Popen([sys.executable, *how, "--nats-url", url, "--node", node, "--state-dir", str(state_dir)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(state_dir / "spawner.log", "wb"))


def check_links(monitor_port: int, nodes: dict[str, str]) -> None:
    """Each spawner holds the connections its design says (the server's /connz), or the figures mean nothing."""
    with urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/connz?limit=4096", timeout=10) as r:
        names = {c.get("name", "") for c in json.loads(r.read()).get("connections") or []}
    for d, node in nodes.items():
        want = {f"spawner@{node}", f"spawner-replies@{node}"} if d == "link" else {f"spawner@{node}"}
        got = {n for n in names if n.endswith(f"@{node}")}
        if got != want:
            raise RuntimeError(f"spawner {d}: connections {sorted(got)}, expected {sorted(want)}")


async def run(url: str, nodes: dict[str, str], state: Path, quick: bool, monitor_port: int) -> dict[str, Any]:
    import nats

    from fabric import AsyncFabricClient
    from tests._cores import TEST_CORES, build_core

    so = build_core(TEST_CORES / "echo.c", state / "cores")
    results: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    async with AsyncFabricClient(url, local=False) as fc:
        for node in nodes.values():
            await wait_ready(fc, node, timeout_s=30.0)
        check_links(monitor_port, nodes)
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
                order = DESIGNS[w % 2:] + DESIGNS[:w % 2]  # rotate who goes first
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
                ratios[f"run_{d}_vs_echo"] = round(p50["echo"] / p50[d], 3)
            ratios["run_link_vs_nolink"] = round(p50["nolink"] / p50["link"], 3)
            results["echo_p50_us"] = round(p50["echo"], 1)

            # map
            cores = {d: await fc.load_core("echo", so, node=n, min_workers=2, max_workers=2) for d, n in nodes.items()}
            n, rounds = 10_000, (3 if quick else 7)
            items = [os.urandom(16) for _ in range(n)]
            rates: dict[str, list[float]] = {d: [] for d in DESIGNS}
            for c in cores.values():
                assert await c.map(items[:1000]) == items[:1000]
            for r in range(rounds):
                for d in DESIGNS[r % 2:] + DESIGNS[:r % 2]:
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
            ratios["map_link_vs_nolink"] = round(med["link"] / med["nolink"], 3)
        finally:
            await nc.close()
    return {"results": results, "ratios": ratios}


def main() -> None:
    args = parse_args(__doc__, "fewer samples")
    import uvloop

    from tests._nats import start_nats

    with tempfile.TemporaryDirectory(prefix="fabric-lane-bench-") as tmp:
        server = start_nats(Path(tmp) / "nats", monitor=True, auth=False)
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
            assert server.monitor_port is not None
            out = uvloop.run(run(server.url, nodes, Path(tmp), args.quick, server.monitor_port))
        finally:
            for proc in procs:
                stop_process(proc)
            server.stop()
    print(json.dumps({"bench": "job_lane", **out,
                      "machine": machine(spawner="python -m fabric.services.spawner (uvloop), twice")}))


if __name__ == "__main__":
    main()

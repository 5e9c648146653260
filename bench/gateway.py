"""The HTTP gateway: tasks over HTTP beside NATS, remote memory over HTTP beside Redis, the dashboard's first paint.

    python bench/gateway.py [--quick]

One fabric (``fabric up``, auth on: every HTTP request carries a bearer token, every
NATS request the admin's credentials) and, in the same run, ``redis-server``.

* ``submit_http_vs_nats`` (target >= 0.5): a no-op task (``exec`` of ``true``) from
  submit to result, p50: ``POST /api/submit`` then ``GET /api/tasks/{id}/result?wait=``
  over one keep-alive HTTP connection, against the same two requests over NATS
  (``fabric.task.submit`` then ``fabric.task.wait``) -- alternating windows;
* ``http_read_1k_vs_redis`` (report): ``GET /api/mem/{handle}`` of 1 KiB with a
  keep-alive client against redis-py ``GET`` of 1 KiB, p50.

The HTTP client is the standard library's ``http.client`` on one keep-alive connection
(``TCP_NODELAY``, as redis-py sets it): the lean client a program that cares would use.
httpx on the same route is reported beside it (``http_read_1k_httpx_p50_us``): on this
2-core machine it costs about 0.6 ms more per request in the client alone.
* ``dashboard_first_data_ms`` (target < 1000): headless Chromium (Debian's, through
  Playwright) from navigation to the first live data drawn, while 50 simulated nodes
  publish heartbeats on the real bus (and sit in the registry), median of 5 loads.

Ratios above 1: fabric is faster.  The last line is one JSON object
``{"bench": "gateway", "ratios": {...}, "results": {...}, "machine": {...}}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._common import machine, parse_args, progress  # noqa: E402
from bench.mem import start_redis  # noqa: E402

SIMULATED_NODES = 50
NOOP = {"kind": "exec", "exec": {"argv": ["true"]}}


def fabric(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FABRIC_CREDENTIALS", "FABRIC_NATS_URL")}
    env["PYTHONPATH"] = str(REPO)
    env["FABRIC_MEM_CAPACITY"] = str(64 << 20)
    env["FABRIC_GATEWAY_RATE_PER_S"] = "1000000"  # the bench measures the path, not the limiter
    env["FABRIC_GATEWAY_BURST"] = "1000000"
    return subprocess.run([sys.executable, "-m", "fabric.cli", *args, "--state-dir", str(state)], env=env,
                          capture_output=True, text=True, timeout=120)


def p50_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


class Http:
    """One keep-alive HTTP/1.1 connection (http.client, TCP_NODELAY) with the bearer token."""

    def __init__(self, gw: str, token: str) -> None:
        import http.client
        import socket

        host, port = gw.removeprefix("http://").rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=60)
        self.conn.connect()
        assert self.conn.sock is not None
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.auth = {"Authorization": f"Bearer {token}"}

    def call(self, method: str, path: str, body: bytes | None = None, ctype: str = "") -> tuple[int, bytes]:
        headers = {**self.auth, **({"Content-Type": ctype} if ctype else {})}
        self.conn.request(method, path, body=body, headers=headers)
        r = self.conn.getresponse()
        return r.status, r.read()

    def close(self) -> None:
        self.conn.close()


async def tasks_part(url: str, gw: str, token: str, admin: str, quick: bool, log: Any) -> dict[str, float]:
    import nats

    from fabric.credentials import read_credentials

    windows, per = (4, 10) if quick else (10, 20)
    nc = await nats.connect(url, **read_credentials(admin).connect_options())
    http = Http(gw, token)
    body = json.dumps(NOOP).encode()

    async def over_http() -> None:
        # blocking calls: nothing else runs meanwhile (the NATS side is measured in its own windows)
        status, data = http.call("POST", "/api/submit", body, "application/json")
        assert status == 201, data
        status, data = http.call("GET", f"/api/tasks/{json.loads(data)['id']}/result?wait=30")
        assert status == 200, data

    async def over_nats() -> None:
        r = await nc.request("fabric.task.submit", body, timeout=30)
        task_id = json.loads(r.data)["id"]
        w = await nc.request("fabric.task.wait", json.dumps({"id": task_id, "timeout_s": 30}).encode(), timeout=40)
        assert json.loads(w.data)["state"] == "succeeded", w.data

    samples: dict[str, list[float]] = {"http": [], "nats": []}
    try:
        for fn in (over_http, over_nats):  # warm: workers, connections
            for _ in range(3):
                await fn()
        for w in range(windows):
            for name, fn in (("http", over_http), ("nats", over_nats)):
                for _ in range(per):
                    t0 = time.perf_counter()
                    await fn()
                    samples[name].append(time.perf_counter() - t0)
            log(f"tasks: window {w + 1}/{windows}")
    finally:
        http.close()
        await nc.close()
    return {"task_http_p50_ms": p50_ms(samples["http"]), "task_nats_p50_ms": p50_ms(samples["nats"])}


def read_part(gw: str, token: str, redis_port: int, quick: bool) -> dict[str, float]:
    import httpx
    import redis

    n = 500 if quick else 3000
    lean = Http(gw, token)
    client = httpx.Client(base_url=gw, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    r = redis.Redis(port=redis_port)
    value = os.urandom(1024)
    try:
        handle = client.post("/api/mem", json={"size": 1024}).json()["handle"]
        client.put(f"/api/mem/{handle}", content=value).raise_for_status()
        r.set("k", value)
        samples: dict[str, list[float]] = {"http": [], "httpx": [], "redis": []}
        ways = (("http", lambda: lean.call("GET", f"/api/mem/{handle}")[1]),
                ("httpx", lambda: client.get(f"/api/mem/{handle}").content),
                ("redis", lambda: r.get("k")))
        for _, fn in ways:
            for _ in range(100):
                fn()
        for _ in range(n // 100):
            for name, fn in ways:
                for _ in range(100):
                    t0 = time.perf_counter()
                    got = fn()
                    samples[name].append(time.perf_counter() - t0)
                    assert got == value
        client.delete(f"/api/mem/{handle}")
    finally:
        lean.close()
        client.close()
        r.close()
    return {"http_read_1k_p50_us": statistics.median(samples["http"]) * 1e6,
            "http_read_1k_httpx_p50_us": statistics.median(samples["httpx"]) * 1e6,
            "redis_get_1k_p50_us": statistics.median(samples["redis"]) * 1e6}


async def simulate_nodes(url: str, admin: str, stop: asyncio.Event) -> None:
    """Heartbeats of SIMULATED_NODES nodes, once a second each, on the real bus and in the registry."""
    import msgspec
    import nats

    from fabric.credentials import read_credentials
    from fabric.protocol.streams import REGISTRY_BUCKET
    from fabric.schema import NodeListReply

    nc = await nats.connect(url, **read_credentials(admin).connect_options())
    kv = await nc.jetstream().key_value(REGISTRY_BUCKET)
    real = msgspec.json.decode((await nc.request("fabric.nodes.list", b"{}", timeout=5)).data, type=NodeListReply)
    template = real.nodes[0]
    seq = 0
    try:
        while not stop.is_set():
            seq += 1
            for i in range(SIMULATED_NODES):
                name = f"sim-{i:02d}"
                rec = msgspec.structs.replace(template, node=name, seq=seq, time_ms=int(time.time() * 1000),
                                              host=msgspec.structs.replace(template.host, node=name, hostname=name))
                data = msgspec.json.encode(rec)
                await nc.publish(f"fabric.telemetry.{name}", data)
                await kv.put(name, data)
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
    finally:
        for i in range(SIMULATED_NODES):
            try:
                await kv.delete(f"sim-{i:02d}")
            except Exception:  # noqa: BLE001 - the registry's TTL removes it anyway
                pass
        await nc.close()


async def dashboard_part(url: str, gw: str, operator: str, admin: str, quick: bool) -> dict[str, float]:
    from playwright.async_api import async_playwright

    stop = asyncio.Event()
    sim = asyncio.ensure_future(simulate_nodes(url, admin, stop))
    await asyncio.sleep(2.5)  # the registry holds every simulated node
    firsts: list[float] = []
    walls: list[float] = []
    try:
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            ctx = await browser.new_context(viewport={"width": 1366, "height": 768})
            page = await ctx.new_page()
            await page.goto(f"{gw}/?token={operator}")  # the cookie, once
            await page.wait_for_function("document.body.dataset.firstData !== undefined", timeout=30000)
            cards = await page.locator('[data-testid="node-card"]').count()
            for _ in range(3 if quick else 5):
                t0 = time.perf_counter()
                await page.goto(f"{gw}/")
                await page.wait_for_function("document.body.dataset.firstData !== undefined", timeout=30000)
                walls.append((time.perf_counter() - t0) * 1e3)
                firsts.append(float(await page.evaluate("Number(document.body.dataset.firstData)")))
            await browser.close()
    finally:
        stop.set()
        await sim
    return {"dashboard_first_data_ms": statistics.median(firsts), "dashboard_wall_ms": statistics.median(walls),
            "dashboard_node_cards": float(cards)}


def main() -> None:
    args = parse_args(__doc__, "fewer samples")
    log = progress("gateway")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fabric-bench-gateway-") as tmp:
        state = Path(tmp) / "fabric"
        up = fabric(state, "up", "-d", "--nats-port", "0")
        if up.returncode != 0:
            sys.exit(f"fabric up failed:\n{up.stdout}\n{up.stderr}")
        redis_proc, redis_port = start_redis(Path(tmp))
        try:
            st = json.loads((state / "state.json").read_text())
            gw, url, admin = st["gateway_url"], st["nats_url"], st["credentials"]
            operator = (state / "auth" / "operator.token").read_text().strip()
            made = fabric(state, "token", "create", "bench", "--scope", "read,submit")
            if made.returncode != 0:
                sys.exit(f"fabric token create failed:\n{made.stderr}")
            token = made.stdout.strip()
            time.sleep(0.5)
            log("tasks over HTTP and over NATS")
            results.update(asyncio.run(tasks_part(url, gw, operator, admin, args.quick, log)))
            log("1 KiB reads over HTTP and from Redis")
            results.update(read_part(gw, token, redis_port, args.quick))
            log(f"the dashboard in Chromium with {SIMULATED_NODES} simulated nodes")
            results.update(asyncio.run(dashboard_part(url, gw, operator, admin, args.quick)))
        finally:
            redis_proc.terminate()
            redis_proc.wait()
            fabric(state, "down", "--purge")
    ratios = {
        "submit_http_vs_nats": round(results["task_nats_p50_ms"] / results["task_http_p50_ms"], 3),
        "http_read_1k_vs_redis": round(results["redis_get_1k_p50_us"] / results["http_read_1k_p50_us"], 3),
    }
    results = {k: round(v, 2) for k, v in results.items()}
    print(json.dumps({"bench": "gateway", "ratios": ratios, "results": results,
                      "targets": {"submit_http_vs_nats": ">= 0.5", "dashboard_first_data_ms": "< 1000"},
                      "machine": machine(quick=args.quick, simulated_nodes=SIMULATED_NODES)}))


if __name__ == "__main__":
    main()

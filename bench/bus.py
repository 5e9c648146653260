"""The transport floor under fabric: what the bus itself costs, with no fabric code in the path.

    python bench/bus.py [--quick]

Runs, in one go on free loopback ports: a nats-server (same binary and 8 MiB max
payload as ``fabric up``) with a bare nats-py responder in its own process (uvloop),
a bare nats-py requester (uvloop), the same requests from Node.js
(``@nats-io/transport-node`` from tests/node, when installed), and a raw TCP
round trip between two processes.  Sizes are those of ``bench/mem.py``: a 1 KiB
reply (a remote read), a 100 KiB reply to a 6 KB request (a 100-item batch), and
1 MiB each way.

It has no fabric side and so no ratios: it says how much of ``bench/mem.py``'s
figures the bus sets.  The last line is one JSON object
``{"bench": "bus", "results": {...}, "machine": {...}}`` (times are p50, µs).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._common import NATS_RESPONDER, machine, parse_args, progress

NODE_CLIENT = r"""
const { connect } = await import("@nats-io/transport-node");
const nc = await connect({ servers: process.argv[1] });
const n = Number(process.argv[2]);
const out = {};
for (const [label, req, rep] of JSON.parse(process.argv[3])) {
  const body = new Uint8Array(req);
  const ts = [];
  for (let i = 0; i < n + 20; i++) {
    const t0 = performance.now();
    await nc.request(`bench.bus.${rep}`, body, { timeout: 10000 });
    if (i >= 20) ts.push((performance.now() - t0) * 1000);
  }
  ts.sort((a, b) => a - b);
  out[label] = ts[Math.floor(ts.length / 2)];
}
console.log(JSON.stringify(out));
await nc.close();
"""

# (label, request bytes, reply bytes)
CASES = [
    ("req_1k_reply", 160, 1024),
    ("req_100k_reply", 6000, 100 * 1024),
    ("req_1m_reply", 160, 1 << 20),
    ("req_1m_send", 1 << 20, 2),
]

TCP_PEER = r"""
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
n = int(sys.argv[2])
buf = bytearray(n); mv = memoryview(buf)
while True:
    got = 0
    while got < n:
        k = s.recv_into(mv[got:])
        if not k:
            sys.exit(0)
        got += k
    s.sendall(b"k")
"""


log = progress("bus")


def start_nats(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    from tests._nats import start_nats as _start

    server = _start(workdir, auth=False)  # the bare bus: no users (bench/secure.py measures auth and TLS)
    return server.proc, server.url


async def python_side(url: str, n: int) -> dict[str, float]:
    import nats

    nc = await nats.connect(url)
    out: dict[str, float] = {}
    for label, req, rep in CASES:
        body = b"q" * req
        reps = n if rep < (1 << 20) and req < (1 << 20) else max(30, n // 10)
        ts = []
        for i in range(reps + 20):
            t0 = time.perf_counter()
            await nc.request(f"bench.bus.{rep}", body, timeout=10)
            if i >= 20:
                ts.append(time.perf_counter() - t0)
        out[f"nats_py_{label}_us"] = statistics.median(ts) * 1e6
    await nc.close()
    return out


def node_side(url: str, n: int) -> dict[str, float]:
    node = shutil.which("node")
    mod = REPO / "tests" / "node" / "node_modules" / "@nats-io" / "transport-node"
    if node is None or not mod.exists():
        log("Node.js client not installed (npm ci in tests/node): skipping the Node.js column")
        return {}
    cases = json.dumps([[label, req, rep] for label, req, rep in CASES])
    # run in tests/node so the bare specifier resolves to its node_modules
    out = subprocess.run([node, "--input-type=module", "-e", NODE_CLIENT, url, str(max(30, n // 10)), cases],
                         capture_output=True, text=True, timeout=300, cwd=REPO / "tests" / "node")
    if out.returncode != 0:
        log(f"Node.js client failed: {out.stderr[-500:]}")
        return {}
    return {f"node_{k}_us": v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def tcp_side(n: int) -> dict[str, float]:
    size = 1 << 20
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    peer = subprocess.Popen([sys.executable, "-c", TCP_PEER, str(srv.getsockname()[1]), str(size)])
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    data = os.urandom(size)
    ts = []
    for i in range(max(30, n // 10) + 10):
        t0 = time.perf_counter()
        conn.sendall(data)
        conn.recv(1)
        if i >= 10:
            ts.append(time.perf_counter() - t0)
    conn.close()
    srv.close()
    peer.wait(10)
    return {"raw_tcp_1m_send_us": statistics.median(ts) * 1e6}


def main() -> None:
    args = parse_args(__doc__, "fewer samples")
    n = 200 if args.quick else 1000
    import uvloop

    with tempfile.TemporaryDirectory(prefix="fabric-bus-") as tmp:
        proc, url = start_nats(Path(tmp))
        responder = subprocess.Popen([sys.executable, "-c", NATS_RESPONDER, url], stdout=subprocess.PIPE)
        assert responder.stdout is not None
        responder.stdout.readline()
        try:
            log(f"nats-server at {url}; bare nats-py requests")
            results: dict[str, Any] = uvloop.run(python_side(url, n))
            log("the same from Node.js")
            results.update(node_side(url, n))
        finally:
            responder.kill()
            responder.wait()
            proc.terminate()
            proc.wait(10)
    log("raw TCP between two processes")
    results.update(tcp_side(n))
    for k, v in results.items():
        log(f"{k}: {v:.0f}")
    print(json.dumps({"bench": "bus", "results": {k: round(v, 1) for k, v in results.items()},
                      "machine": machine()}))


if __name__ == "__main__":
    main()

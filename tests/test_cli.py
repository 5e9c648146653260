"""``fabric up / status / req / down`` as a user runs them: real processes, no mocks.

One fabric (embedded nats-server on a free port, the real allocator) is started
with ``fabric up -d`` for the module; the tests query it, kill its allocator
with SIGKILL and watch the supervisor bring it back, and finally stop it with
``fabric down`` and check, by pid, that nothing it started is left.  Around it:
a second fabric side by side, ``up`` on a running state directory, a port in
use, a service that never gets ready, ``down`` with nothing running.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests._cli import cleanup, cli_env, fabric, read_state, status_json
from tests._nats import realm
from tests._spawner import processes_using

pytestmark = pytest.mark.slow


def listed_pids(state: dict[str, Any]) -> dict[str, int]:
    pids = {"supervisor": state["supervisor_pid"]}
    if state.get("nats") and state["nats"]["pid"]:
        pids["nats-server"] = state["nats"]["pid"]
    pids.update({name: rec["pid"] for name, rec in state["services"].items() if rec["pid"]})
    return pids


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False



def wait_until_gone(state_dir: Path, timeout: float = 5.0) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while (left := processes_using(state_dir)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.fixture(scope="module")
def needs_allocator() -> None:
    pytest.importorskip("fabric.services.allocator", reason="the allocator (and its Cython arena) is not built")


@pytest.fixture(scope="module")
def running(needs_allocator: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    state_dir = tmp_path_factory.mktemp("fabric-a")
    res = fabric("up", state_dir, "-d", "--nats-port", "0", "--timeout", "30")
    try:
        assert res.returncode == 0, res.stdout + res.stderr
        yield state_dir, res.stdout
    finally:
        cleanup(state_dir)


# -- the main flow, in order -------------------------------------------------------------


def test_up_detached_reports_ready(running: tuple[Path, str]) -> None:
    state_dir, stdout = running
    state = read_state(state_dir)
    assert state["phase"] == "ready"
    assert state["embedded_nats"] is True
    assert state["port"] != 4222 and state["nats_url"] == f"nats://127.0.0.1:{state['port']}"
    assert set(state["services"]) == {"allocator", "spawner", "gpu-monitor", "scheduler", "gateway"}
    assert all(alive(pid) for pid in listed_pids(state).values())
    # what the user is told: where NATS is, how another machine joins, where the logs are
    ready = re.search(r"fabric ready in ([0-9.]+) s", stdout)
    assert ready, stdout
    print(f"time to ready: {ready.group(1)} s")
    assert float(ready.group(1)) < 10
    assert state["nats_url"] in stdout
    assert "fabric up --join nats://" in stdout and f":{state['port']}" in stdout
    # the join command comes with the secret token itself (`fabric join-token` prints the same)
    token = fabric("join-token", state_dir).stdout.strip()
    assert token.startswith("fabric1.S") and f"--token {token}" in stdout, stdout
    assert str(state_dir / "logs") in stdout
    assert (state_dir / "logs" / "allocator.log").exists()
    assert (state_dir / "logs" / "nats-server.log").exists()
    conf = (state_dir / "nats" / "nats.conf").read_text()
    assert f"max_payload: {8 * 1024 * 1024}" in conf and str(state_dir / "nats" / "jetstream") in conf


def test_status_json_lists_the_allocator_on_this_node(running: tuple[Path, str]) -> None:
    state_dir, _ = running
    state = read_state(state_dir)
    code, doc = status_json(state_dir)
    assert code == 0, doc
    assert doc["nats_url"] == state["nats_url"] and doc["ok"] is True and doc["missing"] == []
    [svc] = [s for s in doc["services"] if s["name"] == "allocator"]
    assert svc["node"] == state["node"]
    assert svc["pid"] == state["services"]["allocator"]["pid"]
    assert svc["version"] and svc["id"] and svc["uptime_s"] is not None
    assert {"alloc", "free", "read", "write"} <= {ep["name"] for ep in svc["endpoints"]}
    assert {tuple(sorted(ep)) for ep in svc["endpoints"]} == {
        ("average_processing_time_ns", "last_error", "name", "num_errors", "num_requests", "subject")}


def first_table(stdout: str) -> tuple[list[str], list[list[str]]]:
    """The header and the rows of the first table rich drew in *stdout*."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("┃"))
    end = next(i for i, line in enumerate(lines) if line.startswith("└") and i > start)

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line[1:-1].split(line[0])]

    return cells(lines[start]), [cells(line) for line in lines[start:end] if line.startswith("│")]


def test_status_table(running: tuple[Path, str]) -> None:
    state_dir, _ = running
    node = read_state(state_dir)["node"]
    assert fabric("req", state_dir, f"fabric.mem.{node}.info", "{}").returncode == 0
    res = fabric("status", state_dir)
    assert res.returncode == 0, res.stderr
    # one row per service instance, its endpoints summed up
    header, rows = first_table(res.stdout)
    assert header == ["service", "node", "version", "uptime", "requests", "errors", "avg latency"]
    assert [(r[0], r[1]) for r in rows] == [("allocator", node), ("gateway", node), ("gpu-monitor", node),
                                            ("scheduler", node), ("spawner", node)]
    _, doc = status_json(state_dir)
    [alloc] = [s for s in doc["services"] if s["name"] == "allocator"]
    [alloc_row] = [r for r in rows if r[0] == "allocator"]
    assert alloc_row[2] == alloc["version"]
    assert int(alloc_row[4]) == sum(ep["num_requests"] for ep in alloc["endpoints"]) >= 1
    assert int(alloc_row[5]) == sum(ep["num_errors"] for ep in alloc["endpoints"])
    assert alloc_row[6] != "-"  # it served requests: an average latency
    assert f"services up: 5/5 on 1 node: {node} 5/5" in res.stdout
    # --endpoints: today's detail, one row per endpoint of each instance
    res = fabric("status", state_dir, "--endpoints")
    assert res.returncode == 0, res.stderr
    header, rows = first_table(res.stdout)
    assert header == ["service", "node", "version", "id", "uptime", "endpoint", "requests", "errors", "avg latency"]
    assert len(rows) == sum(len(s["endpoints"]) for s in doc["services"])
    assert {"alloc", "free", "read", "write", "info"} <= {r[5] for r in rows}
    assert "services up:" not in res.stdout


def test_status_with_a_second_node_joined(running: tuple[Path, str], tmp_path: Path) -> None:
    state_dir, _ = running
    state = read_state(state_dir)
    node = state["node"]
    other = tmp_path / "other"
    try:
        # auth is on: without the fabric's join token the other node is refused, and nothing starts there
        res = fabric("up", other, "-d", "--nats-url", state["nats_url"], "--node", "other-node",
                     "--services", "allocator")
        assert res.returncode == 1 and "requires credentials" in res.stderr and "fabric join-token" in res.stderr
        assert not (other / "state.json").exists()
        res = fabric("up", other, "-d", "--nats-url", state["nats_url"], "--node", "other-node",
                     "--services", "allocator", "--token", "fabric1.SUAAAA")
        assert res.returncode == 1 and "not a fabric join token" in res.stderr, res.stderr
        token = fabric("join-token", state_dir)
        assert token.returncode == 0 and token.stdout.startswith("fabric1.S"), token.stdout + token.stderr
        res = fabric("up", other, "-d", "--nats-url", state["nats_url"], "--node", node,
                     "--services", "allocator", "--token", token.stdout.strip())
        assert res.returncode == 1 and "this node's" in res.stderr, res.stderr  # the fabric's own name: 409
        res = fabric("up", other, "-d", "--nats-url", state["nats_url"], "--node", "other-node",
                     "--services", "allocator", "--token", token.stdout.strip())
        assert res.returncode == 0, res.stdout + res.stderr
        assert "joined the fabric" in res.stderr
        res = fabric("status", state_dir)
        assert res.returncode == 0, res.stderr
        _, rows = first_table(res.stdout)
        assert [(r[0], r[1]) for r in rows] == sorted([("allocator", "other-node"), ("allocator", node),
                                                      ("gateway", node), ("gpu-monitor", node), ("scheduler", node),
                                                      ("spawner", node)])
        # every node is expected to run what `fabric up` runs; the other one runs only an allocator
        per_node = {node: f"{node} 5/5",
                    "other-node": "other-node 1/5 (missing spawner, gpu-monitor, scheduler, gateway)"}
        line = "services up: 6/10 on 2 nodes: " + ", ".join(per_node[n] for n in sorted(per_node))
        assert line in res.stdout
        # seen from the other node, whose own fabric runs only its allocator
        res = fabric("status", other)
        assert res.returncode == 0, res.stderr
        per_node = {node: f"{node} 5/5", "other-node": "other-node 1/1"}
        assert "services up: 6/6 on 2 nodes: " + ", ".join(per_node[n] for n in sorted(per_node)) in res.stdout
    finally:
        cleanup(other)


def test_status_and_nodes_show_the_node_live(running: tuple[Path, str]) -> None:
    state_dir, _ = running
    node = read_state(state_dir)["node"]
    code, doc = status_json(state_dir)
    assert code == 0
    assert [n["node"] for n in doc["nodes"]] == [node]
    assert doc["nodes"][0]["host"]["cpu_cores"] == os.cpu_count()
    res = fabric("status", state_dir)
    assert res.returncode == 0 and "nodes (1)" in res.stdout and "opencl" in res.stdout
    # --watch --count 3 --json: three refreshes, one JSON line each, heartbeats advancing
    res = fabric("nodes", state_dir, "--watch", "--count", "3", "--interval", "1.1", "--json")
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(lines) == 3 and all([n["node"] for n in line] == [node] for line in lines)
    seqs = [line[0]["seq"] for line in lines]
    assert seqs[0] < seqs[1] < seqs[2], seqs
    res = fabric("nodes", state_dir)
    assert res.returncode == 0 and node in res.stdout and "status" in res.stdout


def test_opencl_job_through_the_public_client(running: tuple[Path, str]) -> None:
    """fc.opencl against `fabric up`: the fabric.opencl core on PoCL, checked against numpy."""
    np = pytest.importorskip("numpy")
    pytest.importorskip("pyopencl")
    import fabric
    from fabric import FabricClient

    state_dir, _ = running
    state = read_state(state_dir)
    vadd = """__kernel void vadd(__global const float *a, __global const float *b, __global float *c) {
        int i = get_global_id(0); c[i] = a[i] + b[i]; }"""
    a = np.random.default_rng(7).random(100_000, dtype=np.float32)
    b = np.arange(a.size, dtype=np.float32)
    mine = f"/dev/shm/fabric-stage-{os.getpid()}-*"
    with FabricClient(state["nats_url"], credentials=state["credentials"]) as fc:
        c, = fc.opencl(vadd, "vadd", a.size, [a, b, fabric.Out(a.size, np.float32)])
        np.testing.assert_array_equal(c, a + b)
        # the device it ran on is the one the node record lists (PoCL's CPU device here)
        [rec] = fc.nodes()
        assert rec.node == state["node"] and rec.opencl.devices
        c, = fc.opencl(vadd, "vadd", a.size, [b, b, fabric.Out(a.size, "float32")],
                       device=rec.opencl.devices[0].id)
        np.testing.assert_array_equal(c, 2 * b)
        with pytest.raises(fabric.KernelBuildFailed) as info:
            fc.opencl(vadd.replace("c[i] =", "c[i] = nope +"), "vadd", a.size, [a, b, fabric.Out(a.size)])
        assert info.value.code == 400 and "nope" in info.value.build_log
        with pytest.raises(fabric.BadRequest, match="elements"):  # a buffer smaller than the work items
            fc.opencl(vadd, "vadd", a.size, [a[:10], b, fabric.Out(a.size)])
        with pytest.raises(fabric.UnknownDevice):
            fc.opencl(vadd, "vadd", a.size, [a, b, fabric.Out(a.size)], device=f"{state['node']}:cl:0:9")
        c, = fc.opencl(vadd, "vadd", a.size, [a, a, fabric.Out(a.size)])  # still serving
        np.testing.assert_array_equal(c, 2 * a)
        assert glob.glob(mine), "a same-host client stages its buffers in /dev/shm"
    assert not glob.glob(mine), "close() leaves no staging file behind"


def test_nodes_without_a_gpu_monitor_fails_clearly(running: tuple[Path, str], tmp_path: Path) -> None:
    from tests._nats import start_nats

    server = start_nats(tmp_path / "nats", jetstream=False)
    try:
        # as the tests' admin: that server's users are the test realm's, not a fabric's
        res = fabric("nodes", tmp_path, "--nats-url", server.url, env=cli_env(FABRIC_CREDENTIALS=str(realm().admin)))
        assert res.returncode == 1 and "no gpu-monitor answers" in res.stderr, res.stderr
    finally:
        server.stop()


def test_status_missing_service_exits_nonzero(running: tuple[Path, str]) -> None:
    state_dir, _ = running
    code, doc = status_json(state_dir, "--node", "no-such-node")
    assert code == 1 and doc["missing"] == ["allocator", "spawner", "gpu-monitor", "scheduler", "gateway"]


def test_req_ping(running: tuple[Path, str]) -> None:
    state_dir, _ = running
    res = fabric("req", state_dir, "$SRV.PING.allocator")
    assert res.returncode == 0, res.stderr
    reply = json.loads(res.stdout)
    assert reply["name"] == "allocator" and reply["metadata"]["node"] == read_state(state_dir)["node"]


def test_req_json_and_msgpack_from_stdin(running: tuple[Path, str]) -> None:
    state_dir, _ = running
    node = read_state(state_dir)["node"]
    as_json = fabric("req", state_dir, f"fabric.mem.{node}.info", "-", input="{}")
    assert as_json.returncode == 0, as_json.stderr
    as_msgpack = fabric("req", state_dir, "--msgpack", "--show-headers", f"fabric.mem.{node}.info", "{}")
    assert as_msgpack.returncode == 0, as_msgpack.stderr
    assert "Content-Type: application/msgpack" in as_msgpack.stderr
    assert json.loads(as_json.stdout).keys() == json.loads(as_msgpack.stdout).keys()


def test_req_error_reply(running: tuple[Path, str]) -> None:
    state_dir, _ = running
    node = read_state(state_dir)["node"]
    res = fabric("req", state_dir, f"fabric.mem.{node}.alloc", '{"size": "lots"}', "--header", "Fabric-Request-Id: t1")
    assert res.returncode == 1
    assert res.stderr.startswith("error 400: "), res.stderr
    assert res.stdout == ""


def test_req_no_responders(running: tuple[Path, str]) -> None:
    state_dir, _ = running
    res = fabric("req", state_dir, "fabric.nobody.listens.here", "{}")
    assert res.returncode == 1
    assert "no responders on fabric.nobody.listens.here" in res.stderr
    assert "Traceback" not in res.stderr


def test_up_on_a_running_state_dir_is_refused(running: tuple[Path, str]) -> None:
    state_dir, _ = running
    before = read_state(state_dir)
    res = fabric("up", state_dir, "-d", "--nats-port", "0")
    assert res.returncode == 1
    assert "already running" in res.stderr and str(before["supervisor_pid"]) in res.stderr
    assert "Traceback" not in res.stderr
    assert read_state(state_dir)["supervisor_pid"] == before["supervisor_pid"]


def test_killed_service_is_restarted(running: tuple[Path, str]) -> None:
    state_dir, _ = running
    old = read_state(state_dir)["services"]["allocator"]["pid"]
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 20
    new = None
    while time.monotonic() < deadline:
        pid = read_state(state_dir)["services"]["allocator"]["pid"]
        if pid and pid != old:
            code, doc = status_json(state_dir)
            if code == 0 and any(s["name"] == "allocator" and s["pid"] == pid for s in doc["services"]):
                new = pid
                break
        time.sleep(0.1)
    assert new is not None, "the allocator did not come back"
    assert read_state(state_dir)["services"]["allocator"]["restarts"] >= 1
    events = [json.loads(line) for line in (state_dir / "logs" / "supervisor.log").read_text().splitlines()
              if line.startswith("{")]
    exited = [e for e in events if e["event"] == "child exited" and e.get("pid") == old]
    assert exited and exited[0]["status"] == "killed by SIGKILL"
    assert any(e["event"] == "restarting child" and e["child"] == "allocator" and e["delay_s"] == 0.1 for e in events)
    assert any(e["event"] == "child restarted" and e.get("pid") == new for e in events)


def test_down_stops_everything(running: tuple[Path, str]) -> None:
    state_dir, _ = running
    pids = listed_pids(read_state(state_dir))
    assert set(pids) == {"supervisor", "nats-server", "allocator", "spawner", "gpu-monitor", "scheduler", "gateway"}
    res = fabric("down", state_dir)
    assert res.returncode == 0, res.stderr
    assert "fabric stopped" in res.stdout
    assert [name for name, pid in pids.items() if alive(pid)] == []
    assert wait_until_gone(state_dir, 1.0) == []
    assert read_state(state_dir)["phase"] == "stopped"
    # the services drained on SIGTERM rather than being killed
    assert "signal received, draining" in (state_dir / "logs" / "allocator.log").read_text()


# -- around it --------------------------------------------------------------------------


def test_two_fabrics_side_by_side(needs_allocator: None, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    try:
        ra = fabric("up", a, "-d", "--nats-port", "0", "--node", "node-a")
        rb = fabric("up", b, "-d", "--nats-port", "0", "--node", "node-b")
        assert ra.returncode == 0 and rb.returncode == 0, ra.stderr + rb.stderr
        sa, sb = read_state(a), read_state(b)
        assert sa["nats_url"] != sb["nats_url"]
        for state_dir, node in ((a, "node-a"), (b, "node-b")):
            code, doc = status_json(state_dir)
            assert code == 0
            assert [(s["name"], s["node"]) for s in doc["services"]] == [
                ("allocator", node), ("gateway", node), ("gpu-monitor", node), ("scheduler", node),
                ("spawner", node)]
        pids = list(listed_pids(sa).values()) + list(listed_pids(sb).values())
        assert fabric("down", a).returncode == 0
        assert all(alive(pid) for pid in listed_pids(sb).values()), "stopping a touched b"
        assert fabric("down", b).returncode == 0
        assert [pid for pid in pids if alive(pid)] == []
    finally:
        cleanup(a)
        cleanup(b)


def test_down_when_nothing_runs(tmp_path: Path) -> None:
    res = fabric("down", tmp_path)
    assert res.returncode == 0
    assert "no fabric is running" in res.stdout


def test_status_when_nothing_runs(tmp_path: Path) -> None:
    res = fabric("status", tmp_path)
    assert res.returncode == 1
    assert "no fabric is running" in res.stderr and "Traceback" not in res.stderr


def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = fabric("up", tmp_path, "-d", "--nats-port", str(port))
    assert res.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in res.stderr
    assert "--nats-port 0" in res.stderr and "Traceback" not in res.stderr
    assert processes_using(tmp_path) == []


def test_service_that_never_gets_ready(tmp_path: Path) -> None:
    # json.tool rejects the service arguments and exits: the supervisor restarts
    # it with backoff until the timeout, then gives up and stops everything
    env = cli_env(FABRIC_SERVICE_MODULES=json.dumps({"allocator": "json.tool"}))
    t0 = time.monotonic()
    res = fabric("up", tmp_path, "-d", "--nats-port", "0", "--timeout", "1", env=env)
    assert res.returncode == 1
    assert time.monotonic() - t0 < 10
    assert "not ready within 1.0 s: allocator" in res.stderr
    assert "allocator.log" in res.stderr and "json.tool: error" in res.stderr  # the log's tail
    assert read_state(tmp_path)["phase"] == "failed"
    assert wait_until_gone(tmp_path) == []


# A service module that records its pid in <state-dir>/test-pids, then misbehaves.
_RECORD_PID = """
import os, signal, sys, time
STATE_DIR = sys.argv[sys.argv.index("--state-dir") + 1]
with open(os.path.join(STATE_DIR, "test-pids"), "a") as f:
    f.write(f"{os.getpid()}\\n")
"""
NOT_READY = {
    # crashes at import: restarted with backoff until the start times out
    "crashes-at-import": (_RECORD_PID + "raise RuntimeError('this service crashes at import')\n", ["--timeout", "2"]),
    # never answers its ping and ignores SIGTERM: the stop after the time-out must SIGKILL it
    "hangs-ignoring-sigterm": (_RECORD_PID + "signal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(120)\n",
                               ["--timeout", "2", "--grace", "0.5"]),
    # SIGKILLs the supervisor once it has recorded and logged every child: nobody is left to
    # stop them but `fabric up -d` itself
    "kills-the-supervisor": (_RECORD_PID + """
import json
state = os.path.join(STATE_DIR, "state.json")
log = os.path.join(STATE_DIR, "logs", "supervisor.log")
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        listed = json.load(open(state))["services"]["misbehaving"]["pid"] == os.getpid()
        if listed and "fabric starting" in open(log).read():
            os.kill(os.getppid(), signal.SIGKILL)
            break
    except (OSError, ValueError, KeyError):
        pass
    time.sleep(0.01)
time.sleep(120)
""", ["--timeout", "30"]),
}


def started_pids(state_dir: Path) -> dict[int, str]:
    """Every pid a fabric in *state_dir* started, from its state file, its log and the test modules' records."""
    state = read_state(state_dir)
    pids = {pid: name for name, pid in listed_pids(state).items()}
    for line in (state_dir / "logs" / "supervisor.log").read_text().splitlines():
        if not line.startswith("{"):
            continue
        event = json.loads(line)
        if isinstance(event.get("pid"), int):
            pids[event["pid"]] = event.get("child", "nats-server")
        for name, pid in (event.get("pids") or {}).items():
            if pid:
                pids[pid] = name
    records = state_dir / "test-pids"
    for pid in (records.read_text().split() if records.exists() else []):
        pids[int(pid)] = "misbehaving"
    return pids


@pytest.mark.parametrize("behaviour", list(NOT_READY))
def test_up_that_does_not_get_ready_leaves_nothing_running(needs_allocator: None, tmp_path: Path,
                                                           behaviour: str) -> None:
    source, args = NOT_READY[behaviour]
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "misbehaving.py").write_text(source)
    state_dir = tmp_path / "state"
    env = cli_env(FABRIC_SERVICE_MODULES=json.dumps({"misbehaving": "misbehaving"}))
    env["PYTHONPATH"] = os.pathsep.join([str(mods), env["PYTHONPATH"]])
    try:
        res = fabric("up", state_dir, "-d", "--nats-port", "0", "--services", "allocator,misbehaving", *args, env=env)
        assert res.returncode == 1, res.stdout + res.stderr
        pids = started_pids(state_dir)
        # the supervisor, its nats-server and both services (every incarnation) are known by pid...
        assert {"supervisor", "nats-server", "allocator", "misbehaving"} <= set(pids.values()), pids
        # ...and not one of them is left once `fabric up -d` has returned
        assert {pid: name for pid, name in pids.items() if alive(pid)} == {}
        if behaviour == "kills-the-supervisor":
            assert "the supervisor exited before it was ready" in res.stderr
            assert "killed leftover processes" in res.stderr
    finally:
        cleanup(state_dir)


def test_unknown_service_and_bad_node(tmp_path: Path) -> None:
    res = fabric("up", tmp_path, "--services", "allocator,teleporter")
    assert res.returncode == 1 and "unknown service(s): teleporter" in res.stderr
    res = fabric("up", tmp_path, "--node", "a.b")
    assert res.returncode == 1 and "invalid node name" in res.stderr

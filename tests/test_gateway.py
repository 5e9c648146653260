"""The HTTP gateway as its users reach it: ``fabric up`` (auth on), then HTTP with ``httpx``, no mocks.

One fabric for the module, started as a user starts it, with a small body limit, a low
rate limit and a short event queue so those bounds can be reached.  Tokens are made with
``fabric token create``, as an operator makes them.  Every request goes through the real
gateway to the real services over the real nats-server; what the tests read back is what
a ``curl`` user would see: status codes, problem+json bodies, bytes.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests._cli import cleanup, cli_env, fabric, read_state, status_json

pytestmark = pytest.mark.slow

MAX_BODY = 16 << 20
RATE = 20.0
BURST = 40


class Gw:
    def __init__(self, state_dir: Path, url: str, operator: str) -> None:
        self.state_dir = state_dir
        self.url = url
        self.operator = operator
        self.http = httpx.Client(base_url=url, timeout=30.0)

    def token(self, name: str, scope: str = "read,submit", user: str | None = None) -> str:
        args = [name, "--scope", scope, *(["--user", user] if user else [])]
        res = fabric("token create", self.state_dir, *args)
        assert res.returncode == 0, res.stdout + res.stderr
        token = res.stdout.strip()
        assert token.startswith("fbt_") and "Shown once" in res.stderr
        wait_for(lambda: self.get("/api/whoami", token).status_code == 200, what=f"token {name} known")
        return token

    def get(self, path: str, token: str | None = None, **kw: Any) -> httpx.Response:
        return self.http.get(path, headers=_auth(token), **kw)

    def post(self, path: str, token: str | None = None, **kw: Any) -> httpx.Response:
        return self.http.post(path, headers={**_auth(token), **kw.pop("headers", {})}, **kw)


def _auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def wait_for(check: Any, timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def problem(r: httpx.Response, status: int, kind: str | None = None) -> dict[str, Any]:
    """The response is an RFC 9457 problem with *status* (and fabric *kind*)."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    body = r.json()
    assert body["status"] == body["code"] == status and body["title"] and body["detail"], body
    assert body["type"] == f"urn:fabric:error:{body['kind']}"
    if kind is not None:
        assert body["kind"] == kind, body
    return dict(body)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gw]:
    state_dir = tmp_path_factory.mktemp("gateway")
    env = cli_env(FABRIC_GATEWAY_MAX_BODY=str(MAX_BODY), FABRIC_GATEWAY_RATE_PER_S=str(RATE),
                  FABRIC_GATEWAY_BURST=str(BURST), FABRIC_GATEWAY_SSE_QUEUE="16",
                  FABRIC_TELEMETRY_INTERVAL_S="0.25", FABRIC_TELEMETRY_NODE_TTL_S="2",
                  FABRIC_GATEWAY_WEBHOOK_ATTEMPTS="3", FABRIC_GATEWAY_WEBHOOK_BACKOFF_S="0.2",
                  FABRIC_GATEWAY_WEBHOOK_TIMEOUT_S="1.5")
    try:
        up = fabric("up", state_dir, "-d", "--nats-port", "0", "--node", "gw1", env=env, timeout=90)
        assert up.returncode == 0, up.stdout + up.stderr
        code, doc = status_json(state_dir)
        url = doc["gateway"]
        assert code == 0 and url.startswith("http://127.0.0.1:"), doc
        operator = (state_dir / "auth" / "operator.token").read_text().strip()
        # the banner's dashboard link carries this machine's operator token
        assert f"dashboard {url}/?token={operator}" in up.stdout, up.stdout
        g = Gw(state_dir, url, operator)
        wait_for(lambda: g.get("/api/whoami", operator).status_code == 200, what="the operator token")
        yield g
        g.http.close()
    finally:
        cleanup(state_dir)


def test_status_and_nats_say_where_the_gateway_is(gw: Gw) -> None:
    state = read_state(gw.state_dir)
    assert state["gateway_url"] == gw.url and "gateway" in state["services"]
    res = fabric("req", gw.state_dir, "fabric.gateway.gw1.info", "{}")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["url"] == gw.url and info["node"] == "gw1" and info["loopback_only"] is True
    assert info["anonymous_scopes"] == ["read"] and info["tokens_loaded"] is True and info["tokens"] >= 1
    assert info["nats_server"] == "fabric-gw1" and info["nats_figures"]["connections"] >= 5


def test_anonymous_loopback_reads_fabric_state_only(gw: Gw) -> None:
    r = gw.get("/api/whoami")
    assert r.json()["anonymous"] is True and r.json()["scopes"] == ["read"]
    devices = gw.get("/api/devices")
    assert devices.status_code == 200
    [dev] = devices.json()["devices"]  # UDCS's shape
    assert dev["id"] == "gw1" and dev["hostname"] and dev["architecture"] and "gpus" in dev
    nodes = gw.get("/api/nodes").json()["nodes"]
    assert [n["node"] for n in nodes] == ["gw1"] and nodes[0]["cpu"]["per_core"]
    assert gw.get("/api/nodes/gw1").json()["node"] == "gw1"
    problem(gw.get("/api/nodes/nope"), 404, "unknown_node")
    problem(gw.get("/api/nodes/bad%20name"), 400, "bad_request")
    services = {s["name"] for s in gw.get("/api/services").json()["services"]}
    assert services == {"allocator", "spawner", "gpu-monitor", "scheduler", "gateway"}
    [mem] = gw.get("/api/memory").json()["nodes"]
    assert mem["node"] == "gw1" and mem["capacity"] == 16 << 20
    # tasks and memory belong to users: a token is needed
    problem(gw.get("/api/tasks"), 403, "denied")
    problem(gw.post("/api/submit", json={"kind": "exec", "exec": {"argv": ["true"]}}), 401, "unauthenticated")
    problem(gw.post("/api/mem", json={"size": 10}), 401, "unauthenticated")


def test_udcs_submit_as_the_issue_shows_it(gw: Gw) -> None:
    token = gw.token("udcs")
    body = {"type": "NATIVE_EXEC", "priority": 5, "requirements": {"min_memory_gb": 0.01, "architecture": "x86_64"},
            "payload": {"argv": ["uname", "-a"]}}
    r = gw.post("/api/submit", token, content=json.dumps(body))  # as curl -d sends it
    assert r.status_code == 201, r.text
    task_id = r.json()["id"]
    out = gw.get(f"/api/tasks/{task_id}/result", token, params={"wait": 30})
    assert out.status_code == 200, out.text
    assert out.headers["fabric-task-state"] == "succeeded" and out.headers["fabric-exit-code"] == "0"
    assert out.content.startswith(b"Linux ")
    rec = gw.get(f"/api/tasks/{task_id}", token).json()
    assert rec["state"] == "succeeded" and rec["owner"] == "udcs" and rec["kind"] == "exec"
    assert rec["resources"]["mem"] == int(0.01 * (1 << 30)) and rec["resources"]["arch"] == "x86_64"
    listed = gw.get("/api/tasks", token, params={"state": "succeeded"}).json()["tasks"]
    assert task_id in [t["id"] for t in listed] and {t["owner"] for t in listed} == {"udcs"}
    # UDCS's own NATIVE_EXEC shape (args) and fabric's (kind + exec) too
    r = gw.post("/api/submit", token, json={"type": "NATIVE_EXEC", "args": ["echo", "udcs-args"]})
    assert r.status_code == 201
    assert gw.get(f"/api/tasks/{r.json()['id']}/result", token, params={"wait": 30}).content == b"udcs-args\n"


def test_tasks_belong_to_their_token_user(gw: Gw) -> None:
    alice, bob = gw.token("alice"), gw.token("bob")
    r = gw.post("/api/submit", alice, json={"kind": "exec", "exec": {"argv": ["sleep", "30"]}, "priority": 2})
    assert r.status_code == 201
    task_id = r.json()["id"]
    problem(gw.get(f"/api/tasks/{task_id}", bob), 403, "denied")
    problem(gw.http.delete(f"/api/tasks/{task_id}", headers=_auth(bob)), 403, "denied")
    assert task_id not in [t["id"] for t in gw.get("/api/tasks", bob).json()["tasks"]]
    # the operator's token acts as the fabric's admin: it sees and cancels anyone's task
    assert task_id in [t["id"] for t in gw.get("/api/tasks", gw.operator).json()["tasks"]]
    problem(gw.get(f"/api/tasks/{task_id}/result", alice), 409, "conflict")  # not ended yet
    r = gw.http.delete(f"/api/tasks/{task_id}", headers=_auth(gw.operator))
    assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
    problem(gw.http.delete(f"/api/tasks/{task_id}", headers=_auth(alice)), 409, "conflict")
    problem(gw.get(f"/api/tasks/{task_id}/result", alice), 409, "conflict")
    problem(gw.get("/api/tasks/no-such-task", alice), 404)
    problem(gw.get("/api/tasks/bad$id", alice), 400, "bad_request")


def test_scopes_and_tokens(gw: Gw) -> None:
    reader = gw.token("reader", scope="read")
    problem(gw.post("/api/submit", reader, json={"kind": "exec", "exec": {"argv": ["true"]}}), 403, "denied")
    assert gw.get("/api/tasks", reader).status_code == 200
    problem(gw.get("/api/whoami", "fbt_" + "A" * 43), 401, "unauthenticated")
    problem(gw.get("/api/whoami", "not-a-token"), 401, "unauthenticated")
    problem(gw.http.get("/api/whoami", headers={"Authorization": "Basic abc"}), 401, "unauthenticated")
    listed = fabric("token list", gw.state_dir, "--json")
    assert listed.returncode == 0
    names = {t["name"]: t for t in json.loads(listed.stdout)}
    assert names["reader"]["scopes"] == ["read"] and names["reader"]["user"] == "reader"
    assert names["operator-gw1"]["scopes"] == ["read", "submit", "admin"] and names["operator-gw1"]["user"] is None
    assert "fbt_" not in listed.stdout  # never the tokens themselves
    dup = fabric("token create", gw.state_dir, "reader")
    assert dup.returncode == 1 and "exists" in dup.stderr
    bad = fabric("token create", gw.state_dir, "x", "--scope", "root")
    assert bad.returncode == 1 and "unknown scope" in bad.stderr
    rm = fabric("token rm", gw.state_dir, "reader")
    assert rm.returncode == 0, rm.stderr
    wait_for(lambda: gw.get("/api/whoami", reader).status_code == 401, what="the removed token refused")
    assert fabric("token rm", gw.state_dir, "reader").returncode == 1


def test_remote_memory_over_http(gw: Gw) -> None:
    token = gw.token("memuser")
    r = gw.post("/api/mem", token, json={"size": 4096})
    assert r.status_code == 201, r.text
    handle = r.json()["handle"]
    assert r.json()["size"] == 4096 and r.json()["node"] == "gw1"
    r = gw.http.put(f"/api/mem/{handle}", content=b"hello", params={"offset": 10}, headers=_auth(token))
    assert r.status_code == 200 and r.json() == {"written": 5}
    assert gw.get(f"/api/mem/{handle}", token, params={"offset": 10, "length": 5}).content == b"hello"
    whole = gw.get(f"/api/mem/{handle}", token)
    assert whole.headers["content-type"] == "application/octet-stream" and len(whole.content) == 4096
    assert whole.content[:15] == b"\0" * 10 + b"hello"
    stat = gw.get(f"/api/mem/{handle}/stat", token).json()
    assert stat["size"] == 4096 and stat["owner"] == "memuser" and stat["writable"] is True
    problem(gw.get(f"/api/mem/{handle}", token, params={"offset": 4090, "length": 100}), 400, "out_of_range")
    # larger than one NATS message (8 MiB): the gateway splits it as the client does
    big = bytes(range(256)) * (10 << 12)  # 10 MiB
    r2 = gw.post("/api/mem", token, json={"size": len(big)})
    assert r2.status_code == 201, r2.text
    h2 = r2.json()["handle"]
    assert gw.http.put(f"/api/mem/{h2}", content=big, headers=_auth(token)).json() == {"written": len(big)}
    assert gw.get(f"/api/mem/{h2}", token).content == big
    assert gw.http.delete(f"/api/mem/{h2}", headers=_auth(token)).json() == {"freed": len(big)}
    assert gw.http.delete(f"/api/mem/{handle}", headers=_auth(token)).json() == {"freed": 4096}
    problem(gw.get(f"/api/mem/{handle}", token), 404, "stale_handle")
    problem(gw.http.delete(f"/api/mem/{handle}", headers=_auth(token)), 409, "double_free")
    forged = handle[:-4] + ("0000" if not handle.endswith("0000") else "1111")
    problem(gw.get(f"/api/mem/{forged}", token), 404, "unknown_handle")
    problem(gw.post("/api/mem", token, json={"size": -1}), 400, "bad_request")
    problem(gw.post("/api/mem", token, json={"size": 1 << 50}), 400, "bad_request")


def test_bad_input_is_a_problem_and_the_gateway_keeps_serving(gw: Gw) -> None:
    token = gw.token("badinput")
    hdrs = {"Content-Type": "application/json"}
    problem(gw.post("/api/submit", token, content=b"{not json", headers=hdrs), 400, "bad_request")
    problem(gw.post("/api/submit", token, json={"priority": "high", "kind": "exec"}), 400, "bad_request")
    problem(gw.post("/api/submit", token, json={"kind": "exec"}), 400, "bad_request")  # no argv
    problem(gw.post("/api/submit", token, json={"type": "NOPE"}), 400, "bad_request")
    problem(gw.post("/api/submit", token, json={"kind": "python", "payload": {"argv": ["x"]}}), 400, "bad_request")
    problem(gw.post("/api/submit", token, json=[1, 2]), 400, "bad_request")
    problem(gw.post("/api/submit", token, json={"kind": "exec", "exec": {"argv": ["x"]}, "notify": "x.y"}), 403)
    problem(gw.post("/api/mem", token, json={"size": 1, "colour": "red"}), 400, "bad_request")  # unknown field
    # over the body limit: refused from the Content-Length, before the body is read (only 1 KiB of it is sent)
    host, port = gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"PUT /api/mem/v1:gw1:0:0:0:rw:00 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                  f"Content-Length: {MAX_BODY + 1}\r\n\r\n".encode() + b"x" * 1024)
        head = b""
        while b'"too_large"' not in head and (chunk := s.recv(65536)):  # headers and body may come apart
            head += chunk
        text = head.decode()
    assert text.startswith("HTTP/1.1 413 ") and "application/problem+json" in text and '"too_large"' in text, text
    big = b"x" * (MAX_BODY + 1)  # and a body that really is that large: the same
    problem(gw.http.put("/api/mem/v1:gw1:0:0:0:rw:00", content=big, headers=_auth(token)), 413, "too_large")
    problem(gw.http.patch("/api/tasks", headers=_auth(token)), 405, "method_not_allowed")
    typo = problem(gw.get("/api/tasks", token, params={"limt": 5}), 400, "bad_request")  # never silently ignored
    assert "'limt'" in typo["detail"] and "limit, state" in typo["detail"]
    problem(gw.get("/api/tasks", token, params={"limit": 0}), 400, "bad_request")
    problem(gw.get("/no/such/route"), 404, "not_found")
    # CORS is closed by default: a page of another origin gets no permission to read the answer
    cross = gw.http.get("/api/devices", headers={"Origin": "http://evil.example"})
    assert cross.status_code == 200 and "access-control-allow-origin" not in cross.headers
    pre = gw.http.options("/api/submit", headers={"Origin": "http://evil.example",
                                                  "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in pre.headers
    assert gw.get("/api/whoami", token).status_code == 200  # still serving


def test_rate_limit_per_token(gw: Gw) -> None:
    token = gw.token("hasty")
    codes = [gw.get("/api/whoami", token) for _ in range(BURST + 20)]
    limited = [r for r in codes if r.status_code == 429]
    assert limited, [r.status_code for r in codes]
    body = problem(limited[0], 429, "rate_limited")
    assert "hasty" in body["detail"] and int(limited[0].headers["retry-after"]) >= 1
    assert gw.get("/api/whoami", gw.operator).status_code == 200  # another token is not slowed
    time.sleep(2 / RATE + 0.2)
    assert gw.get("/api/whoami", token).status_code == 200  # the bucket refills


def test_metrics_parse_and_cover_the_fabric(gw: Gw) -> None:
    token = gw.token("metered")
    done = gw.post("/api/submit", token, json={"kind": "exec", "exec": {"argv": ["true"]}})
    assert gw.get(f"/api/tasks/{done.json()['id']}/result", token, params={"wait": 30}).status_code == 200
    r = gw.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in ("fabric_service_requests", "fabric_service_errors", "fabric_service_processing_seconds",
                 "fabric_node_up", "fabric_node_cpu_ratio", "fabric_node_memory_used_bytes", "fabric_tasks",
                 "fabric_task_queue_depth", "fabric_task_latency_seconds", "fabric_tasks_ended",
                 "fabric_mem_capacity_bytes",
                 "fabric_mem_in_use_bytes", "fabric_nats_connections", "fabric_nats_received_messages",
                 "fabric_gateway_event_streams"):
        assert name in families, name
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("fabric_node_up", (("node", "gw1"),))] == 1
    assert samples[("fabric_mem_capacity_bytes", (("node", "gw1"),))] == 16 << 20
    assert any(k[0] == "fabric_service_requests_total" and ("service", "scheduler") in k[1] for k in samples)
    assert samples[("fabric_nats_connections", (("node", "gw1"), ("server", "fabric-gw1")))] >= 5
    ended = samples[("fabric_task_latency_seconds_count", ())]
    succeeded = samples[("fabric_tasks_ended_total", (("state", "succeeded"),))]
    assert ended >= succeeded >= 1 and samples[("fabric_tasks", (("state", "queued"),))] >= 0
    assert samples[("fabric_task_latency_seconds_bucket", (("le", "+Inf"),))] == ended
    # the same figures over NATS, for an admin (services and admins only: no user form)
    res = fabric("req", gw.state_dir, "fabric.task.stats", "{}")
    stats = json.loads(res.stdout)
    assert stats["ended"]["succeeded"] >= succeeded and stats["latency_counts"] == sorted(stats["latency_counts"])
    assert not any(k[0] == "fabric_scrape_error" for k in samples)


def _events(gw: Gw, token: str | None, topics: str, until: Any, timeout: float = 15.0) -> list[tuple[str, Any]]:
    seen: list[tuple[str, Any]] = []
    with httpx.stream("GET", f"{gw.url}/api/events", params={"topics": topics}, headers=_auth(token),
                      timeout=timeout) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        event = ""
        deadline = time.monotonic() + timeout
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                seen.append((event, json.loads(line[6:])))
                if until(seen):
                    return seen
            if time.monotonic() > deadline:
                break
    raise AssertionError(f"the events did not come: {[e for e, _ in seen]}")


def _streams(gw: Gw) -> int:
    res = fabric("req", gw.state_dir, "fabric.gateway.gw1.info", "{}")
    return int(json.loads(res.stdout)["event_streams"])


def test_events_stream_telemetry_services_and_own_tasks(gw: Gw) -> None:
    seen = _events(gw, None, "node,services", lambda s: {"node", "services"} <= {e for e, _ in s})
    node = next(d for e, d in seen if e == "node")
    assert node["node"] == "gw1" and "cpu" in node
    first = next(d for e, d in seen if e == "services")
    assert first["initial"] is True and {s["name"] for s in first["up"]} >= {"scheduler", "gateway"}
    # anonymous: no task events, even when asked (tasks belong to users)
    token = gw.token("watcher")
    import threading

    result: list[list[tuple[str, Any]]] = []

    def watch() -> None:
        result.append(_events(gw, token, "tasks", lambda s: any(
            ev["state"] == "succeeded" for e, d in s if e == "tasks" for ev in d["events"])))

    t = threading.Thread(target=watch)
    t.start()
    time.sleep(0.5)
    r = gw.post("/api/submit", token, json={"kind": "exec", "exec": {"argv": ["true"]}})
    assert r.status_code == 201
    t.join(20)
    assert result, "no task events"
    states = [ev["state"] for e, d in result[0] if e == "tasks" for ev in d["events"] if ev["id"] == r.json()["id"]]
    assert states[-1] == "succeeded" and "running" in states, states
    # the streams above ended when their clients went: nothing is left subscribed for them
    wait_for(lambda: _streams(gw) == 0, what="the event streams released")
    problem(gw.get("/api/events", params={"topics": "bogus"}), 400, "bad_request")


def test_openapi_and_offline_docs(gw: Gw) -> None:
    doc = gw.get("/schema/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    for path in ("/api/submit", "/api/devices", "/api/tasks", "/api/tasks/{task_id}", "/api/tasks/{task_id}/result",
                 "/api/mem", "/api/mem/{handle}", "/api/nodes", "/api/services", "/api/memory", "/api/events",
                 "/metrics", "/api/topology"):
        assert path in doc["paths"], path
    schemas = doc["components"]["schemas"]
    assert "SubmitRequest" in schemas and "Problem" in schemas and "TaskRecord" in schemas
    page = gw.get("/schema/swagger")
    assert page.status_code == 200
    assets = [a for a in ("swagger-ui-bundle.js", "swagger-ui.css", "swagger-ui-standalone-preset.js")]
    for asset in assets:
        assert f"/static/swagger/{asset}" in page.text  # served by the gateway: no CDN
        assert gw.get(f"/static/swagger/{asset}").status_code == 200
    assert "cdn" not in page.text.lower() and "unpkg" not in page.text.lower()


class Receiver:
    """A webhook receiver: a real HTTP server on loopback that answers each POST with the next of *codes*."""

    def __init__(self, codes: list[int], delay: float = 0.0) -> None:
        import http.server
        import threading

        self.codes = list(codes)
        self.got: list[tuple[dict[str, str], bytes]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.got.append(({k.lower(): v for k, v in self.headers.items()}, body))
                time.sleep(delay)
                code = outer.codes.pop(0) if len(outer.codes) > 1 else outer.codes[0]
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/done"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _callback_of(gw: Gw, token: str, task_id: str, timeout: float = 30.0) -> dict[str, Any]:
    found: list[dict[str, Any]] = []

    def done() -> bool:
        rec = gw.get(f"/api/tasks/{task_id}", token).json()
        if rec.get("callback"):
            found.append(rec["callback"])
        return bool(found)

    wait_for(done, timeout, what=f"the webhook outcome of {task_id}")
    return found[0]


def test_webhooks_are_signed_retried_and_recorded(gw: Gw) -> None:
    import hashlib
    import hmac

    token = gw.token("hooks")
    secret = fabric("webhook-secret", gw.state_dir)
    assert secret.returncode == 0 and len(secret.stdout.strip()) == 64, secret.stderr
    key = secret.stdout.strip().encode()  # the hex text is the key, as the receiver holds it
    flaky = Receiver([503, 200])  # down once, then up: delivered on the second try
    try:
        r = gw.post("/api/submit", token, json={"type": "NATIVE_EXEC", "args": ["echo", "hooked"],
                                                "callback_url": flaky.url})
        assert r.status_code == 201, r.text
        task_id = r.json()["id"]
        outcome = _callback_of(gw, token, task_id)
        assert outcome["outcome"] == "delivered" and outcome["attempts"] == 2 and outcome["status"] == 200, outcome
        assert len(flaky.got) == 2
        headers, body = flaky.got[-1]
        expected = hmac.new(key, headers["x-fabric-timestamp"].encode() + b"." + body, hashlib.sha256).hexdigest()
        assert headers["x-fabric-signature"] == f"sha256={expected}"
        assert headers["x-fabric-delivery"] == f"{task_id}/2" and headers["x-fabric-event"] == "task.ended"
        assert abs(int(headers["x-fabric-timestamp"]) - time.time()) < 60
        doc = json.loads(body)
        assert doc["id"] == task_id and doc["state"] == "succeeded" and doc["exit_code"] == 0
        assert doc["result_url"] == f"{gw.url}/api/tasks/{task_id}/result" and doc["result_size"] == len(b"hooked\n")
        assert gw.get(doc["result_url"].removeprefix(gw.url), token).content == b"hooked\n"
    finally:
        flaky.close()
    # a rotated secret signs from then on (the gateways follow the bucket)
    rotated = fabric("webhook-secret", gw.state_dir, "--rotate")
    assert rotated.returncode == 0 and "replaced" in rotated.stderr, rotated.stderr
    new_key = rotated.stdout.strip().encode()
    assert new_key != key and len(new_key) == 64
    ok = Receiver([200])
    try:
        signed_by: list[bytes] = []
        for _ in range(3):  # the first may still be signed with the old secret, if it raced the rotation
            r = gw.post("/api/submit", token, json={"kind": "exec", "exec": {"argv": ["true"]}, "callback_url": ok.url})
            assert _callback_of(gw, token, r.json()["id"])["outcome"] == "delivered"
            headers, body = ok.got[-1]
            signed_by += [k for k in (key, new_key) if headers["x-fabric-signature"] == "sha256=" + hmac.new(
                k, headers["x-fabric-timestamp"].encode() + b"." + body, hashlib.sha256).hexdigest()]
            if signed_by[-1:] == [new_key]:
                break
        assert signed_by and signed_by[-1] == new_key, "the rotated secret was not used"
    finally:
        ok.close()
    # a receiver that never answers in time, then a dead one: the failure is recorded, the scheduler unslowed
    slow = Receiver([200], delay=5.0)
    dead = Receiver([200])
    dead.close()  # its port now refuses connections
    try:
        ids = {}
        for name, url in (("slow", slow.url), ("dead", dead.url)):
            r = gw.post("/api/submit", token, json={"kind": "exec", "exec": {"argv": ["true"]}, "callback_url": url})
            ids[name] = r.json()["id"]
        # meanwhile tasks keep running and ending as usual
        for _ in range(5):
            r = gw.post("/api/submit", token, json={"kind": "exec", "exec": {"argv": ["echo", "on"]}})
            assert gw.get(f"/api/tasks/{r.json()['id']}/result", token, params={"wait": 30}).content == b"on\n"
        for name in ids:
            outcome = _callback_of(gw, token, ids[name], timeout=60)
            assert outcome["outcome"] == "failed" and outcome["attempts"] == 3, (name, outcome)
        assert "1.5" in _callback_of(gw, token, ids["slow"])["error"]  # no answer within the timeout
        assert _callback_of(gw, token, ids["dead"])["status"] == 0
    finally:
        slow.close()
    # a URL the gateway will not call is refused at the submit
    for url in ("ftp://example.com/x", "http://169.254.169.254/latest/meta-data", "not a url"):
        problem(gw.post("/api/submit", token, json={"kind": "exec", "exec": {"argv": ["true"]},
                                                     "callback_url": url}), 400, "bad_request")


def test_a_second_gateway_shares_tokens_and_answers_alike(gw: Gw) -> None:
    """Gateways keep no state of their own: another one on the same fabric knows every token at once."""
    import subprocess
    import sys

    state = read_state(gw.state_dir)
    creds = gw.state_dir / "auth" / "services" / "gateway.creds"
    env = cli_env(FABRIC_GATEWAY_HTTP_PORT="0")
    env.pop("FABRIC_GATEWAY_NATS_MONITOR_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "fabric.services.gateway", "--nats-url", state["nats_url"],
                             "--node", "gw1", "--state-dir", str(gw.state_dir), "--credentials", str(creds)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        urls: list[str] = []

        def second_up() -> bool:
            res = fabric("status", gw.state_dir, "--json")
            found = [s["metadata"].get("url", "") for s in json.loads(res.stdout)["services"]
                     if s["name"] == "gateway" and s["metadata"].get("pid") == str(proc.pid)]
            urls[:] = [u for u in found if u]
            return bool(urls)

        wait_for(second_up, 30, what="the second gateway in $SRV")
        other = httpx.Client(base_url=urls[0], timeout=30)
        try:
            token = gw.token("twice")  # made once, known to both
            wait_for(lambda: other.get("/api/whoami", headers=_auth(token)).status_code == 200,
                     what="the token on the second gateway")
            r = other.post("/api/submit", headers=_auth(token), json={"kind": "exec", "exec": {"argv": ["echo", "2"]}})
            assert r.status_code == 201, r.text
            task_id = r.json()["id"]
            # submitted through one gateway, read through the other
            assert gw.get(f"/api/tasks/{task_id}/result", token, params={"wait": 30}).content == b"2\n"
            assert [d["id"] for d in other.get("/api/devices").json()["devices"]] == ["gw1"]
        finally:
            other.close()
    finally:
        proc.terminate()
        proc.wait(20)


def test_with_tls_the_gateway_serves_https_under_the_fabrics_ca(tmp_path: Path) -> None:
    """``fabric up --tls``: every port of the node is TLS, the gateway's too, with the node's certificate."""
    import ssl

    state_dir = tmp_path / "tls"
    try:
        up = fabric("up", state_dir, "-d", "--nats-port", "0", "--node", "gwtls", "--tls", timeout=90)
        assert up.returncode == 0, up.stdout + up.stderr
        url = read_state(state_dir)["gateway_url"]
        assert url.startswith("https://127.0.0.1:") and f"dashboard {url}/?token=" in up.stdout
        ca = str(state_dir / "pki" / "ca.pem")
        token = (state_dir / "auth" / "operator.token").read_text().strip()
        with httpx.Client(base_url=url, verify=ssl.create_default_context(cafile=ca), timeout=30) as c:
            wait_for(lambda: c.get("/api/whoami", headers=_auth(token)).status_code == 200, what="the token")
            r = c.post("/api/submit", headers=_auth(token), json={"kind": "exec", "exec": {"argv": ["echo", "tls"]}})
            assert r.status_code == 201, r.text
            assert c.get(f"/api/tasks/{r.json()['id']}/result", headers=_auth(token),
                         params={"wait": 30}).content == b"tls\n"
        with pytest.raises(httpx.ConnectError):  # a client that does not trust the fabric's CA
            httpx.get(f"{url}/api/whoami", timeout=10)
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port
            httpx.get(f"http://{url.removeprefix('https://')}/api/whoami", timeout=10)
    finally:
        cleanup(state_dir)

"""The role table (fabric/protocol/permissions.py), the credentials files and users.conf, against a real nats-server.

The unit tests hold the table to its rules; the server tests render it for a node,
have nats-server check it (``-t``) and run it: an anonymous connection is refused, a
client reaches only its own user form and inbox, a service only its own node's
subjects, and a removed user is cut off at the reload.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import stat
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest

from fabric.auth import ADMIN_USER, AuthError, AuthRealm
from fabric.credentials import CredentialsError, new_seed, public_key, read_credentials, write_credentials
from fabric.protocol import permissions as perms
from fabric.protocol.subjects import Mem, cluster, node_scoped
from tests._auth import Server


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` one token, ``>`` the rest (one or more tokens)."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


def allowed(patterns: tuple[str, ...], subject: str) -> bool:
    return any(matches(p, subject) for p in patterns)


# -- the table ---------------------------------------------------------------------------------


@pytest.mark.unit
def test_user_forms_round_trip() -> None:
    s = perms.user_subject("alice", node_scoped("mem", "n1", Mem.READ))
    assert s == "fabric.u.alice.mem.n1.read"
    assert perms.split_user(s) == ("alice", "fabric.mem.n1.read")
    assert perms.split_user("fabric.mem.alloc") == (None, "fabric.mem.alloc")
    assert perms.split_user("fabric.u.alice") == (None, "fabric.u.alice")  # no area: not a user form
    with pytest.raises(ValueError):
        perms.user_subject("alice", "$SRV.PING")
    assert perms.caller_of(s) == "alice" and perms.caller_of("fabric.mem.alloc") is None
    assert perms.subject_for("alice", "fabric.mem.alloc") == "fabric.u.alice.mem.alloc"
    assert perms.subject_for(None, "fabric.mem.alloc") == "fabric.mem.alloc"  # an admin, or no auth
    assert perms.subject_for("alice", "$SRV.PING") == "$SRV.PING"


@pytest.mark.unit
@pytest.mark.parametrize("name,ok", [("alice", True), ("a-b_9", True), ("_svc", False), ("a.b", False),
                                     ("a*", False), ("", False), ("x" * 65, False)])
def test_user_names(name: str, ok: bool) -> None:
    assert perms.valid_user_name(name) is ok


@pytest.mark.unit
def test_client_reaches_only_its_own_forms() -> None:
    p = perms.permissions(perms.CLIENT, user="alice")
    assert p is not None
    assert allowed(p.publish, "fabric.u.alice.mem.alloc")
    assert allowed(p.publish, "fabric.u.alice.task.submit")
    for denied in ("fabric.u.bob.mem.alloc", "fabric.mem.alloc", "fabric.task.pull", "fabric.u.alice",
                   "$KV.fabric_tasks.t1", "$JS.API.STREAM.DELETE.KV_fabric_tasks",
                   "$JS.API.STREAM.PURGE.OBJ_fabric_task_results", "fabric.telemetry.n1"):
        assert not allowed(p.publish, denied), denied
    assert allowed(p.subscribe, "_INBOX.alice.x.y")
    assert allowed(p.subscribe, "fabric.u.alice.task.events")  # its own tasks' events
    assert not allowed(p.subscribe, "fabric.u.bob.task.events")
    for denied in ("_INBOX.bob.x", "_INBOX.>", "fabric.u.*.mem.alloc", "fabric.mem.alloc", "fabric.task.pull",
                   "fabric.task.events", "fabric.proc.n1.out.3", "$SRV.PING"):
        assert not allowed(p.subscribe, denied), denied


@pytest.mark.unit
def test_services_subscribe_only_their_node() -> None:
    alloc = perms.permissions(perms.ALLOCATOR, node="n1")
    assert alloc is not None
    assert allowed(alloc.subscribe, "fabric.mem.n1.read")
    assert allowed(alloc.subscribe, "fabric.u.alice.mem.n1.read")
    assert allowed(alloc.subscribe, "fabric.mem.alloc")
    assert not allowed(alloc.subscribe, "fabric.mem.n2.read")
    assert not allowed(alloc.subscribe, "fabric.u.alice.mem.n2.read")
    assert not allowed(alloc.subscribe, "fabric.proc.spawn")
    assert alloc.publish == ("_INBOX.>",)  # replies, nothing else
    mon = perms.permissions(perms.GPU_MONITOR, node="n1")
    assert mon is not None
    assert allowed(mon.publish, "$KV.fabric_nodes.n1") and not allowed(mon.publish, "$KV.fabric_nodes.n2")
    assert allowed(mon.publish, "fabric.telemetry.n1") and not allowed(mon.publish, "fabric.telemetry.n2")


@pytest.mark.unit
def test_task_pull_is_the_nodes_only() -> None:
    """A result reported on fabric.task.pull is trusted: no user form of it exists, only spawners publish it."""
    sched = perms.permissions(perms.SCHEDULER, node="n1")
    spawner = perms.permissions(perms.SPAWNER, node="n1")
    assert sched is not None and spawner is not None
    assert allowed(sched.subscribe, cluster("task", "pull"))
    assert not allowed(sched.subscribe, "fabric.u.alice.task.pull")
    assert allowed(spawner.publish, cluster("task", "pull"))
    for role in (perms.CLIENT, perms.ALLOCATOR, perms.GPU_MONITOR):
        p = perms.permissions(role, user="alice", node="n1")
        assert p is not None and not allowed(p.publish, "fabric.task.pull"), role


@pytest.mark.unit
def test_no_role_uses_allow_responses() -> None:
    """allow_responses drops a reply after 2 minutes and at every reload: task.wait holds 300 s, users reload."""
    text = perms.render_users([perms.UserEntry("x", r, "U" + "A" * 55, perms.permissions(r, user="x", node="n1"))
                               for r in (*perms.SERVICE_ROLES, perms.CLIENT)])
    assert "allow_responses" not in text


@pytest.mark.unit
def test_unknown_role_and_bad_names_refused() -> None:
    with pytest.raises(ValueError, match="unknown role"):
        perms.permissions("root", user="x", node="n1")
    with pytest.raises(ValueError, match="invalid user name"):
        perms.permissions(perms.CLIENT, user="_x")
    with pytest.raises(ValueError, match="belongs to a node"):
        perms.permissions(perms.SPAWNER)


# -- credentials files -------------------------------------------------------------------------


@pytest.mark.unit
def test_credentials_file_round_trip(tmp_path: Path) -> None:
    seed = new_seed()
    path = write_credentials(tmp_path / "alice.creds", user="alice", role="client", seed=seed,
                             url="nats://10.0.0.5:4222")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    creds = read_credentials(path)
    assert (creds.user, creds.role, creds.seed, creds.url) == ("alice", "client", seed, "nats://10.0.0.5:4222")
    assert creds.nkey == public_key(seed) and creds.nkey.startswith("U")
    # nats.c finds the seed as the first framed block, or as the line starting with SU
    lines = path.read_text().splitlines()
    framed = lines.index("-----BEGIN USER NKEY SEED-----")
    assert lines[framed + 1] == seed and lines[framed + 2].startswith("------END")
    assert [ln for ln in lines if ln.startswith("SU")] == [seed]
    assert creds.connect_options()["inbox_prefix"] == "_INBOX.alice"


@pytest.mark.unit
def test_bad_credentials_files_say_why(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="does not exist"):
        read_credentials(tmp_path / "none.creds")
    (tmp_path / "x.creds").write_text("hello\n")
    with pytest.raises(CredentialsError, match="not a fabric credentials file"):
        read_credentials(tmp_path / "x.creds")
    path = write_credentials(tmp_path / "a.creds", user="a", role="client", seed=new_seed())
    path.write_text(path.read_text().replace(public_key(read_credentials(path).seed), public_key(new_seed())))
    with pytest.raises(CredentialsError, match="does not match its seed"):
        read_credentials(path)
    text = path.read_text().splitlines()
    bad = [ln if not ln.startswith("SU") else "SUAAAA" for ln in text]
    path.write_text("\n".join(bad))
    with pytest.raises(CredentialsError, match="not an nkey"):
        read_credentials(path)


# -- against a real server -----------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path)
    srv.start()
    yield srv
    srv.stop()


class Conn:
    """A connection that records the errors nats-py reports (permission violations arrive there)."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc: nats.NATS | None = None

    async def open(self, url: str, **options: object) -> nats.NATS:
        async def error_cb(exc: Exception) -> None:
            self.errors.append(str(exc))

        self.nc = await nats.connect(url, error_cb=error_cb, max_reconnect_attempts=0, allow_reconnect=False,
                                     connect_timeout=2, **options)
        return self.nc

    async def violations(self, n: int = 1) -> list[str]:
        for _ in range(100):
            found = [e for e in self.errors if "permissions violation" in e]
            if len(found) >= n:
                return found
            await asyncio.sleep(0.02)
        return [e for e in self.errors if "permissions violation" in e]


@pytest.fixture
async def conns() -> AsyncIterator[list[Conn]]:
    opened: list[Conn] = []
    yield opened
    for c in opened:
        if c.nc is not None and not c.nc.is_closed:
            await c.nc.close()


def test_rendered_config_passes_nats_server_check(tmp_path: Path) -> None:
    srv = Server(tmp_path)
    srv.realm.add_user("alice", "client", tmp_path / "alice.creds")
    srv.realm.render()
    check = subprocess.run([srv.binary, "-t", "-c", str(srv.conf)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert stat.S_IMODE(srv.realm.users_conf.stat().st_mode) == 0o600
    assert stat.S_IMODE(srv.state.auth_dir.stat().st_mode) == 0o700
    for role in perms.SERVICE_ROLES:
        assert stat.S_IMODE(srv.realm.service_credentials(role).stat().st_mode) == 0o600
    assert re.findall(r"\bS[A-Z2-7]{57}\b", srv.realm.users_file.read_text()) == []  # public keys only, no seed


async def test_anonymous_and_unknown_keys_are_refused(server: Server, conns: list[Conn]) -> None:
    for options in ({}, {"nkeys_seed_str": new_seed()}):
        c = Conn()
        conns.append(c)
        with pytest.raises(Exception, match="Authorization Violation"):
            await c.open(server.url, **options)


async def test_client_reaches_its_user_form_only(server: Server, conns: list[Conn], tmp_path: Path) -> None:
    alice = server.realm.add_user("alice", "client", tmp_path / "alice.creds")
    server.realm.reload(server.binary, server.conf, server.proc.pid)  # type: ignore[union-attr]
    await asyncio.sleep(0.3)
    svc = Conn()
    conns.append(svc)
    alloc = read_credentials(server.realm.service_credentials(perms.ALLOCATOR))
    snc = await svc.open(server.url, **alloc.connect_options(inbox_prefix=perms.inbox_prefix(
        perms.service_user(perms.ALLOCATOR, "n1"))))

    async def answer(msg: object) -> None:
        await msg.respond(msg.subject.encode())  # type: ignore[attr-defined]

    await snc.subscribe("fabric.u.*.mem.alloc", queue="fabric", cb=answer)
    await snc.flush()
    c = Conn()
    conns.append(c)
    nc = await c.open(server.url, **alice.connect_options())
    reply = await nc.request("fabric.u.alice.mem.alloc", b"{}", timeout=2)
    assert reply.data == b"fabric.u.alice.mem.alloc"  # the service reads the caller from the subject
    with pytest.raises(nats.errors.TimeoutError):  # refused by the server: nats-py only times out
        await nc.request("fabric.u.bob.mem.alloc", b"{}", timeout=0.5)
    await nc.subscribe("_INBOX.bob.>")
    await nc.subscribe("fabric.u.*.mem.alloc")
    found = await c.violations(3)
    assert any('publish to "fabric.u.bob.mem.alloc"' in e for e in found), found
    assert any('subscription to "_inbox.bob.>"' in e for e in found), found
    assert any('subscription to "fabric.u.*.mem.alloc"' in e for e in found), found
    # the service of node n1 cannot take node n2's requests
    await snc.subscribe("fabric.mem.n2.>")
    assert any('subscription to "fabric.mem.n2.>"' in e for e in await svc.violations(1))


async def test_removed_user_is_cut_off_at_reload(server: Server, conns: list[Conn], tmp_path: Path) -> None:
    bob = server.realm.add_user("bob", "client", tmp_path / "bob.creds")
    carol = server.realm.add_user("carol", "client", tmp_path / "carol.creds")
    server.realm.reload(server.binary, server.conf, server.proc.pid)  # type: ignore[union-attr]
    await asyncio.sleep(0.3)
    b, c = Conn(), Conn()
    conns += [b, c]
    bnc = await b.open(server.url, **bob.connect_options())
    cnc = await c.open(server.url, **carol.connect_options())
    server.realm.remove_user("bob")
    server.realm.reload(server.binary, server.conf, server.proc.pid)  # type: ignore[union-attr]
    for _ in range(100):
        if bnc.is_closed:
            break
        await asyncio.sleep(0.05)
    assert bnc.is_closed, "bob's connection outlived his removal"
    assert cnc.is_connected, "carol was disconnected by bob's removal"
    again = Conn()
    conns.append(again)
    with pytest.raises(Exception, match="Authorization Violation"):
        await again.open(server.url, **bob.connect_options())


def test_users_table_refusals(tmp_path: Path) -> None:
    srv = Server(tmp_path)
    srv.realm.add_user("alice", "client", tmp_path / "alice.creds")
    with pytest.raises(AuthError, match="exists"):
        srv.realm.add_user("alice", "client", tmp_path / "again.creds")
    with pytest.raises(AuthError, match="invalid user name"):
        srv.realm.add_user("_x", "client", tmp_path / "x.creds")
    with pytest.raises(AuthError, match="unknown role"):
        srv.realm.add_user("eve", "root", tmp_path / "eve.creds")
    with pytest.raises(AuthError, match="no user"):
        srv.realm.remove_user("nobody")
    with pytest.raises(AuthError, match="cannot be removed"):
        srv.realm.remove_user(ADMIN_USER)
    assert [u.name for u in srv.realm.users()] == [ADMIN_USER, "alice"]


def test_bad_users_conf_is_never_signalled(tmp_path: Path) -> None:
    srv = Server(tmp_path)
    srv.start()
    try:
        # a users.json edited by hand with a key that is not one: the check refuses, the server keeps running
        raw = srv.realm.users_file.read_text().replace(read_credentials(srv.realm.admin_credentials).nkey, "UBAD")
        srv.realm.users_file.write_text(raw)
        with pytest.raises(AuthError, match="refused"):
            srv.realm.reload(srv.binary, srv.conf, srv.proc.pid)  # type: ignore[union-attr]
        assert srv.proc is not None and srv.proc.poll() is None
    finally:
        srv.stop()


def test_state_dir_modes(tmp_path: Path) -> None:
    srv = Server(tmp_path)
    assert stat.S_IMODE(os.stat(srv.conf).st_mode) == 0o600
    assert stat.S_IMODE(srv.realm.admin_credentials.stat().st_mode) == 0o600


def test_fabric_up_with_auth_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fabric up --auth; `fabric user add` a client who allocates, spawns and runs a task in their user form;
    anonymous clients are refused; `fabric user rm` cuts the user off without a restart."""
    import json
    import sys

    from fabric import FabricClient, Unauthenticated

    monkeypatch.delenv("FABRIC_CREDENTIALS", raising=False)  # this process's clients: only what they are given
    env = {k: v for k, v in os.environ.items() if k not in ("FABRIC_CREDENTIALS", "FABRIC_NATS_URL")}
    env["FABRIC_MEM_CAPACITY"] = str(16 << 20)
    state = tmp_path / "fab"

    def fabric(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fabric.cli", *args, "--state-dir", str(state)], env=env,
                              capture_output=True, text=True, timeout=90)

    up = subprocess.run([sys.executable, "-m", "fabric.cli", "up", "-d", "--auth", "--nats-port", "0",
                         "--state-dir", str(state)], env=env, capture_output=True, text=True, timeout=90)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        st = json.loads((state / "state.json").read_text())
        assert st["credentials"] == str(state / "auth" / "admin.creds")
        status = fabric("status")  # the CLI finds the admin credentials in the state dir
        assert status.returncode == 0 and "5/5" in status.stdout, status.stdout + status.stderr
        added = fabric("user", "add", "alice", "-o", str(tmp_path / "alice.creds"))
        assert added.returncode == 0 and "reloaded" in added.stdout, added.stdout + added.stderr
        with FabricClient(st["nats_url"], credentials=tmp_path / "alice.creds", local=False) as fc:
            assert fc._aio.user == "alice"
            buf = fc.rmalloc(64)
            fc.rwrite(buf, b"alice's")
            assert fc.rread(buf, 7) == b"alice's"
            fc.rfree(buf)
            assert fc.rspawn(["echo", "hi"]).wait().stdout == b"hi\n"
            assert fc.submit(sum, [1, 2, 3]).result(timeout=60) == 6
        with pytest.raises(Unauthenticated, match="requires credentials"), \
                FabricClient(st["nats_url"], credentials=None, timeout=5):
            pass
        removed = fabric("user", "rm", "alice")
        assert removed.returncode == 0, removed.stdout + removed.stderr
        with pytest.raises(Unauthenticated, match="refused the credentials of user 'alice'"), \
                FabricClient(st["nats_url"], credentials=tmp_path / "alice.creds", timeout=5):
            pass
        listed = fabric("user", "list", "--json")
        assert [u["name"] for u in json.loads(listed.stdout)] == ["admin"]
    finally:
        down = fabric("down", "--purge")
        assert down.returncode == 0, down.stdout + down.stderr


def test_fabric_up_with_tls_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fabric up --tls: the server presents a certificate of the fabric's own CA; credentials carry the CA, so a
    user's client verifies it; a client without them is told why; a node joins with a token that pins the CA,
    and a token pinning another CA is refused."""
    import json
    import ssl
    import sys

    from fabric import FabricClient, Unauthenticated
    from fabric.auth import parse_token
    from fabric.pki import ca_fingerprint

    monkeypatch.delenv("FABRIC_CREDENTIALS", raising=False)
    env = {k: v for k, v in os.environ.items() if k not in ("FABRIC_CREDENTIALS", "FABRIC_NATS_URL")}
    env["FABRIC_MEM_CAPACITY"] = str(16 << 20)
    a, b = tmp_path / "a", tmp_path / "b"

    def fabric(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fabric.cli", *args, "--state-dir", str(state)], env=env,
                              capture_output=True, text=True, timeout=90)

    up = fabric(a, "up", "-d", "--tls", "--nats-port", "0")
    assert up.returncode == 0 and "tls       on" in up.stdout, up.stdout + up.stderr
    try:
        st = json.loads((a / "state.json").read_text())
        assert st["tls"] is True
        ca = (a / "pki" / "ca.pem").read_text()
        assert stat.S_IMODE((a / "pki" / "ca-key.pem").stat().st_mode) == 0o600
        # the server's certificate chains to the fabric's CA and names 127.0.0.1
        host, port = st["nats_url"].rsplit("/", 1)[1].rsplit(":", 1)
        ctx = ssl.create_default_context(cadata=ca)
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            raw.recv(4096)  # nats-server's INFO comes in plaintext before the handshake
            with ctx.wrap_socket(raw, server_hostname=host) as tls_sock:
                assert tls_sock.version() in ("TLSv1.2", "TLSv1.3")
        added = fabric(a, "user", "add", "dana", "-o", str(tmp_path / "dana.creds"))
        assert added.returncode == 0, added.stdout + added.stderr
        assert "BEGIN CERTIFICATE" in (tmp_path / "dana.creds").read_text()
        with FabricClient(st["nats_url"], credentials=tmp_path / "dana.creds", local=False) as fc:
            buf = fc.rmalloc(16)
            fc.rwrite(buf, b"over tls")
            assert fc.rread(buf, 8) == b"over tls"
            fc.rfree(buf)
            assert fc.submit(pow, 2, 5).result(timeout=60) == 32
        with pytest.raises(Unauthenticated, match="does not trust"), FabricClient(st["nats_url"], timeout=5):
            pass
        token = fabric(a, "join-token").stdout.strip()
        assert parse_token(token)[1] == ca_fingerprint(ca)
        forged = token.rsplit(".", 1)[0] + "." + "0" * 64
        refused = fabric(b, "up", "-d", "--nats-url", st["nats_url"], "--node", "b", "--services", "allocator",
                         "--token", forged)
        assert refused.returncode == 1 and "does not pin" in refused.stderr, refused.stderr
        joined = fabric(b, "up", "-d", "--nats-url", st["nats_url"], "--node", "b", "--services", "allocator",
                        "--token", token)
        assert joined.returncode == 0, joined.stdout + joined.stderr
        status = fabric(b, "status")
        assert status.returncode == 0 and "6/6 on 2 nodes" in status.stdout, status.stdout + status.stderr
    finally:
        for state in (b, a):
            if (state / "state.json").exists():
                fabric(state, "down", "--purge")


async def test_an_expired_user_is_cut_off(server: Server, conns: list[Conn], tmp_path: Path) -> None:
    """fabric user add --ttl: past it the user is not rendered any more, the supervisor's expiry drops it from the
    table, and the reload closes its connection; a user without a TTL stays."""
    temp = server.realm.add_user("temp", "client", tmp_path / "temp.creds", ttl_s=1.0)
    stays = server.realm.add_user("stays", "client", tmp_path / "stays.creds")
    assert server.proc is not None
    server.realm.reload(server.binary, server.conf, server.proc.pid)
    await asyncio.sleep(0.3)
    t, s = Conn(), Conn()
    conns += [t, s]
    tnc = await t.open(server.url, **temp.connect_options())
    snc = await s.open(server.url, **stays.connect_options())
    await asyncio.sleep(1.2)
    assert [u.name for u in server.realm.users() if u.expired()] == ["temp"]
    assert "temp" not in [e.name for e in server.realm.entries()]  # not let in, even before it is dropped
    assert server.realm.expire() == ["temp"] and server.realm.expire() == []
    server.realm.reload(server.binary, server.conf, server.proc.pid)
    for _ in range(100):
        if tnc.is_closed:
            break
        await asyncio.sleep(0.05)
    assert tnc.is_closed and snc.is_connected
    with pytest.raises(AuthError, match="positive"):
        server.realm.add_user("never", "client", tmp_path / "never.creds", ttl_s=0)


def test_users_table_changes_never_lose_each_other(tmp_path: Path) -> None:
    """Changes from several processes at once (users added in shells, a node joining through the supervisor)
    are serialized by the table's lock; and a users.json that was lost gets its admin back at the next start."""
    from concurrent.futures import ThreadPoolExecutor

    srv = Server(tmp_path)
    names = [f"u{i}" for i in range(12)]
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda n: AuthRealm(srv.state, "n1").add_user(n, "client", tmp_path / f"{n}.creds"), names))
    assert sorted(u.name for u in srv.realm.users()) == sorted([ADMIN_USER, *names])
    admin_key = read_credentials(srv.realm.admin_credentials).nkey
    srv.realm.users_file.unlink()
    srv.realm.ensure()
    assert [(u.name, u.nkey) for u in srv.realm.users()] == [(ADMIN_USER, admin_key)]


@pytest.mark.unit
def test_the_shared_users_table_is_the_admins_only() -> None:
    """The cluster's users bucket (fabric/users_sync.py) holds every public key and node: only admins reach it."""
    subjects = ("$KV.fabric_users.user.alice", "$JS.API.STREAM.INFO.KV_fabric_users",
                "$JS.API.DIRECT.GET.KV_fabric_users", "$JS.API.CONSUMER.CREATE.KV_fabric_users")
    for role in (*perms.SERVICE_ROLES, perms.CLIENT, perms.JOINER):
        p = perms.permissions(role, node="n1", user="alice")
        assert p is not None, role
        for subject in subjects:
            assert not allowed(p.publish, subject), (role, subject)

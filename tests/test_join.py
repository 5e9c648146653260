"""Joining a fabric with auth on (fabric/join.py): the token, the request, what the fabric grants.

Against a real nats-server configured as `fabric up` configures it, with the join
responder the supervisor runs; the end-to-end join of a second `fabric up` is in
tests/test_cli.py (test_status_with_a_second_node_joined).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest

from fabric.auth import AuthError, AuthRealm, make_token, token_seed
from fabric.credentials import new_seed, public_key, read_credentials
from fabric.errors import BadRequest, Conflict, Unauthenticated
from fabric.join import AuthKeeper, request_join
from fabric.protocol import permissions as perms
from fabric.state import StateDir
from tests._auth import Server


def keys() -> dict[str, str]:
    return {role: public_key(new_seed()) for role in perms.SERVICE_ROLES}


@pytest.mark.unit
def test_add_node_refusals_and_idempotence(tmp_path: Path) -> None:
    realm = AuthRealm(StateDir(tmp_path), "n1")
    realm.ensure()
    svc, admin = keys(), public_key(new_seed())
    assert realm.add_node("n2", svc, admin) is True
    assert realm.add_node("n2", svc, admin) is False  # a restarted node: the same keys again
    with pytest.raises(AuthError, match="already joined from another machine"):
        realm.add_node("n2", keys(), admin)
    with pytest.raises(AuthError, match="this node's"):
        realm.add_node("n1", svc, admin)
    with pytest.raises(AuthError, match="invalid node name"):
        realm.add_node("bad node", svc, admin)
    with pytest.raises(AuthError, match="a key for each service role"):
        realm.add_node("n3", {"allocator": admin}, admin)
    with pytest.raises(AuthError, match="not an nkey user public key"):
        realm.add_node("n3", {**svc, "spawner": "SUAAAA"}, admin)
    assert [r.node for r in realm.nodes()] == ["n2"]
    assert re.findall(r"\bS[A-Z2-7]{57}\b", realm.users_file.read_text()) == []  # public keys only, no seed


@pytest.mark.unit
def test_tokens(tmp_path: Path) -> None:
    realm = AuthRealm(StateDir(tmp_path), "n1")
    realm.ensure()
    token = realm.join_token()
    assert token == realm.join_token() and token.startswith("fabric1.SU")
    assert token_seed(token) == read_credentials(realm.join_credentials).seed
    rotated = realm.join_token(rotate=True)
    assert rotated != token
    for bad in ("", "fabric1.", "fabric1.SUAAAA", "SUAAAA", "fabric2." + new_seed()):
        with pytest.raises(AuthError, match="not a fabric join token"):
            token_seed(bad)
    assert make_token(new_seed()).startswith("fabric1.")


class Fabric:
    """A server with auth and the supervisor's join responder, as `fabric up` runs them."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.logs: list[tuple[str, str, dict[str, Any]]] = []
        self.nc: Any = None

    async def start(self) -> None:
        self.nc = await nats.connect(self.server.url,
                                     **read_credentials(self.server.realm.admin_credentials).connect_options())
        responder = AuthKeeper(self.server.realm, self.server.binary, self.server.conf,
                                  lambda: self.server.proc.pid if self.server.proc else None,
                                  lambda level, event, **kw: self.logs.append((level, event, kw)))
        await responder.start(self.nc)


@pytest.fixture
async def fab(tmp_path: Path) -> AsyncIterator[Fabric]:
    server = Server(tmp_path / "a")
    server.realm.join_token()
    server.realm.render()
    server.start()
    f = Fabric(server)
    await f.start()
    yield f
    await f.nc.close()
    server.stop()


def joining(tmp_path: Path, node: str) -> AuthRealm:
    realm = AuthRealm(StateDir(tmp_path / node), node)
    realm.ensure()
    return realm


async def test_a_node_joins_and_its_services_reach_only_their_own_subjects(fab: Fabric, tmp_path: Path) -> None:
    b = joining(tmp_path, "b")
    reply = await request_join(fab.server.url, fab.server.realm.join_token(), b)
    assert (reply.node, reply.new) == ("b", True)
    assert [r.node for r in fab.server.realm.nodes()] == ["b"]
    # b's allocator connects with its own key (the reload let it in) and may take b's requests, not n1's
    errors: list[str] = []

    async def error_cb(exc: Exception) -> None:
        errors.append(str(exc))

    alloc = read_credentials(b.service_credentials(perms.ALLOCATOR))
    # the reply comes once the server was told to reload (SIGHUP), which it applies a moment later: a service
    # of the new node retries its first connect as the kit's services do (they reconnect forever)
    for _ in range(100):
        try:
            nc = await nats.connect(fab.server.url, error_cb=error_cb, max_reconnect_attempts=0,
                                    allow_reconnect=False, **alloc.connect_options(
                                        perms.inbox_prefix(perms.service_user(perms.ALLOCATOR, "b"))))
            break
        except Exception as exc:
            assert "Authorization Violation" in str(exc), exc
            errors.clear()
            await asyncio.sleep(0.05)
    else:
        pytest.fail("the joined node's key was never let in")
    try:
        await nc.subscribe("fabric.mem.b.>")
        await nc.subscribe("fabric.mem.n1.>")
        await nc.flush()
        for _ in range(100):
            if errors:
                break
            await asyncio.sleep(0.02)
        assert errors == ['nats: permissions violation for subscription to "fabric.mem.n1.>"'], errors
    finally:
        await nc.close()
    # b's operator is an admin (its supervisor's probe, its CLI)
    adm = await nats.connect(fab.server.url, **read_credentials(b.admin_credentials).connect_options())
    await adm.close()
    # joining again with the same keys (a restart) is granted, and changes nothing
    again = await request_join(fab.server.url, fab.server.realm.join_token(), b)
    assert again.new is False


async def test_refusals_say_why_and_grant_nothing(fab: Fabric, tmp_path: Path) -> None:
    token = fab.server.realm.join_token()
    with pytest.raises(Unauthenticated, match="does not know this join token"):
        await request_join(fab.server.url, make_token(new_seed()), joining(tmp_path, "x"))
    with pytest.raises(BadRequest, match="not a fabric join token"):
        await request_join(fab.server.url, "hello", joining(tmp_path, "y"))
    with pytest.raises(Conflict, match="this node's"):
        await request_join(fab.server.url, token, joining(tmp_path, "n1"))
    await request_join(fab.server.url, token, joining(tmp_path, "c"))
    with pytest.raises(Conflict, match="already joined from another machine"):
        await request_join(fab.server.url, token, joining(tmp_path / "other-machine", "c"))
    assert [r.node for r in fab.server.realm.nodes()] == ["c"]
    assert any(event == "join refused" for _, event, _ in fab.logs)


async def test_a_rotated_token_stops_working(fab: Fabric, tmp_path: Path) -> None:
    old = fab.server.realm.join_token()
    new = fab.server.realm.join_token(rotate=True)
    assert fab.server.proc is not None
    fab.server.realm.reload(fab.server.binary, fab.server.conf, fab.server.proc.pid)
    await asyncio.sleep(0.3)
    with pytest.raises(Unauthenticated):
        await request_join(fab.server.url, old, joining(tmp_path, "d"))
    assert (await request_join(fab.server.url, new, joining(tmp_path, "d"))).new is True


async def test_the_token_can_do_nothing_but_ask(fab: Fabric) -> None:
    """The joiner's identity may publish fabric.join.request and read its replies: no request, no subscription."""
    errors: list[str] = []

    async def error_cb(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(fab.server.url, nkeys_seed_str=token_seed(fab.server.realm.join_token()),
                            inbox_prefix=perms.inbox_prefix(perms.JOINER_USER), error_cb=error_cb)
    try:
        await nc.publish("fabric.mem.alloc", b"{}")
        await nc.publish("fabric.u.x.mem.alloc", b"{}")
        await nc.subscribe("fabric.join.request")
        await nc.subscribe("_INBOX.admin.>")
        await nc.flush()
        for _ in range(100):
            if len(errors) >= 4:
                break
            await asyncio.sleep(0.02)
    finally:
        await nc.close()
    assert len([e for e in errors if "permissions violation" in e]) == 4, errors


@pytest.mark.unit
def test_a_clusters_shared_table_keeps_each_node_its_own(tmp_path: Path) -> None:
    """B adopts A's shared table (fabric/users_sync.py): A's services and the people, B's own admin and keys."""
    from fabric.users_sync import keys_of, table_of

    a = AuthRealm(StateDir(tmp_path / "a"), "a")
    a.ensure()
    b = joining(tmp_path, "b")
    b_admin = read_credentials(b.admin_credentials).nkey
    svc_b = {role: read_credentials(b.service_credentials(role)).nkey for role in perms.SERVICE_ROLES}
    a.add_node("b", svc_b, b_admin, route="127.0.0.1:7001")
    a.add_self("127.0.0.1:7000")
    a.add_user("alice", "client", tmp_path / "alice.creds")
    shared = a.shared()
    assert "admin" not in shared["users"] and set(shared["nodes"]) == {"a", "b"}
    assert table_of(keys_of(shared)) == shared  # the bucket's keys carry the table both ways
    assert b.adopt(shared) is True and b.adopt(shared) is False  # a second time changes nothing
    assert {u.name for u in b.users()} == {"admin", "alice"}
    assert read_credentials(b.admin_credentials).nkey in {u.nkey for u in b.users() if u.name == "admin"}
    entries = list(b.entries())
    keys = [e.nkey for e in entries]
    assert len(keys) == len(set(keys))  # each key once: nats-server refuses a duplicate
    # B's own service keys carry B's roles (from its files), A's keep A's
    assert {e.name for e in entries if e.nkey in svc_b.values()} == {
        perms.service_user(r, "b") for r in perms.SERVICE_ROLES}
    a_alloc = read_credentials(a.service_credentials(perms.ALLOCATOR)).nkey
    assert [e.name for e in entries if e.nkey == a_alloc] == [perms.service_user(perms.ALLOCATOR, "a")]
    # a removal reaches B the same way
    a.remove_user("alice")
    assert b.adopt(a.shared()) is True and {u.name for u in b.users()} == {"admin"}


async def test_a_route_join_needs_a_fabric_that_runs_its_own_nats(fab: Fabric, tmp_path: Path) -> None:
    """A join with a route (`fabric up --join`) is refused with 400 where the answering side cannot cluster."""
    with pytest.raises(BadRequest, match="cannot route"):
        await request_join(fab.server.url, fab.server.realm.join_token(), joining(tmp_path, "r"),
                           route="127.0.0.1:7001")


@pytest.mark.unit
def test_a_joining_nodes_certificate_is_signed_from_its_request(tmp_path: Path) -> None:
    """TLS clusters: the joining node keeps its key; the first node's CA signs its request (fabric/pki.py)."""
    from cryptography import x509

    from fabric.pki import Pki

    ca = Pki(tmp_path / "a")
    ca.ensure("a", ["127.0.0.1"])
    joiner = Pki(tmp_path / "b")
    csr = joiner.request("b", ["10.1.2.3", "b.example"])
    cert_pem = ca.sign_csr("b", csr)
    joiner.install(cert_pem, ca.ca_pem())
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    issuer = x509.load_pem_x509_certificate(ca.ca.read_bytes())
    cert.verify_directly_issued_by(issuer)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "b.example" in san.get_values_for_type(x509.DNSName)
    assert "10.1.2.3" in {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    assert not (tmp_path / "b" / "ca-key.pem").exists()  # the CA key stays with the first node
    for bad in ("", "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"):
        with pytest.raises(ValueError, match="certificate signing request"):
            ca.sign_csr("b", bad)

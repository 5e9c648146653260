"""The data plane between two network namespaces: a whole fabric on the far side of a veth pair.

``fabric up --host <inner ip>`` runs inside a namespace of its own (tests/_netns.py); this
process stays outside and is the remote client, as a client on another machine would be:
no loopback, no shared-memory fast path (``local=False``).

* Reachable: the allocator advertises its data plane at the inner address (in
  ``fabric.mem.<node>.info``, ``$SRV.INFO`` and the ticket), and the bytes of 1 KiB, 1 MiB and 20 MiB
  values and of a batch travel over that TCP connection, not NATS -- the kernel's own
  byte counters of the client's data plane socket (``TCP_INFO``) say so.
* Unreachable: the same fabric with its data plane on the namespace's loopback
  (``FABRIC_MEM_DATA_HOST=127.0.0.1``), which no one outside can reach while NATS can:
  every call still succeeds, over NATS, and the client logs one warning for the node,
  however many calls it makes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from fabric import FabricClient
from fabric.client.dataplane import split_addr
from tests._cli import cli_env
from tests._netns import Veth, in_netns, veth_pair
from tests._spawner import processes_using

pytestmark = pytest.mark.slow

KIB, MIB = 1 << 10, 1 << 20
SIZES = (KIB, MIB, 20 * MIB)


@pytest.fixture(scope="module")
def veth() -> Iterator[Veth]:
    with veth_pair() as pair:
        yield pair


@pytest.fixture(autouse=True)
def default_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client's data plane as it is by default (on), whatever this shell's $FABRIC_MEM_DATA_PLANE says."""
    monkeypatch.delenv("FABRIC_MEM_DATA_PLANE", raising=False)


@contextmanager
def fabric_in(veth: Veth, state_dir: Path, **env: str) -> Iterator[dict[str, Any]]:
    """``fabric up`` inside the namespace, NATS on its veth address; ``fabric down --purge`` there on exit."""
    # room for the 20 MiB value and the batch beside it; no data-plane switch inherited from this shell
    environ = cli_env(FABRIC_MEM_CAPACITY=str(64 * MIB), **env)
    environ.pop("FABRIC_MEM_DATA_PLANE", None)
    fabric = [sys.executable, "-m", "fabric.cli"]
    try:
        up = subprocess.run(in_netns(veth.ns, *fabric, "up", "-d", "--host", veth.inner_ip, "--nats-port", "0",
                                     "--state-dir", str(state_dir)),
                            env=environ, capture_output=True, text=True, timeout=60)
        assert up.returncode == 0, up.stdout + up.stderr
        yield json.loads((state_dir / "state.json").read_text())
    finally:
        down = subprocess.run(in_netns(veth.ns, *fabric, "down", "--purge", "--grace", "5",
                                       "--state-dir", str(state_dir)),
                              env=environ, capture_output=True, text=True, timeout=60)
        left = processes_using(state_dir)
        for proc in left:  # what a failed down left behind: ours, by pid
            proc.kill()
        assert down.returncode == 0, down.stdout + down.stderr
        assert left == [], f"fabric down left {left} running"


def tcp_bytes(sock: socket.socket) -> tuple[int, int]:
    """The kernel's count of bytes this socket sent (acknowledged by the peer) and received.

    ``struct tcp_info`` (linux/tcp.h, append-only): ``tcpi_bytes_acked`` and
    ``tcpi_bytes_received`` are the u64s at offsets 120 and 128 (Linux 4.1+).
    """
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    assert len(info) >= 136, f"TCP_INFO of {len(info)} bytes: a kernel without tcpi_bytes_received"
    acked, received = struct.unpack_from("=QQ", info, 120)
    return acked, received


def exercise(fc: FabricClient) -> tuple[int, int]:
    """Write and read back each of SIZES and a batch, byte for byte; the bytes written and read."""
    written = read = 0
    for size in SIZES:
        data = os.urandom(size)
        with fc.rmalloc(size) as buf:
            assert fc.rwrite(buf, data) == size
            assert fc.rread(buf, size) == data
            assert fc.rread(buf, 1000, offset=size - 1000) == data[-1000:]
        written += size
        read += size + 1000
    bufs = [fc.rmalloc(4 * KIB) for _ in range(50)]
    try:
        values = [os.urandom(4 * KIB) for _ in bufs]
        assert fc.rwritev([(b, 0, v) for b, v in zip(bufs, values, strict=True)]) == [4 * KIB] * len(bufs)
        assert fc.rreadv([(b, 0, 4 * KIB) for b in bufs]) == values
        assert fc.rreadv([(b, 100, 10) for b in bufs]) == [v[100:110] for v in values]
    finally:
        for b in bufs:
            b.free()
    written += 50 * 4 * KIB
    read += 50 * (4 * KIB + 10)
    return written, read


def test_bytes_cross_the_veth_on_the_data_plane(veth: Veth, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fabric.client")
    with fabric_in(veth, tmp_path / "state") as st:
        assert st["nats_url"].startswith(f"nats://{veth.inner_ip}:")
        node = st["node"]
        with FabricClient(st["nats_url"], local=False, credentials=st["credentials"]) as fc:
            advertised = fc.meminfo(node).data_addr
            assert split_addr(advertised)[0] == veth.inner_ip, advertised
            service_info = json.loads(fc.request("$SRV.INFO.allocator").data)
            assert service_info["metadata"]["data_addr"] == advertised

            written, read = exercise(fc)

            assert fc._dp is not None, "the data plane is off in a default client"
            conns = fc._dp._idle.get(node, [])
            assert conns, "no data plane connection to the node: the bytes went over NATS"
            assert {c.addr for c in conns} == {advertised}  # the ticket's address is the info's
            sent = got = 0
            for conn in conns:
                assert conn.sock.getpeername()[0] == veth.inner_ip
                assert conn.sock.getsockname()[0] == veth.outer_ip  # through the veth, not some other route
                acked, received = tcp_bytes(conn.sock)
                sent, got = sent + acked, got + received
            assert sent >= written and got >= read, (sent, written, got, read)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_unreachable_data_plane_falls_back_to_nats_with_one_warning(veth: Veth, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fabric.client")
    # the data plane on the namespace's loopback: NATS (on the veth) is reachable from here, the data port is not
    with fabric_in(veth, tmp_path / "state", FABRIC_MEM_DATA_HOST="127.0.0.1") as st:
        node = st["node"]
        with FabricClient(st["nats_url"], local=False, credentials=st["credentials"]) as fc:
            assert split_addr(fc.meminfo(node).data_addr)[0] == "127.0.0.1"
            with fc.rmalloc(KIB) as small:
                for i in range(20):
                    value = bytes([i]) * KIB
                    fc.rwrite(small, value)
                    assert fc.rread(small) == value
            exercise(fc)
            assert fc._dp is not None and fc._dp._idle.get(node, []) == []
    warnings = [r for r in caplog.records if r.name == "fabric.client" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert f"data plane of node {node}" in message and "127.0.0.1" in message and "NATS" in message

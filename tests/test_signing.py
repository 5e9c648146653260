"""Signed code (fabric/signing.py): keys, what is signed, and a fabric that runs only signed code.

The fabric runs in this process on a real, secured nats-server with
``sandbox.require_signed`` and one trusted key.  A client with that key gets its Python
tasks, maps, core libraries and native executables run; a client without a key, or with
another one, is refused 403 for each, and the built-in Python core (unsigned pickles) is
refused to users.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fabric import AsyncFabricClient, PermissionDenied
from fabric.config import FabricConfig, SandboxConfig
from fabric.signing import create_keys, file_message, load_key, map_message, python_message, verify
from tests._cores import TEST_CORES, build_core
from tests._nats import NatsServer
from tests._tasks import one_node_fabric


@pytest.mark.unit
def test_keys_sign_and_verify(tmp_path: Path) -> None:
    key_path, public = create_keys(tmp_path)
    assert (key_path.stat().st_mode & 0o777) == 0o600 and (tmp_path / "signing.pub").read_text().strip() == public
    key = load_key(key_path)
    assert key.public == public
    msg = file_message(hashlib.sha256(b"binary").hexdigest())
    sig = key.sign(msg)
    assert verify([public], msg, sig)
    assert not verify([public], file_message(hashlib.sha256(b"other").hexdigest()), sig)  # another file
    _, stranger = create_keys(tmp_path, "stranger")
    assert not verify([stranger], msg, sig)  # an untrusted key's
    assert not verify([public], msg, "not base64!")
    # what is signed says what it is: a file's signature is not a python payload's
    assert python_message(b"x") != file_message(hashlib.sha256(b"x").hexdigest())
    assert map_message(b"fn", [b"a", b"b"]) != map_message(b"fn", [b"b", b"a"])  # each call, in order


@pytest.mark.unit
def test_the_cli_signs_a_file_for_the_request(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin"}
    made = subprocess.run([sys.executable, "-m", "fabric.cli", "keys", "create", "-o", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=60)
    assert made.returncode == 0, made.stderr
    public = made.stdout.strip()
    target = tmp_path / "prog"
    target.write_bytes(b"\x7fELF pretend")
    signed = subprocess.run([sys.executable, "-m", "fabric.cli", "sign", str(target), "--key",
                             str(tmp_path / "signing.key")], capture_output=True, text=True, env=env, timeout=60)
    assert signed.returncode == 0, signed.stderr
    assert verify([public], file_message(hashlib.sha256(target.read_bytes()).hexdigest()), signed.stdout.strip())
    missing = subprocess.run([sys.executable, "-m", "fabric.cli", "sign", str(target)], capture_output=True,
                             text=True, env=env, timeout=60)
    assert missing.returncode == 1 and "no key" in missing.stderr


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("keys")
    trusted, _ = create_keys(root, "trusted")
    stranger, _ = create_keys(root, "stranger")
    return trusted, stranger


@pytest.fixture(scope="module")
async def signed_fabric(js_server: NatsServer, keys: tuple[Path, Path],
                        tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[str, str]]:
    config = FabricConfig(sandbox=SandboxConfig(require_signed=True, trusted_keys=[load_key(keys[0]).public]))
    async with one_node_fabric(js_server.url, tmp_path_factory.mktemp("signed"), prefix="signed",
                               config=config) as node:
        yield js_server.url, node


def square(x: int) -> int:
    return x * x


async def test_python_tasks_and_maps_run_only_signed(signed_fabric: tuple[str, str], keys: tuple[Path, Path]
                                                     ) -> None:
    url, _ = signed_fabric
    async with AsyncFabricClient(url, signing_key=keys[0]) as fc:
        assert await (await fc.submit(square, 7)) == 49
        assert [await f for f in await fc.map(square, [1, 2, 3])] == [1, 4, 9]
    for key in (None, keys[1]):
        async with AsyncFabricClient(url, signing_key=key) as fc:
            with pytest.raises(PermissionDenied, match="not signed" if key is None else "not by a trusted key"):
                await (await fc.submit(square, 3))
            futs = await fc.map(square, [1, 2])
            with pytest.raises(PermissionDenied):
                await futs[0]


async def test_cores_and_native_executables_run_only_signed(signed_fabric: tuple[str, str],
                                                            keys: tuple[Path, Path], tmp_path: Path) -> None:
    url, node = signed_fabric
    so = build_core(TEST_CORES / "echo.c", tmp_path)
    true = Path("/bin/true").read_bytes()
    async with AsyncFabricClient(url, local=False, signing_key=keys[0]) as fc:
        core = await fc.load_core("echo", so, node=node)
        assert await core.run(b"signed") == b"signed"
        await core.unload()
        ex = await (await fc.rspawn(["true"], node=node, executable=true)).wait()
        assert ex.exit_code == 0
    for key in (None, keys[1]):
        async with AsyncFabricClient(url, local=False, signing_key=key) as fc:
            with pytest.raises(PermissionDenied, match="core 'echo'"):
                await fc.load_core("echo", so, node=node)
            with pytest.raises(PermissionDenied, match="native executable"):
                await fc.rspawn(["true"], node=node, executable=true)
            with pytest.raises(PermissionDenied, match="takes unsigned Python"):
                await fc.load_python_core(node=node)


async def test_a_udcs_native_exec_body_is_signed_in_its_own_field(signed_fabric: tuple[str, str],
                                                                   keys: tuple[Path, Path]) -> None:
    """UDCS's NATIVE_EXEC body carries the binary itself: its signature is the file's (``fabric sign``), in the
    body's ``signature`` field; without it the submit is refused at once."""
    import base64
    import json

    from fabric.protocol.subjects import Task, cluster

    url, _ = signed_fabric
    binary = Path("/bin/true").read_bytes()
    body = {"type": "NATIVE_EXEC", "binary": base64.b64encode(binary).decode(), "args": []}
    async with AsyncFabricClient(url) as fc:
        with pytest.raises(PermissionDenied, match="native executable"):
            await fc.request(cluster("task", Task.SUBMIT), json.dumps(body).encode())
        body["signature"] = load_key(keys[0]).sign(file_message(hashlib.sha256(binary).hexdigest()))
        reply = json.loads((await fc.request(cluster("task", Task.SUBMIT), json.dumps(body).encode())).data)
        rec = json.loads((await fc.request(cluster("task", Task.WAIT), json.dumps(
            {"id": reply["id"], "timeout_s": 30}).encode(), timeout=40)).data)
        assert rec["state"] == "succeeded" and rec["exit_code"] == 0, rec

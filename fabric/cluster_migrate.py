"""Carrying a standalone node's JetStream into the cluster it starts when the first node joins.

A clustered nats-server does not adopt the streams of a standalone store: it deletes them
as orphans (nats-server#5467).  So the supervisor sets the store aside before the server
restarts clustered (:func:`set_aside`), and once the cluster's JetStream answers,
:func:`migrate` starts a private standalone server on the old store (loopback, a random
port and token, no other user) and copies every file-backed stream across: its
configuration (with the replicas the cluster can hold) and its messages, each subject's
in order, with their headers (message ids, KV operations, roll-ups).  Memory-backed
streams (the scheduler lease, the node registry) are rebuilt by their services and not
copied, nor is the scheduler's map checkpoint (it names body-stream sequences, which the
copy renumbers: without it every map body is read back).

A copy that stops half-way (the supervisor killed) is done again at the next start: the
store stays aside until a copy has finished; KV keys and deduplicated bodies make a
second copy harmless.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from .nats_server import MAX_PAYLOAD, free_port
from .protocol.streams import LEASE_BUCKET, LEASE_KEY, STATE_BUCKET, kv_stream

__all__ = ["ASIDE", "set_aside", "pending", "migrate", "copy_when_ready"]

#: where the standalone store waits for its copy (beside ``jetstream``)
ASIDE = "jetstream.standalone"

#: headers that are instructions to the server about one publish, not part of the message
_DROP_HEADERS = ("Nats-Expected-", "Nats-TTL")
#: messages read, then written, at once
COPY_WINDOW = 128
#: the scheduler lease's value while a clustering node copies (no scheduler instance)
_MIGRATING = b'{"instance": "", "node": "", "holder": "fabric clustering: copying the standalone JetStream"}'
#: not copied: the map checkpoint names sequences of the body stream, which the copy renumbers; without it the
#: next active scheduler reads every map body back (docs/state.md), which is always right
_NOT_COPIED = (kv_stream(STATE_BUCKET),)


def set_aside(nats_dir: Path) -> bool:
    """Move ``nats/jetstream`` to ``nats/jetstream.standalone`` (if there is one and none is there yet)."""
    store, aside = nats_dir / "jetstream", nats_dir / ASIDE
    if aside.exists() or not store.is_dir():
        return False
    store.rename(aside)
    store.mkdir(mode=0o700)
    return True


def pending(nats_dir: Path) -> bool:
    return (nats_dir / ASIDE).is_dir()


async def copy_when_ready(url: str, options: dict[str, Any], nats_dir: Path, binary: str, log: Any) -> None:
    """Once the cluster's JetStream answers at *url* (the joining node's server is up), :func:`migrate` into it.

    *options*: ``nats.connect`` keywords (the node's admin credentials).  Logged, never raised: a copy that fails
    is done again at the next start (the store stays aside).
    """
    import nats

    if not pending(nats_dir):
        return
    nc = None
    while nc is None:  # the server was just started: it takes a moment to listen
        try:
            nc = await nats.connect(url, allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=0.25,
                                    connect_timeout=2, **options)
        except Exception:
            await asyncio.sleep(0.25)
    try:
        js = nc.jetstream(timeout=5)
        waited = time.monotonic()
        while True:
            try:
                await js.account_info()
                break
            except Exception as exc:
                if time.monotonic() - waited > 10:
                    log("info", "clustering: waiting for the cluster's JetStream (the joining node's nats-server)",
                        error=str(exc) or type(exc).__name__)
                    waited = time.monotonic()
                await asyncio.sleep(0.5)
        # no scheduler may serve while the records are copied: it would read them only at its term's start
        holding = asyncio.create_task(_hold_lease(js))
        try:
            # 1 replica: the cluster has two servers now; the supervisors raise them at three (fabric.cluster)
            copied = await migrate(nats_dir, binary, js, 1, log)
        finally:
            holding.cancel()
            await asyncio.gather(holding, return_exceptions=True)
            try:  # free: the first scheduler to see it gone takes it and reads every record, the copies too
                await (await js.key_value(LEASE_BUCKET)).delete(LEASE_KEY)
            except Exception as exc:
                log("debug", "clustering: the lease was not released (it lapses by itself)", error=str(exc))
        log("info", "clustering: JetStream carried into the cluster", streams=copied)
    except Exception:
        log("exception", "clustering: the copy of the standalone JetStream failed; it is tried again at the next "
            "start")
    finally:
        await nc.close()


async def _hold_lease(js: Any) -> None:
    """Hold the scheduler lease (services/scheduler/lease.py) until cancelled, overwriting it: a scheduler that took
    it meanwhile (the joining node's) loses its next renewal and stands by."""
    while True:
        try:
            await (await js.key_value(LEASE_BUCKET)).put(LEASE_KEY, _MIGRATING)
        except Exception:  # the bucket is not made yet (then no scheduler serves either)
            pass
        await asyncio.sleep(0.25)


async def migrate(nats_dir: Path, binary: str, dest: Any, replicas: int, log: Any) -> dict[str, int]:
    """Copy the set-aside store's file-backed streams into *dest* (a JetStream context); messages per stream.

    The store is removed once every stream is across.
    """
    import nats

    aside = nats_dir / ASIDE
    token = secrets.token_urlsafe(18)
    port = free_port("127.0.0.1")
    conf = nats_dir / "migrate.conf"
    conf.write_text("\n".join([
        "# a private standalone server over the store set aside by clustering (fabric/cluster_migrate.py)",
        'host: "127.0.0.1"', f"port: {port}", f"max_payload: {MAX_PAYLOAD}",
        f"authorization {{ token: {json.dumps(token)} }}",
        f"jetstream {{ store_dir: {json.dumps(str(aside))} }}", ""]))
    conf.chmod(0o600)
    log_path = nats_dir.parent / "logs" / "nats-migrate.log"
    with open(log_path, "ab") as out:
        proc = subprocess.Popen([binary, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    copied: dict[str, int] = {}
    try:
        src = None
        deadline = time.monotonic() + 15.0
        while src is None:
            try:
                src = await nats.connect(f"nats://127.0.0.1:{port}", token=token, connect_timeout=1,
                                         allow_reconnect=False, max_reconnect_attempts=0)
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"the store set aside at {aside} cannot be opened (see {log_path})") from None
                await asyncio.sleep(0.1)
        try:
            sjs = src.jetstream(timeout=10)
            for info in await sjs.streams_info():
                cfg = info.config
                if str(getattr(cfg.storage, "value", cfg.storage)) == "memory" or cfg.name in _NOT_COPIED:
                    continue
                copied[str(cfg.name)] = await _copy(sjs, dest, info, replicas, log)
        finally:
            await src.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        conf.unlink(missing_ok=True)
    shutil.rmtree(aside, ignore_errors=True)
    return copied


async def _copy(sjs: Any, dest: Any, info: Any, replicas: int, log: Any) -> int:
    import nats.js.errors

    cfg = info.config
    cfg.num_replicas = replicas
    try:
        await dest.add_stream(cfg)
    except nats.js.errors.APIError as exc:
        if exc.err_code != 10058:  # "in use with another configuration": a service made it already; fill it
            raise
    n = 0
    first, last = info.state.first_seq, info.state.last_seq

    async def read(seq: int) -> Any:
        try:
            return await sjs.get_msg(cfg.name, seq)
        except nats.js.errors.NotFoundError:
            return None  # deleted

    async def write(msg: Any) -> None:
        headers = {k: v for k, v in (msg.headers or {}).items() if not k.startswith(_DROP_HEADERS)}
        await dest.publish(msg.subject, msg.data or b"", headers=headers or None, stream=cfg.name)

    for start in range(first, last + 1, COPY_WINDOW) if info.state.messages else ():
        # a window of messages read at once, then written at once -- one after the other where two share a
        # subject, whose order is its history (a KV key's revisions)
        msgs = [m for m in await asyncio.gather(*map(read, range(start, min(start + COPY_WINDOW, last + 1))))
                if m is not None]
        if len({m.subject for m in msgs}) == len(msgs):
            await asyncio.gather(*map(write, msgs))
        else:
            for m in msgs:
                await write(m)
        before, n = n, n + len(msgs)
        if n // 1000 != before // 1000:
            log("info", "copying stream into the cluster", stream=cfg.name, copied=n, of=info.state.messages)
    log("info", "stream copied into the cluster", stream=cfg.name, messages=n)
    return n

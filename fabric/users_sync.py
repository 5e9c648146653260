"""One users table for every server of a cluster: the JetStream KV bucket ``fabric_users``.

Each node's nats-server admits whom its own ``users.conf`` lists (:mod:`fabric.auth`), so
a user added on one node must reach every node's file.  The shared part of the table
(:meth:`fabric.auth.AuthRealm.shared`: the people, the nodes, the join keys) lives in the
bucket, one key per entry -- ``user.<name>``, ``node.<name>``, ``join.<node>`` -- so two
changes to different entries never overwrite each other.  Whoever changes the table
locally (``fabric user add/rm``, ``fabric join-token --rotate``, the supervisor granting a
join or dropping an expired user) writes the keys it touched (:func:`push`); every
supervisor watches the bucket and applies what it sees to its own table, reloading its
server when that changes anything (:class:`UsersSync`).

Each supervisor, when its watch has read the bucket, puts the entries of its own table
the bucket has never held (the node that forms the cluster: its whole table); an entry
the bucket holds deleted (a delete marker) stays deleted, so a node that was down while
a user was removed never brings the user back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from .auth import AuthRealm

__all__ = ["USERS_BUCKET", "UsersSync", "push", "keys_of", "bucket_config"]

#: the KV bucket of the shared users table (admin-only: no other role reaches its stream)
USERS_BUCKET = "fabric_users"
#: how often a supervisor reads the whole bucket again (s)
REFRESH_S = 60.0


def bucket_config(replicas: int) -> Any:
    from nats.js.api import KeyValueConfig, StorageType

    return KeyValueConfig(bucket=USERS_BUCKET, history=1, storage=StorageType.FILE, replicas=replicas,
                          description="fabric users table, shared by the cluster's servers")


def keys_of(table: dict[str, Any]) -> dict[str, Any]:
    """The bucket's keys and values for a shared table."""
    out: dict[str, Any] = {}
    for section, prefix in (("users", "user"), ("nodes", "node"), ("join", "join")):
        for name, value in (table.get(section) or {}).items():
            out[f"{prefix}.{name}"] = value
    return out


def table_of(entries: dict[str, Any]) -> dict[str, Any]:
    table: dict[str, Any] = {"users": {}, "nodes": {}, "join": {}}
    for key, value in entries.items():
        prefix, _, name = key.partition(".")
        section = {"user": "users", "node": "nodes", "join": "join"}.get(prefix)
        if section is not None and name:
            table[section][name] = value
    return table


async def open_bucket(js: Any, log: Any) -> tuple[Any, bool]:
    """The bucket (made with 3 replicas, or 1 while fewer servers run JetStream); whether this call made it."""
    import nats.js.errors

    try:
        return await js.key_value(USERS_BUCKET), False
    except nats.js.errors.BucketNotFoundError:
        pass
    for replicas in (3, 1):
        try:
            return await js.create_key_value(bucket_config(replicas)), True
        except nats.js.errors.APIError as exc:
            if exc.err_code == 10058:  # made by another node just now
                return await js.key_value(USERS_BUCKET), False
            if replicas == 1:
                raise
            log("debug", "users bucket: fewer than 3 JetStream servers, 1 replica for now", error=str(exc))
    raise AssertionError("unreachable")


async def push(js: Any, realm: AuthRealm, keys: Iterable[str], log: Any) -> None:
    """Write the entries *keys* of *realm*'s shared table into the bucket (deleting those it no longer has)."""
    kv, _ = await open_bucket(js, log)
    mine = keys_of(realm.shared())
    for key in keys:
        if key in mine:
            await kv.put(key, json.dumps(mine[key], sort_keys=True).encode())
        else:
            try:
                await kv.delete(key)
            except Exception as exc:  # already gone
                log("debug", "users bucket: delete", key=key, error=str(exc))


class UsersSync:
    """A supervisor's watch on the bucket: it applies each change to the node's table and reloads."""

    def __init__(self, realm: AuthRealm, reload: Callable[[], Awaitable[None]], log: Any) -> None:
        self.realm = realm
        self.reload = reload
        self.log = log
        self._task: asyncio.Task[None] | None = None

    def start(self, nc: Any) -> None:
        self._task = asyncio.create_task(self._run(nc), name="users-sync")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self, nc: Any) -> None:
        js = nc.jetstream(timeout=5)
        while True:
            try:
                kv, _ = await open_bucket(js, self.log)
                # watched afresh each minute: a watch that a server restart left stalled recovers
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._follow(kv), REFRESH_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # no JetStream quorum yet, a lost connection: look again shortly
                self.log("debug", "users sync: retrying", error=str(exc) or type(exc).__name__)
                await asyncio.sleep(2.0)

    async def _follow(self, kv: Any) -> None:
        watcher = await kv.watchall()
        entries: dict[str, Any] = {}
        deleted: set[str] = set()
        caught_up = False
        try:
            while True:
                entry = await watcher.updates(timeout=None)
                if entry is None:  # the initial values are all in
                    caught_up = True
                    await self._contribute(kv, entries, deleted)
                elif entry.operation in ("DEL", "PURGE") or entry.value is None:
                    entries.pop(entry.key, None)
                    deleted.add(entry.key)
                else:
                    deleted.discard(entry.key)
                    try:
                        entries[entry.key] = json.loads(entry.value)
                    except ValueError:
                        self.log("warning", "users sync: an entry that is not JSON, ignored", key=entry.key)
                        continue
                if caught_up and await asyncio.to_thread(self.realm.adopt, table_of(entries)):
                    self.log("info", "users table changed by another node: reloading", entries=len(entries))
                    await self.reload()
        finally:
            await watcher.stop()

    async def _contribute(self, kv: Any, entries: dict[str, Any], deleted: set[str]) -> None:
        """Put this node's entries the bucket has never seen (the forming node's whole table; a change made
        here while the bucket could not be written); an entry the bucket holds deleted stays deleted."""
        for key, value in keys_of(self.realm.shared()).items():
            if key not in entries and key not in deleted:
                await kv.put(key, json.dumps(value, sort_keys=True).encode())
                entries[key] = value

"""The compute-core messages (``fabric.core.*``: load, list, stats).

Part of :mod:`fabric.schema` (its docstring has the rules every message follows)."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from .base import Message

# -- compute cores (spawner: services/spawner/pools.py) ------------------------

#: a core id: one subject token, minted by the spawner that loaded the core
CoreId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
#: a core's name (also sent to its workers in the v1 "new compute core" message)
CoreName = Annotated[str, Meta(min_length=1, max_length=255)]


class LoadCoreRequest(Message):
    """``fabric.core.load`` / ``fabric.core.<node>.load``: start a warm pool for a core.

    ``library`` is the ``.so`` file's bytes (raw ``bin`` in MessagePack, base64 in
    JSON); empty with ``name == "fabric.python"`` selects the built-in Python worker.

    One live pool per name on a node: the same name, library (sha256) and settings
    returns the live pool (``CoreInfo.reused``); another library or other settings is
    409 unless ``replace`` (a new pool; the old one drains).  A pool lives until
    unloaded, its spawner stops, or it has had no job for ``unload_after_s`` seconds.
    """

    name: CoreName
    library: bytes = b""
    min_workers: Annotated[int, Meta(ge=0, le=256)] = 1
    max_workers: Annotated[int, Meta(ge=1, le=256)] = 4
    #: seconds one job may run before its worker is killed (JobTimeout); 0 = no limit
    time_limit_s: Annotated[float, Meta(ge=0, le=7 * 24 * 3600)] = 60.0
    #: an idle worker above min_workers retires after this many seconds
    idle_s: Annotated[float, Meta(ge=0, le=24 * 3600)] = 30.0
    #: also listen for external v1 workers (unix socket, and TCP on ``listen_host``)
    external: bool = False
    listen_host: str = "127.0.0.1"
    #: start a new pool even if one of this name is live; the old one drains (finishes its jobs, then stops)
    replace: bool = False
    #: the spawner unloads the pool after this many seconds without a job; 0 = never
    unload_after_s: Annotated[float, Meta(ge=0, le=365 * 24 * 3600)] = 0.0
    #: ed25519 signature (base64) of the library's digest by a trusted key, where the node requires one
    #: (``sandbox.require_signed``; fabric.signing)
    signature: Annotated[str, Meta(max_length=128)] = ""


class CoreInfo(Message):
    """One loaded core and its pool (reply of load and stats, items of list)."""

    core: str
    node: str
    name: str
    min_workers: int
    max_workers: int
    time_limit_s: float
    workers: int = 0
    idle: int = 0
    external_workers: int = 0
    queued: int = 0
    running: int = 0
    jobs_done: int = 0
    jobs_failed: int = 0
    crashes: int = 0
    timeouts: int = 0
    workers_started: int = 0
    workers_refused: int = 0
    #: where external v1 workers connect (``unix:/path`` and ``tcp:HOST:PORT``), when asked for
    listen_unix: str = ""
    listen_tcp: str = ""
    #: sha256 (hex) of the library, or ``fabric.python`` for the built-in worker
    digest: str = ""
    idle_s: float = 30.0
    unload_after_s: float = 0.0
    #: (load reply) the load found this pool live and returned it; nothing was started or changed
    reused: bool = False
    #: replaced by core ``replaced_by``: takes no new jobs, stops once its queued and running jobs are done
    draining: bool = False
    replaced_by: str = ""


class CoreRequest(Message):
    """``fabric.core.<node>.stats`` / ``unload``: one core by id."""

    core: CoreId


class CoreListReply(Message):
    """``fabric.core.<node>.list``: every core loaded on the node."""

    node: str
    cores: list[CoreInfo] = []

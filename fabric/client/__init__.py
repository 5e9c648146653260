"""FabricClient (sync) and AsyncFabricClient: remote memory as simple as malloc.

::

    from fabric import FabricClient
    with FabricClient("nats://127.0.0.1:4222") as fc:
        buf = fc.rmalloc(1024)
        fc.rwrite(buf, b"hello", offset=0)
        assert fc.rread(buf, 5) == b"hello"
        fc.rfree(buf)

How requests travel:

* control requests (alloc, free, realloc, stat, share, renew) are JSON on the
  subjects of docs/protocol.md;
* reads and writes use the binary frame of :mod:`fabric_ext.wire`; values larger
  than the server's max payload are split into chunks transparently, sent a few
  at a time concurrently;
* reads of more than ``read_chunk_size`` bytes (128 KiB by default) are split
  the same way even when they would fit one message: the allocator answers chunk
  after chunk, so nats-server and this client work on one chunk while it copies
  the next, instead of each waiting for a whole megabyte (a 1 MiB read took about
  two thirds of the time on the 2-core VM of docs/benchmarks.md).  Writes gain
  nothing from this -- the client sends its bytes in one burst either way -- and
  are split only past the max payload;
* the **local fast path**: when the allocator holding a block runs on this host
  (same boot id), the client maps that block's segment -- which holds only its
  owner's blocks -- and reads and writes it directly, with no NATS hop.  Turn it
  off with ``local=False``.

The sync client runs an event loop in a background thread; the local fast path
is served in the calling thread, without a hop to that loop.

The package, one module per area; imports run one way, transport <- areas <- client:

* :mod:`~fabric.client.transport` -- connect, ``request`` and its error mapping, ``_call``, URL discovery;
* :mod:`~fabric.client.buffers`, :mod:`~fabric.client.local`, :mod:`~fabric.client.memory` -- remote
  buffers, the local fast path's mapped segments, the memory calls;
* :mod:`~fabric.client.processes`, :mod:`~fabric.client.cores`, :mod:`~fabric.client.nodes` -- the
  spawner's processes and compute cores, the gpu-monitor's node registry;
* :mod:`~fabric.client.tasks`, :mod:`~fabric.client.futures`, :mod:`~fabric.client.resources` -- durable
  tasks on the scheduler, their futures (``as_completed``, ``wait``, a progress bar), ``Resources``;
* :mod:`~fabric.client.opencl`, :mod:`~fabric.client.staging` -- the OpenCL runner a client owns
  (loaded on its first kernel) and its same-host staging files;
* :mod:`~fabric.client.aio` -- :class:`AsyncFabricClient`, the areas composed;
* :mod:`~fabric.client.twin`, :mod:`~fabric.client.sync` -- the sync twins generated from the async
  classes, and what only the sync side does (the caller's-thread fast path, the loop thread).
"""

from __future__ import annotations

from ..config.model import DEFAULT_NATS_URL
from ..protocol.cores import PYTHON_CORE
from ..protocol.headers import EXIT_CODE_HEADER
from .aio import AsyncFabricClient
from .buffers import AsyncRemoteBuffer
from .cores import MAP_BATCH, MAP_IN_FLIGHT, AsyncCore
from .processes import AsyncRemoteProcess
from .sync import Core, FabricClient, RemoteBuffer, RemoteProcess
from .transport import (
    CHUNKS_IN_FLIGHT,
    DEFAULT_READ_CHUNK_SIZE,
    FRAME_OVERHEAD,
    default_url,
)

__all__ = ["AsyncFabricClient", "FabricClient", "RemoteBuffer", "AsyncRemoteBuffer", "AsyncCore", "Core",
           "AsyncRemoteProcess", "RemoteProcess", "DEFAULT_NATS_URL", "default_url", "PYTHON_CORE",
           "EXIT_CODE_HEADER", "MAP_BATCH", "MAP_IN_FLIGHT", "CHUNKS_IN_FLIGHT", "DEFAULT_READ_CHUNK_SIZE",
           "FRAME_OVERHEAD"]

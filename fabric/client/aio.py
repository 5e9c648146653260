"""AsyncFabricClient: the areas of the client composed over one transport.

Each area is a mixin over :class:`~fabric.client.transport.Transport` (memory,
processes, cores, nodes, tasks); OpenCL is an object the client owns
(:class:`~fabric.client.opencl.OpenCLRunner`, made on the first kernel, closed here).
The sync :class:`~fabric.client.FabricClient` is generated from this class
(:mod:`fabric.client.sync`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .cores import CoresArea
from .dataplane import enabled_by_default
from .memory import MemoryArea
from .nodes import NodesArea
from .processes import ProcessesArea
from .tasks import TasksArea
from .transport import DEFAULT_READ_CHUNK_SIZE

if TYPE_CHECKING:
    from .opencl import OpenCLRunner


class AsyncFabricClient(MemoryArea, ProcessesArea, CoresArea, NodesArea, TasksArea):
    """The asyncio client.  ``async with AsyncFabricClient(url) as fc: buf = await fc.rmalloc(1024)``.

    *url* defaults to ``$FABRIC_NATS_URL``, then the fabric ``fabric up`` runs here
    (its default state directory), then ``nats://127.0.0.1:4222`` (:func:`default_url`);
    connecting gives up after *timeout* seconds with :class:`Unavailable`; *owner*
    (the quota account of the blocks it allocates) to the user name; *timeout* is
    per request, in seconds; ``local=False`` turns the local fast path off;
    reads of more than *read_chunk_size* bytes travel as concurrent chunks.
    *credentials* is a credentials file (``fabric user add`` writes one); by default
    ``$FABRIC_CREDENTIALS``, else the admin credentials of the fabric running here, else
    none (a fabric without auth).  Its URL is the default *url* after ``$FABRIC_NATS_URL``.
    *signing_key* (default ``$FABRIC_SIGNING_KEY``): a private key from ``fabric keys create``;
    the client signs the code it sends with it (Python tasks, core libraries, native
    executables), which a node with ``sandbox.require_signed`` demands (fabric.signing).
    *data_plane*: remote reads and writes go point to point to the node's allocator over TCP when it
    offers that, and over NATS otherwise (:mod:`fabric.client.dataplane`); ``False`` keeps them on NATS.
    Default: ``$FABRIC_MEM_DATA_PLANE`` (the configuration's ``mem.data_plane``), else on.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        owner: str | None = None,
        timeout: float = 10.0,
        local: bool = True,
        name: str = "fabric-client",
        read_chunk_size: int = DEFAULT_READ_CHUNK_SIZE,
        credentials: str | os.PathLike[str] | None = None,
        signing_key: str | os.PathLike[str] | None = None,
        data_plane: bool | None = None,
    ) -> None:
        super().__init__(url, owner=owner, timeout=timeout, name=name, read_chunk_size=read_chunk_size,
                         credentials=credentials, signing_key=signing_key)
        self._init_memory(local, enabled_by_default() if data_plane is None else data_plane)
        self._init_tasks()
        self._opencl: OpenCLRunner | None = None  # made by the first kernel (it imports numpy)

    async def connect(self) -> AsyncFabricClient:
        await self._connect()
        return self

    async def close(self) -> None:
        await self._close_tasks()
        await self._close_memory()
        if self._opencl is not None:
            self._opencl.close()  # this client's staging files in /dev/shm go now, not at exit
        await self._disconnect()

    async def __aenter__(self) -> AsyncFabricClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- OpenCL kernels as jobs ------------------------------------------------------

    def _opencl_runner(self) -> OpenCLRunner:
        if self._opencl is None:
            from .opencl import OpenCLRunner  # numpy and the frame codec load on first use

            self._opencl = OpenCLRunner(self)
        return self._opencl

    async def opencl(self, source: str, kernel: str, global_size: int | Sequence[int], args: Sequence[Any], *,
                     local_size: int | Sequence[int] | None = None, device: str | None = None,
                     check_sizes: bool = True, timeout: float | None = None) -> list[Any]:
        """Run an OpenCL *kernel* from *source* on the best device the fabric has; the outputs, in order.

        Each of *args*, in the kernel's parameter order, is a numpy array (an input buffer),
        :class:`fabric.Out` ``(shape, dtype)`` (an output buffer) or a numpy scalar.
        *device*: an OpenCL device id from :meth:`nodes` (``"<node>:cl:<p>:<d>"``), a node
        name, ``"gpu"`` or ``"cpu"``; by default a GPU where there is one, else a CPU.
        ``check_sizes`` refuses a buffer smaller than the number of work items (turn it off
        for kernels whose buffers are not one element per work item, such as a matmul).
        A kernel that does not compile raises :class:`KernelBuildFailed` (400) with its ``build_log``.

        >>> out, = await fc.opencl(VADD, "vadd", n, [a, b, Out(n, "float32")])   # doctest: +SKIP
        """
        return await self._opencl_runner().run(source, kernel, global_size, args, local_size=local_size,
                                               device=device, check_sizes=check_sizes, timeout=timeout)

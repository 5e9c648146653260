"""The bare-socket floor under bench/mem.py: what one request/reply over TCP costs with nothing else in it.

A minimal C server (bench/_floor.c, compiled with gcc at bench time into a temporary
directory) answers an 8-byte request with N bytes; :class:`FloorClient` asks from Python
with a blocking socket, ``sendall`` and ``recv_into`` a page-aligned buffer allocated
once -- no parsing, no framing, no new ``bytes`` per reply.  Its times are what a perfect client of
a perfect server would see on the same path (loopback or the veth), so "Redis GET over
this floor" says how much of Redis's time is the transport's and how far any client could
beat it.
"""

from __future__ import annotations

import mmap
import shutil
import socket
import struct
import subprocess
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "_floor.c"


def build(workdir: Path) -> Path:
    """Compile the floor server into *workdir*; its path (exits the bench without gcc)."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise SystemExit("no C compiler (gcc) for the bare-socket floor: apt-get install gcc")
    exe = workdir / "floor"
    subprocess.run([gcc, "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(exe), str(SOURCE)], check=True,
                   capture_output=True, timeout=60)
    return exe


def start(exe: Path, host: str, prefix: list[str] | None = None) -> tuple[subprocess.Popen[bytes], int]:
    """Run the server on *host* (behind *prefix*, e.g. ``ip netns exec NS``); the process and its port."""
    proc = subprocess.Popen([*(prefix or []), str(exe), host], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        proc.wait()
        raise SystemExit(f"the floor server did not start (said {line!r})")
    return proc, int(line)


class FloorClient:
    """A blocking-socket client of the floor server: :meth:`read` asks for n bytes and receives them in place."""

    def __init__(self, host: str, port: int, max_reply: int = 1 << 20) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.settimeout(None)  # blocking: a socket with a timeout polls before every recv
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Page-aligned (an anonymous mmap), not a bytearray: the kernel's copy into a buffer 16 bytes into
        # a page (where malloc puts a megabyte) took 1.5-3x as long per megabyte on this machine's AMD EPYC
        # (measured from C and from Python), which would make the "floor" slower than fabric at 1 MiB.
        self._map = mmap.mmap(-1, max_reply)
        self._map.write(bytes(max_reply))  # touch every page now, not during the first reads
        self._view = memoryview(self._map)
        self._heads: dict[int, bytes] = {}

    def read(self, n: int) -> None:
        head = self._heads.get(n)
        if head is None:
            head = self._heads[n] = struct.pack("<II", n, 0)
        self.sock.sendall(head)
        view, got, recv_into = self._view, 0, self.sock.recv_into
        while got < n:
            k = recv_into(view[got:n])
            if not k:
                raise ConnectionResetError("the floor server closed the connection")
            got += k

    def last(self, n: int) -> bytes:
        """The first *n* bytes of the last reply (a copy)."""
        return bytes(self._view[:n])

    def close(self) -> None:
        self.sock.close()
        self._view.release()
        self._map.close()

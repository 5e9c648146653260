"""Same-host staging files for OpenCL jobs: the client's side (docs/protocol.md "OpenCL kernels").

A client on a node's host copies a job's buffers into a file in ``/dev/shm`` that it
owns (``fabric-stage-<pid>-<hex>``, a random nonce at its start); the worker maps it
and runs the kernel in place.  :class:`_Stager` keeps one file per call in flight and
a few idle ones for reuse; :class:`fabric.client.opencl.OpenCLRunner` owns one and
closes it with the client.  Files of processes that died are swept; the files of this
process go at exit.  Only the client imports this module (the worker needs the frame
layout of :mod:`fabric.opencl`, not these files).
"""

from __future__ import annotations

import atexit
import glob
import math
import mmap
import os
import secrets
import threading
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..errors import TooLarge
from ..opencl import (
    PARALLEL_COPY_MIN,
    STAGE_DIR,
    STAGE_KEEP,
    STAGE_MAX,
    STAGE_MIN,
    STAGE_NAME,
    STAGE_NONCE,
    STAGE_PREFIX,
)

_ALL_STAGERS: weakref.WeakSet[_Stager] = weakref.WeakSet()
_ALL_LOCK = threading.Lock()


#: what a closed staging file's ``bytes`` points at instead of its mapping
_NO_BYTES = np.empty(0, dtype=np.uint8)


class StagingFile:
    """A file in /dev/shm this process made, mapped, with a random nonce at its start."""

    def __init__(self, capacity: int) -> None:
        self.name = f"{STAGE_PREFIX}{os.getpid()}-{secrets.token_hex(16)}"
        self.path = os.path.join(STAGE_DIR, self.name)
        self.capacity = capacity
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            # reserve the pages now: a full /dev/shm fails here, not as SIGBUS in a write later
            os.posix_fallocate(fd, 0, capacity)
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            self.mm = mmap.mmap(fd, capacity, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            os.unlink(self.path)
            raise
        self.fd = fd
        self.nonce = secrets.token_bytes(STAGE_NONCE)
        self.mm[:STAGE_NONCE] = self.nonce
        self.bytes = np.frombuffer(self.mm, dtype=np.uint8)

    def view(self, offset: int, shape: Sequence[int], dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
        n = math.prod(shape) * dtype.itemsize
        return self.bytes[offset:offset + n].view(dtype).reshape(shape)

    def close(self) -> None:
        if self.fd < 0:
            return
        self.bytes = _NO_BYTES  # drop the view of the mapping, so it can close
        try:
            self.mm.close()
        except BufferError:  # a view is still alive: the mapping goes with it
            pass
        os.close(self.fd)
        self.fd = -1
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class _Stager:
    """A client's staging files: one per call in flight, a few kept idle for the next calls."""

    def __init__(self) -> None:
        self.idle: list[StagingFile] = []
        self.busy: set[StagingFile] = set()
        with _ALL_LOCK:
            _ALL_STAGERS.add(self)

    def acquire(self, size: int) -> StagingFile:
        fits = [f for f in self.idle if f.capacity >= size]
        if fits:
            f = min(fits, key=lambda f: f.capacity)
            self.idle.remove(f)
        else:
            if size > STAGE_MAX:
                raise TooLarge(f"the job's buffers ({size} bytes) exceed the staging limit of {STAGE_MAX} bytes")
            if not self.idle and not self.busy:
                _sweep_dead()
            f = StagingFile(max(STAGE_MIN, 1 << (size - 1).bit_length()))
            if len(self.idle) >= STAGE_KEEP:  # keep the biggest few
                self.idle.sort(key=lambda f: f.capacity)
                self.idle.pop(0).close()
        self.busy.add(f)
        return f

    def release(self, f: StagingFile, *, reusable: bool = True) -> None:
        """Give *f* back; ``reusable=False`` (the job may still be writing into it) closes it."""
        self.busy.discard(f)
        if reusable and f.fd >= 0:
            self.idle.append(f)
        else:
            f.close()

    def close(self) -> None:
        for f in [*self.idle, *self.busy]:
            f.close()
        self.idle.clear()
        self.busy.clear()


def _sweep_dead() -> None:
    """Remove the staging files of this user's processes that died without cleaning up."""
    uid = os.getuid()
    for path in glob.glob(os.path.join(STAGE_DIR, STAGE_PREFIX + "*")):
        name = os.path.basename(path)
        if not STAGE_NAME.match(name):
            continue
        pid = int(name.split("-")[2])
        try:
            if os.lstat(path).st_uid != uid:
                continue
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                os.unlink(path)
            except OSError:
                pass
        except OSError:  # alive but not ours to signal, or the file went away
            pass


def close_all_staging() -> None:
    """Unlink the staging files of every client of this process (at exit)."""
    with _ALL_LOCK:
        stagers = list(_ALL_STAGERS)
    for st in stagers:
        st.close()


atexit.register(close_all_staging)


_copier: ThreadPoolExecutor | None = None


def _copy(pairs: list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]]) -> None:
    """``dst[...] = src`` for each pair; big ones split in halves, one half on a helper thread."""
    global _copier
    total = sum(dst.nbytes for dst, _ in pairs)
    if total < PARALLEL_COPY_MIN:
        for dst, src in pairs:
            np.copyto(dst, src)
        return
    mine: list[tuple[Any, Any]] = []
    theirs: list[tuple[Any, Any]] = []
    for dst, src in pairs:
        if dst.ndim and dst.shape[0] >= 2:
            h = dst.shape[0] // 2
            mine.append((dst[:h], src[:h]))
            theirs.append((dst[h:], src[h:]))
        else:
            mine.append((dst, src))
    if _copier is None:
        _copier = ThreadPoolExecutor(1, thread_name_prefix="fabric-opencl-copy")
    done = _copier.submit(_copy_all, theirs)
    try:
        _copy_all(mine)
    finally:
        done.result()


def _copy_all(pairs: list[tuple[Any, Any]]) -> None:
    for dst, src in pairs:
        np.copyto(dst, src)

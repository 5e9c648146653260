"""Compute cores as the worker process runs them: a loaded ``.so`` or the built-in Python core.

A compute core (seed "Compute core API version 1") is a shared library with
three unmangled functions: ``worker_init``, ``worker_run_job`` and
``worker_free_outdata``.  :class:`CCore` loads one from the bytes of a "new
compute core" message without touching the disk: the bytes go into a memfd and
``dlopen`` opens ``/proc/self/fd/N``.  :class:`PythonCore` is the built-in core
selected by the name ``fabric.python`` and an empty library: a job is a
``python`` task's FPY1 frame (:mod:`fabric.protocol.pytasks`) or
``cloudpickle.dumps((fn, args, kwargs))``.  The name ``fabric.opencl`` with an
empty library is the built-in OpenCL core (``worker_opencl.OpenCLCore``): a job
is an OpenCL kernel frame of :mod:`fabric.opencl`; pyopencl is imported only then.

Both answer :meth:`run` with ``(exit_code, output)``; the worker loop
(``services/spawner/worker.py``) turns that into a v1 response.  A core that
cannot be loaded raises :class:`~.core_api.CoreError` with a message for the 0xFF reply.

Imports run one way: this module imports :mod:`.worker_opencl` (lazily, in
:func:`load_core`), which imports only :mod:`.core_api` from here (and the core names from
:mod:`fabric.protocol.cores`).
"""

from __future__ import annotations

import ctypes
import io
import os
import pickle
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fabric.protocol.cores import BUILTIN_CORES, OPENCL_CORE, PYTHON_CORE
from fabric.protocol.pytasks import (
    PY_BATCH_MAGIC,
    PY_TASK_MAGIC,
    TASK_PERSISTENT_TAG,
    decode_batch,
    decode_python_task,
    encode_batch_results,
    encode_python_error,
)

from .core_api import API_VERSION, CoreError

if TYPE_CHECKING:
    from .worker_opencl import OpenCLCore

__all__ = ["API_VERSION", "BUILTIN_CORES", "OPENCL_CORE", "PYTHON_CORE", "CCore", "CoreError", "PythonCore",
           "load_core"]

REQUIRED = ("worker_init", "worker_run_job", "worker_free_outdata")

_RUN_JOB = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_uint64, ctypes.c_void_p,
                            ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_void_p))
_INIT = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_int32)
_FREE = ctypes.CFUNCTYPE(None, ctypes.c_uint64, ctypes.c_void_p)

_dlclose: Callable[[int], None] | None
try:
    from _ctypes import dlclose as _dlclose
except ImportError:  # pragma: no cover - every Linux CPython has it
    _dlclose = None


class CCore:
    """A compute core ``.so`` loaded from bytes, with its three functions bound.

    ``run_ptr`` is the hot path: it takes the address and size of the job data
    (memory the core may scribble on, as the API allows), returns the exit code
    and leaves the output in ``outsize``/``outdata`` until :meth:`free_output`.

    >>> core = CCore("echo", open("echo.so", "rb").read())   # doctest: +SKIP
    >>> core.run(b"hi")                                       # doctest: +SKIP
    (0, b'hi')
    """

    def __init__(self, name: str, library: memoryview | bytes) -> None:
        self.name = name
        if not library:
            raise CoreError(f"core {name!r}: the library is empty")
        # the memfd stays open while the library is loaded: dlopen() recognises
        # an already-loaded object by its path, so a reused "/proc/self/fd/N"
        # of a still-loaded core would hand back the old library
        # the memfd name is only for /proc/PID/maps readers: at most 249 bytes, no NUL
        label = f"fabric-core-{name}".encode()[:200].decode(errors="ignore").replace("\0", "?")
        self._fd = os.memfd_create(label, os.MFD_CLOEXEC)
        try:
            _write_all(self._fd, library)
            path = f"/proc/self/fd/{self._fd}"
            try:
                self._lib: ctypes.CDLL | None = ctypes.CDLL(path, mode=os.RTLD_NOW | os.RTLD_LOCAL)
            except OSError as exc:
                raise CoreError(f"core {name!r}: cannot load the library: {exc}") from None
            missing = [s for s in REQUIRED if not hasattr(self._lib, s)]
            if missing:
                self._unload()
                raise CoreError(f"core {name!r}: the library does not export {', '.join(missing)} "
                                f"(compute core API version {API_VERSION} needs {', '.join(REQUIRED)})")
            self._init = _INIT(("worker_init", self._lib))
            self._run = _RUN_JOB(("worker_run_job", self._lib))
            self._free = _FREE(("worker_free_outdata", self._lib))
            rc = self._init(API_VERSION)
            if rc != 0:
                self._unload()
                raise CoreError(f"core {name!r}: worker_init({API_VERSION}) returned {rc}")
        except BaseException:
            self._close_fd()
            raise
        self.outsize = ctypes.c_uint64(0)
        self.outdata = ctypes.c_void_p(None)
        self._p_outsize = ctypes.pointer(self.outsize)
        self._p_outdata = ctypes.pointer(self.outdata)
        self._pending = False           # an output not yet freed

    def run_ptr(self, address: int, size: int) -> int:
        """Run one job on ``size`` bytes at ``address``; the output waits in outsize/outdata."""
        if self._pending:
            self.free_output()
        self.outsize.value = 0
        self.outdata.value = None
        rc: int = self._run(size, address, self._p_outsize, self._p_outdata)
        self._pending = True
        return rc

    def output_view(self) -> memoryview | bytes:
        """The last job's output, viewed in place (valid until :meth:`free_output`)."""
        n = self.outsize.value
        if n == 0:
            return b""
        ptr = self.outdata.value
        if not ptr:
            raise CoreError(f"core {self.name!r}: worker_run_job reported {n} output bytes at a null pointer")
        return memoryview((ctypes.c_char * n).from_address(ptr)).cast("B")

    def free_output(self) -> None:
        """Call ``worker_free_outdata`` for the last job's output (the API: before the next job)."""
        if self._pending:
            self._pending = False
            self._free(self.outsize.value, self.outdata.value)

    def run(self, data: bytes | bytearray | memoryview) -> tuple[int, bytes]:
        """Run one job on a copy of *data*; ``(exit_code, output bytes)`` (for tests and cold paths)."""
        buf = ctypes.create_string_buffer(bytes(data), len(data) or 1)
        rc = self.run_ptr(ctypes.addressof(buf), len(data))
        try:
            out = bytes(self.output_view())
        finally:
            self.free_output()
        return rc, out

    def close(self) -> None:
        """Free any pending output and unload the library (a later core replaces this one)."""
        try:
            self.free_output()
        finally:
            self._unload()
            self._close_fd()

    def _unload(self) -> None:
        lib, self._lib = getattr(self, "_lib", None), None
        if lib is not None and _dlclose is not None:
            _dlclose(lib._handle)

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        try:
            # a library that stays mapped after dlclose (NODELETE, TLS destructors)
            # keeps its fd so its path is never reused by another core
            ctypes.CDLL(f"/proc/self/fd/{fd}", mode=os.RTLD_NOLOAD | os.RTLD_NOW)
        except OSError:
            os.close(fd)


class PythonCore:
    """The built-in core: a ``python`` task's FPY1 frame, a batch of them (FPYB), or
    ``cloudpickle.dumps((fn, args, kwargs))``.

    The job formats are told apart by the first four bytes (``FPY1``, ``FPYB``, which no
    pickle starts with: a pickle of protocol 2 or later starts with ``0x80``).

    * FPY1 (a task of the scheduler, docs/protocol.md "Python tasks: FPY1 and FPYE"): the
      function is unpickled once per worker and kept (:data:`FN_CACHE` of them, keyed by
      their pickled bytes) so every task of one ``fc.map`` reuses it; ``(args, kwargs)`` is
      unpickled with each ``("fabric.task", id)`` persistent id replaced by that
      dependency's unpickled result.  Output: ``pickle.dumps(result)`` with exit code 0;
      when anything raises, exit code 1 and an FPYE frame (never a pickle: the spawner
      reads it without unpickling user objects).
    * FPYB (several FPY1 frames as one job, from the node's task runner): each runs in turn;
      output one FPYR frame of their own codes, run times and outputs, exit code 0.
    * the plain job of ``Core.call``: output ``pickle.dumps(result)`` with exit code 0;
      when anything raises (unpickling the job, the function, pickling its result)
      ``pickle.dumps((type_name, message, traceback_text))`` with exit code 1.
    """

    name = PYTHON_CORE

    def __init__(self) -> None:
        import cloudpickle  # noqa: F401  (the jobs were pickled by it; fail at load, not at the first job)

        #: the functions of recent FPY1 frames, by their pickled bytes, least recently used first
        self.fns: OrderedDict[bytes, Any] = OrderedDict()

    def run(self, data: bytes | bytearray | memoryview) -> tuple[int, bytes]:
        magic = bytes(data[:4])
        if magic == PY_TASK_MAGIC:
            return self.run_task(data)
        if magic == PY_BATCH_MAGIC:
            return self.run_batch(data)
        try:
            fn, args, kwargs = pickle.loads(data)
            result: Any = fn(*args, **kwargs)
            return 0, pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException as exc:  # a job's failure is its result; SystemExit too must not end the worker
            if isinstance(exc, KeyboardInterrupt):
                raise
            tb = traceback.format_exc()
            return 1, pickle.dumps((type(exc).__name__, str(exc), tb), protocol=pickle.HIGHEST_PROTOCOL)

    def run_task(self, data: bytes | bytearray | memoryview) -> tuple[int, bytes]:
        """One FPY1 frame: ``(0, pickled result)`` or ``(1, FPYE frame)``."""
        try:
            task = decode_python_task(data)
            fn = self._function(task.fn)
            args, kwargs = _CallUnpickler(task.call, task.deps).load()
            result: Any = fn(*args, **kwargs)
            return 0, pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException as exc:  # the task's failure is its result; SystemExit too must not end the worker
            if isinstance(exc, KeyboardInterrupt):
                raise
            return 1, encode_python_error(type(exc).__name__, _text(exc), traceback.format_exc(), _pickled(exc))

    def run_batch(self, data: bytes | bytearray | memoryview) -> tuple[int, bytes]:
        """An FPYB frame: each task in turn, ``(0, FPYR frame)`` of their own outputs (``(1, FPYE)`` if malformed)."""
        try:
            frames = decode_batch(data)
        except Exception as exc:
            return 1, encode_python_error(type(exc).__name__, _text(exc), traceback.format_exc())
        outputs = []
        clock = time.perf_counter
        for frame in frames:
            t0 = clock()
            code, out = self.run_task(frame)
            outputs.append((code, int((clock() - t0) * 1e6), out))
        return 0, encode_batch_results(outputs)

    def _function(self, raw: memoryview) -> Any:
        key = bytes(raw)
        fns = self.fns
        fn = fns.get(key)
        if fn is None:
            fn = pickle.loads(key)
            fns[key] = fn
            if len(fns) > FN_CACHE:
                fns.popitem(last=False)
        else:
            fns.move_to_end(key)
        return fn

    def close(self) -> None:
        self.fns.clear()


#: how many functions a Python worker keeps unpickled (the last ones used)
FN_CACHE = 64


class _CallUnpickler(pickle.Unpickler):
    """Unpickles a task's ``(args, kwargs)``: ``("fabric.task", id)`` is that dependency's result."""

    def __init__(self, call: memoryview, deps: dict[str, memoryview]) -> None:
        super().__init__(io.BytesIO(call))
        self.deps = deps
        self.values: dict[str, Any] = {}  # a dependency named twice is unpickled once (and is the same object)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 2 and pid[0] == TASK_PERSISTENT_TAG):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        task_id = pid[1]
        if task_id in self.values:
            return self.values[task_id]
        raw = self.deps.get(task_id)
        if raw is None:
            raise pickle.UnpicklingError(f"the call names task {task_id!r}, which is not among its dependencies")
        value = self.values[task_id] = pickle.loads(raw)
        return value


def _text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # a broken __str__ must not hide the failure
        return f"<{type(exc).__name__}: str() failed>"


def _pickled(exc: BaseException) -> bytes:
    """*exc* pickled, or b"" when it does not survive a round trip (the client then rebuilds it from its type name)."""
    try:
        raw = pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(raw)
    except Exception:
        return b""
    return raw


def load_core(name: str, library: memoryview | bytes) -> CCore | PythonCore | OpenCLCore:
    """The core a "new compute core" message asks for; :class:`CoreError` if it cannot load."""
    if name == PYTHON_CORE and len(library) == 0:
        return PythonCore()
    if name == OPENCL_CORE and len(library) == 0:
        from .worker_opencl import OpenCLCore  # pyopencl loads here, never at a worker's start

        return OpenCLCore()
    return CCore(name, library)


def _write_all(fd: int, data: memoryview | bytes) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]

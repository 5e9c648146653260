"""The worker process, played against as its controller: protocol v1 over a socket and over rings.

Three workers, one behaviour: ``python -m fabric.services.spawner.worker --connect
unix:...`` (socket), ``python -m fabric.services.spawner.worker --ring-in/--ring-out``
(two fabric_ext.ring rings), and the C worker ``examples/cores/worker.c``
(socket).  Each test starts the real process, speaks the v1 codec to it and
checks what a pool would see: replies, error responses, a crash as EOF/exit.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from fabric_ext import ring, wire
from tests._cores import (
    EXAMPLES,
    ROOT,
    SHA_MALFORMED,
    TEST_CORES,
    build_core,
    build_worker,
    mandel_input,
    mandel_ref,
    matmul_input,
    matmul_ref,
    sha_batch,
    sha_ref,
)

TIMEOUT = 20.0
RING_CAPACITY = 1 << 23           # max_record is a quarter: 2 MiB, room for the 1 MiB jobs


def core_bytes(build_dir: Path, name: str) -> bytes:
    src = EXAMPLES / f"{name}.c" if (EXAMPLES / f"{name}.c").exists() else TEST_CORES / f"{name}.c"
    return build_core(src, build_dir).read_bytes()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class Controller:
    """The controller's end of one worker: send frames, receive parsed frames or EOF (None)."""

    proc: subprocess.Popen[bytes]

    def send(self, frame: bytes) -> None:
        raise NotImplementedError

    def recv(self, timeout: float = TIMEOUT) -> wire.V1Frame | None:
        raise NotImplementedError

    def request(self, frame: bytes) -> wire.V1Frame:
        self.send(frame)
        f = self.recv()
        assert f is not None, "the worker closed the connection instead of answering"
        return f

    def handshake(self) -> None:
        f = self.request(wire.v1_version(1))
        assert (f.kind, f.msg_id, wire.v1_parse_version_reply(f.payload)) == (wire.V1_OK, 1, True)

    def load(self, name: str, library: bytes, msg_id: int = 2) -> wire.V1Frame:
        return self.request(wire.v1_core(msg_id, name, library))

    def job(self, data: bytes, msg_id: int = 100) -> tuple[int, bytes]:
        f = self.request(wire.v1_job(msg_id, msg_id + 1, data))
        assert (f.kind, f.msg_id) == (wire.V1_OK, msg_id), _describe(f)
        code, out = wire.v1_parse_job_result(f.payload)
        return code, bytes(out)

    def wait(self, timeout: float = TIMEOUT) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)


def _describe(f: wire.V1Frame) -> str:
    return wire.v1_parse_error(f.payload) if f.kind == wire.V1_ERROR else repr(f)


class SocketController(Controller):
    """Listens on a unix socket; the worker (Python or C) connects to it."""

    def __init__(self, argv: list[str]) -> None:
        self._dir = tempfile.mkdtemp(prefix="fw-", dir="/tmp")   # short: sun_path is 108 bytes
        path = os.path.join(self._dir, "ctl.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        listener.settimeout(TIMEOUT)
        self.proc = subprocess.Popen([*argv, f"unix:{path}"], env=_env(), stdin=subprocess.DEVNULL)
        try:
            self.sock, _ = listener.accept()
        except BaseException:
            self.proc.kill()
            raise
        finally:
            listener.close()
            os.unlink(path)
        self.decoder = wire.V1Decoder()
        self.frames: list[wire.V1Frame] = []

    def send(self, frame: bytes) -> None:
        self.sock.sendall(frame)

    def recv(self, timeout: float = TIMEOUT) -> wire.V1Frame | None:
        self.sock.settimeout(timeout)
        while not self.frames:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                assert self.decoder.pending() == 0, "EOF inside a frame"
                return None
            self.frames += self.decoder.feed(chunk)
        return self.frames.pop(0)

    def close(self) -> None:
        self.sock.close()
        super().close()
        os.rmdir(self._dir)


class RingController(Controller):
    """Creates two rings in /dev/shm and starts the Python worker on them."""

    def __init__(self, capacity: int = RING_CAPACITY) -> None:
        base = f"/dev/shm/fabric-ring-test-worker-{uuid.uuid4().hex[:12]}"
        self.paths = [f"{base}-in", f"{base}-out"]
        for p in self.paths:
            ring.create(p, capacity)
        self.prod = ring.Producer(self.paths[0])
        self.cons = ring.Consumer(self.paths[1])
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fabric.services.spawner.worker", "--ring-in", self.paths[0],
             "--ring-out", self.paths[1]],
            env=_env(), stdin=subprocess.DEVNULL)

    def send(self, frame: bytes) -> None:
        self.prod.push(frame, timeout=TIMEOUT)

    def recv(self, timeout: float = TIMEOUT) -> wire.V1Frame | None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return wire.v1_parse(self.cons.pop(timeout=0.05))
            except ring.RingClosed:
                return None
            except TimeoutError:
                if self.proc.poll() is not None:
                    rec = self.cons.try_pop()
                    return None if rec is None else wire.v1_parse(rec)
                if time.monotonic() > deadline:
                    raise

    def close(self) -> None:
        try:
            self.prod.shutdown()             # the worker exits when ring-in is shut down...
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass                         # ...unless a job never returns: killed below
        finally:
            super().close()
            self.prod.close()
            self.cons.close()
            for p in self.paths:
                ring.unlink(p)


TRANSPORTS = ["python-socket", "python-ring", "c-socket"]


def _start(kind: str, build_dir: Path) -> Controller:
    if kind == "python-socket":
        return SocketController([sys.executable, "-m", "fabric.services.spawner.worker", "--connect"])
    if kind == "python-ring":
        return RingController()
    return SocketController([str(build_worker(build_dir))])


@pytest.fixture(params=TRANSPORTS)
def ctl(request: pytest.FixtureRequest, build_dir: Path) -> Iterator[Controller]:
    c = _start(request.param, build_dir)
    yield c
    c.close()


@pytest.fixture(params=["python-socket", "python-ring"])
def pyctl(request: pytest.FixtureRequest, build_dir: Path) -> Iterator[Controller]:
    c = _start(request.param, build_dir)
    yield c
    c.close()


@pytest.fixture()
def echo(ctl: Controller, build_dir: Path) -> Controller:
    ctl.handshake()
    f = ctl.load("echo", core_bytes(build_dir, "echo"))
    assert (f.kind, f.msg_id, bytes(f.payload)) == (wire.V1_OK, 2, b""), _describe(f)
    return ctl


# -- version exchange --------------------------------------------------------------

def test_version_accepted(ctl: Controller) -> None:
    f = ctl.request(wire.v1_version(77, 1))
    assert (f.kind, f.msg_id, bytes(f.payload)) == (wire.V1_OK, 77, b"\x01")


@pytest.mark.parametrize("version", [0, 2, 2**32 - 1])
def test_version_refused_then_closed(ctl: Controller, version: int) -> None:
    f = ctl.request(wire.v1_version(5, version))
    assert (f.kind, f.msg_id, bytes(f.payload)) == (wire.V1_OK, 5, b"\x00")
    assert ctl.recv() is None            # EOF: the worker closed its side
    assert ctl.wait() == 0


def test_core_and_job_need_the_version_first(ctl: Controller, build_dir: Path) -> None:
    f = ctl.request(wire.v1_core(3, "echo", core_bytes(build_dir, "echo")))
    assert (f.kind, f.msg_id) == (wire.V1_ERROR, 3)
    assert "version exchange must come first" in wire.v1_parse_error(f.payload)
    f = ctl.request(wire.v1_job(4, 1, b"x"))
    assert (f.kind, f.msg_id) == (wire.V1_ERROR, 4)


# -- the example cores ----------------------------------------------------------------

def test_matmul(ctl: Controller, build_dir: Path) -> None:
    ctl.handshake()
    assert ctl.load("matmul", core_bytes(build_dir, "matmul")).kind == wire.V1_OK
    rnd = random.Random(3)
    for n, k, m in [(1, 1, 1), (3, 4, 5), (12, 7, 9)]:
        a = [rnd.uniform(-5, 5) for _ in range(n * k)]
        b = [rnd.uniform(-5, 5) for _ in range(k * m)]
        code, out = ctl.job(matmul_input(n, k, m, a, b))
        assert code == 0
        assert list(struct.unpack(f"<{n * m}d", out)) == matmul_ref(n, k, m, a, b)
    assert ctl.job(b"\x01\x00") == (1, b"")        # a bad input is the job's failure, not the protocol's


def test_sha256(ctl: Controller, build_dir: Path) -> None:
    ctl.handshake()
    assert ctl.load("sha256", core_bytes(build_dir, "sha256")).kind == wire.V1_OK
    for size in (0, 1, 64, 1000, 1 << 20):
        data = random.Random(size).randbytes(size)
        assert ctl.job(sha_batch([data]), msg_id=size) == (0, hashlib.sha256(data).digest())
    msgs = [random.Random(i).randbytes(i * 37) for i in range(50)]
    assert ctl.job(sha_batch(msgs)) == (0, sha_ref(msgs))
    assert ctl.job(sha_batch([])) == (0, b"")                          # the empty batch
    for data in SHA_MALFORMED:
        assert ctl.job(data) == (1, b"")


def test_mandelbrot(ctl: Controller, build_dir: Path) -> None:
    ctl.handshake()
    assert ctl.load("mandelbrot", core_bytes(build_dir, "mandelbrot")).kind == wire.V1_OK
    tile = (-2.0, -1.25, 2.5 / 32, 2.5 / 24, 32, 24, 200)
    code, out = ctl.job(mandel_input(*tile))
    assert code == 0
    assert list(struct.unpack(f"<{32 * 24}I", out)) == mandel_ref(*tile)


# -- jobs ---------------------------------------------------------------------------

def test_echo_jobs_pipelined_keep_ids_and_order(echo: Controller) -> None:
    sizes = [0, 1, 17, 4096, 0, 65536, 3, 1 << 20]
    sent = []
    for i, size in enumerate(sizes):
        data = random.Random(i).randbytes(size)
        echo.send(wire.v1_job(1000 + i, 7 + i, data))
        sent.append(data)
    for i, data in enumerate(sent):
        f = echo.recv()
        assert f is not None and (f.kind, f.msg_id) == (wire.V1_OK, 1000 + i)
        code, out = wire.v1_parse_job_result(f.payload)
        assert (code, bytes(out)) == (0, data)


def test_ids_at_the_boundaries(echo: Controller) -> None:
    for msg_id in (0, 2**32, 2**64 - 1):
        f = echo.request(wire.v1_job(msg_id, 2**64 - 1, b"id"))
        assert (f.kind, f.msg_id) == (wire.V1_OK, msg_id)
        code, out = wire.v1_parse_job_result(f.payload)
        assert (code, bytes(out)) == (0, b"id")


def test_a_core_may_write_into_its_job_data(ctl: Controller, build_dir: Path) -> None:
    ctl.handshake()
    assert ctl.load("scribble", core_bytes(build_dir, "scribble")).kind == wire.V1_OK
    # pipelined, so a socket worker may receive several frames in one read: a core
    # writing into one job's data must not touch the next job's
    for i in range(5):
        ctl.send(wire.v1_job(200 + i, i, f"job {i} data".encode()))
    for i in range(5):
        f = ctl.recv()
        assert f is not None and f.msg_id == 200 + i
        code, out = wire.v1_parse_job_result(f.payload)
        assert (code, bytes(out)) == (0, f"JOB {i} DATA".encode())


def test_nonzero_exit_is_a_result(ctl: Controller, build_dir: Path) -> None:
    ctl.handshake()
    assert ctl.load("nonzero", core_bytes(build_dir, "nonzero")).kind == wire.V1_OK
    assert ctl.job(b"abc") == (7, b"failed:abc")
    assert ctl.job(b"") == (7, b"failed:")


def test_job_before_a_core(ctl: Controller) -> None:
    ctl.handshake()
    f = ctl.request(wire.v1_job(9, 1, b"data"))
    assert (f.kind, f.msg_id) == (wire.V1_ERROR, 9)
    assert "no compute core loaded" in wire.v1_parse_error(f.payload)


def test_missing_symbols_then_a_good_core(ctl: Controller, build_dir: Path) -> None:
    ctl.handshake()
    f = ctl.load("bad", core_bytes(build_dir, "missing_symbols"), msg_id=11)
    assert (f.kind, f.msg_id) == (wire.V1_ERROR, 11)
    text = wire.v1_parse_error(f.payload)
    assert "worker_run_job" in text and "worker_free_outdata" in text and "does not export" in text
    f = ctl.request(wire.v1_job(12, 1, b"x"))
    assert f.kind == wire.V1_ERROR                  # the worker stays alive, still without a core
    assert ctl.load("echo", core_bytes(build_dir, "echo"), msg_id=13).kind == wire.V1_OK
    assert ctl.job(b"back") == (0, b"back")


def test_failing_init(ctl: Controller, build_dir: Path) -> None:
    ctl.handshake()
    assert ctl.load("echo", core_bytes(build_dir, "echo")).kind == wire.V1_OK
    f = ctl.load("fail_init", core_bytes(build_dir, "fail_init"), msg_id=21)
    assert (f.kind, f.msg_id) == (wire.V1_ERROR, 21)
    assert "worker_init(1) returned 42" in wire.v1_parse_error(f.payload)
    # the failed load replaced the old core with none: a job must not run on echo
    f = ctl.request(wire.v1_job(22, 1, b"x"))
    assert (f.kind, f.msg_id) == (wire.V1_ERROR, 22)


def test_garbage_library(ctl: Controller) -> None:
    ctl.handshake()
    f = ctl.load("junk", b"this is not a shared object", msg_id=31)
    assert (f.kind, f.msg_id) == (wire.V1_ERROR, 31)
    assert "cannot load the library" in wire.v1_parse_error(f.payload)


def test_replacing_a_core(ctl: Controller, build_dir: Path) -> None:
    ctl.handshake()
    for _ in range(2):
        assert ctl.load("echo", core_bytes(build_dir, "echo")).kind == wire.V1_OK
        assert ctl.job(b"q") == (0, b"q")
        assert ctl.load("sha256", core_bytes(build_dir, "sha256")).kind == wire.V1_OK
        assert ctl.job(sha_batch([b"q"])) == (0, hashlib.sha256(b"q").digest())


def test_malformed_payload_is_an_error_and_the_worker_goes_on(echo: Controller) -> None:
    bad = wire.v1_frame(wire.V1_MSG_JOB, 41, b"\x01\x00")          # a job payload of 2 bytes
    f = echo.request(bad)
    assert (f.kind, f.msg_id) == (wire.V1_ERROR, 41)
    assert "malformed job message" in wire.v1_parse_error(f.payload)
    f = echo.request(wire.v1_frame(wire.V1_ERROR, 42, b"?"))       # a response type sent as a message
    assert (f.kind, f.msg_id) == (wire.V1_ERROR, 42)
    assert echo.job(b"still here") == (0, b"still here")


def test_unknown_type_on_a_socket_ends_the_connection(build_dir: Path) -> None:
    for argv in ([sys.executable, "-m", "fabric.services.spawner.worker", "--connect"], [str(build_worker(build_dir))]):
        c = SocketController(argv)
        try:
            c.handshake()
            c.send(b"\x09" + (51).to_bytes(8, "little") + (0).to_bytes(8, "little"))
            f = c.recv()
            assert f is not None and (f.kind, f.msg_id) == (wire.V1_ERROR, 51)
            assert "unknown v1 message type 0x09" in wire.v1_parse_error(f.payload)
            assert c.recv() is None
            assert c.wait() == 1
        finally:
            c.close()


def test_unknown_type_on_a_ring_is_skipped() -> None:
    c = RingController()
    try:
        c.handshake()
        c.send(b"\x09" + (52).to_bytes(8, "little") + (0).to_bytes(8, "little"))
        f = c.recv()
        assert f is not None and (f.kind, f.msg_id) == (wire.V1_ERROR, 52)
        c.send(b"\x03\x01")                                          # a record too short for a header
        f = c.recv()
        assert f is not None and (f.kind, f.msg_id) == (wire.V1_ERROR, 0)
        c.handshake()                                                # one record = one frame: it goes on
    finally:
        c.close()


def test_a_reply_too_large_for_the_result_ring_is_an_error(build_dir: Path) -> None:
    c = RingController(capacity=1 << 16)
    try:
        c.handshake()
        assert c.load("nonzero", core_bytes(build_dir, "nonzero")).kind == wire.V1_OK
        # the job fills a whole record; its output is 3 bytes longer ("failed:" is 7, the
        # result header 4 shorter than the job's), so the reply cannot be pushed
        size = c.prod.max_record - 33
        f = c.request(wire.v1_job(91, 1, b"j" * size))
        assert (f.kind, f.msg_id) == (wire.V1_ERROR, 91)
        assert "cannot be sent on the result ring" in wire.v1_parse_error(f.payload)
        assert c.job(b"small") == (7, b"failed:small")   # the worker goes on
    finally:
        c.close()


# -- crashes --------------------------------------------------------------------------

@pytest.mark.parametrize("name, sig", [("segfault", signal.SIGSEGV), ("abort", signal.SIGABRT)])
def test_a_crashing_core_kills_only_its_worker(ctl: Controller, build_dir: Path, name: str, sig: int) -> None:
    ctl.handshake()
    assert ctl.load(name, core_bytes(build_dir, name)).kind == wire.V1_OK
    ctl.send(wire.v1_job(61, 1, b"boom"))
    assert ctl.recv() is None                 # EOF, no reply
    assert ctl.wait() == -sig


def test_an_endless_job_never_answers(ctl: Controller, build_dir: Path) -> None:
    ctl.handshake()
    assert ctl.load("loop", core_bytes(build_dir, "loop")).kind == wire.V1_OK
    ctl.send(wire.v1_job(71, 1, b""))
    with pytest.raises((TimeoutError, socket.timeout)):
        ctl.recv(timeout=0.5)
    assert ctl.proc.poll() is None            # still running the job: the pool's timeout kills it


# -- the built-in Python core --------------------------------------------------------

def _py_job(fn: Any, *args: Any, **kwargs: Any) -> bytes:
    return cloudpickle.dumps((fn, args, kwargs))


def test_python_core(pyctl: Controller) -> None:
    pyctl.handshake()
    f = pyctl.load("fabric.python", b"")
    assert f.kind == wire.V1_OK, _describe(f)
    scale = 3

    def f1(x: int, *, y: int = 0) -> dict[str, int]:
        return {"sum": (x + y) * scale}

    code, out = pyctl.job(_py_job(f1, 4, y=5))
    assert (code, pickle.loads(out)) == (0, {"sum": 27})
    code, out = pyctl.job(_py_job(hashlib.sha256, b"abc"))
    assert code == 1                          # the result (a hash object) cannot be pickled
    assert pickle.loads(out)[0] == "TypeError"


def test_python_core_exception(pyctl: Controller) -> None:
    pyctl.handshake()
    assert pyctl.load("fabric.python", b"").kind == wire.V1_OK

    def boom(n: int) -> None:
        raise KeyError(f"missing {n}")

    code, out = pyctl.job(_py_job(boom, 7))
    type_name, message, tb = pickle.loads(out)
    assert (code, type_name, message) == (1, "KeyError", "'missing 7'")
    assert "boom" in tb and "KeyError" in tb
    code, out = pyctl.job(b"not a pickle")
    assert code == 1 and pickle.loads(out)[0] == "UnpicklingError"
    code, out = pyctl.job(_py_job(sys.exit, 3))          # a job's SystemExit does not end the worker
    assert code == 1 and pickle.loads(out)[0] == "SystemExit"
    assert pickle.loads(pyctl.job(_py_job(len, "four"))[1]) == 4


def test_c_worker_has_no_python_core(build_dir: Path) -> None:
    c = SocketController([str(build_worker(build_dir))])
    try:
        c.handshake()
        f = c.load("fabric.python", b"", msg_id=81)
        assert (f.kind, f.msg_id) == (wire.V1_ERROR, 81)
        assert "no built-in cores" in wire.v1_parse_error(f.payload)
    finally:
        c.close()


# -- ring lifecycle -------------------------------------------------------------------

def test_ring_worker_exits_when_ring_in_is_shut_down() -> None:
    c = RingController()
    try:
        c.handshake()
        c.prod.shutdown()
        assert c.wait() == 0
        assert c.recv() is None               # it shut its result ring down on the way out
    finally:
        c.close()


def test_ring_worker_dies_with_its_parent(tmp_path: Path) -> None:
    base = f"/dev/shm/fabric-ring-test-worker-{uuid.uuid4().hex[:12]}"
    paths = [f"{base}-in", f"{base}-out"]
    for p in paths:
        ring.create(p, 1 << 16)
    try:
        # a parent that starts the worker, prints its pid and exits at once
        parent = subprocess.run(
            [sys.executable, "-c",
             "import subprocess, sys; p = subprocess.Popen([sys.executable, '-m', 'fabric.services.spawner.worker', "
             f"'--ring-in', {paths[0]!r}, '--ring-out', {paths[1]!r}]); print(p.pid); "
             "import time; time.sleep(1.0)"],
            env=_env(), capture_output=True, text=True, timeout=TIMEOUT, check=True)
        pid = int(parent.stdout.strip())
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        assert not _alive(pid), "the worker outlived its parent"
    finally:
        for p in paths:
            ring.unlink(p)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# -- TCP ------------------------------------------------------------------------------

@pytest.mark.parametrize("worker", ["python", "c"])
def test_tcp_connect(build_dir: Path, worker: str) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))                  # a random free port
    listener.listen(1)
    listener.settimeout(TIMEOUT)
    port = listener.getsockname()[1]
    argv = ([sys.executable, "-m", "fabric.services.spawner.worker", "--connect", f"tcp:127.0.0.1:{port}"]
            if worker == "python" else [str(build_worker(build_dir)), f"127.0.0.1:{port}"])
    proc = subprocess.Popen(argv, env=_env(), stdin=subprocess.DEVNULL)
    try:
        sock, _ = listener.accept()
        sock.settimeout(TIMEOUT)
        sock.sendall(wire.v1_version(1) + wire.v1_core(2, "echo", core_bytes(build_dir, "echo"))
                     + wire.v1_job(3, 4, b"over tcp"))
        dec, frames = wire.V1Decoder(), []
        while len(frames) < 3:
            chunk = sock.recv(1 << 16)
            assert chunk, "the worker closed the connection"
            frames += dec.feed(chunk)
        assert [(f.kind, f.msg_id) for f in frames] == [(wire.V1_OK, 1), (wire.V1_OK, 2), (wire.V1_OK, 3)]
        code, out = wire.v1_parse_job_result(frames[2].payload)
        assert (code, bytes(out)) == (0, b"over tcp")
        sock.close()                                 # EOF at a frame boundary: a clean exit
        assert proc.wait(TIMEOUT) == 0
    finally:
        listener.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)

"""The example compute cores (examples/cores/*.c) against Python references, loaded in-process.

Each core is compiled with gcc (tests/_cores.py) and loaded the way the worker
loads it (fabric.services.spawner.worker_core.CCore: memfd + dlopen).  The cores that
crash on purpose (segfault, abort, loop) are exercised only in worker
processes (tests/test_worker.py).
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from fabric.services.spawner.worker_core import CCore, CoreError, PythonCore, load_core
from tests._cores import (
    EXAMPLES,
    SHA_MALFORMED,
    TEST_CORES,
    build_core,
    mandel_input,
    mandel_ref,
    matmul_input,
    matmul_ref,
    sha_batch,
    sha_ref,
)

pytestmark = pytest.mark.unit  # no server, no service process: `pytest -m unit`


def _load(build_dir: Path, src: Path) -> CCore:
    return CCore(src.stem, build_core(src, build_dir).read_bytes())


@pytest.fixture()
def core(request: pytest.FixtureRequest, build_dir: Path) -> Iterator[CCore]:
    c = _load(build_dir, EXAMPLES / f"{request.param}.c")
    yield c
    c.close()


# -- matmul ----------------------------------------------------------------------

@pytest.mark.parametrize("core", ["matmul"], indirect=True)
@pytest.mark.parametrize("n, k, m", [(1, 1, 1), (2, 3, 4), (7, 5, 3), (16, 16, 16), (1, 33, 1), (0, 3, 2), (3, 0, 2)])
def test_matmul_matches_python(core: CCore, n: int, k: int, m: int) -> None:
    rnd = random.Random(n * 1000 + k * 10 + m)
    a = [rnd.uniform(-10, 10) for _ in range(n * k)]
    b = [rnd.uniform(-10, 10) for _ in range(k * m)]
    rc, out = core.run(matmul_input(n, k, m, a, b))
    assert rc == 0
    assert list(struct.unpack(f"<{n * m}d", out)) == matmul_ref(n, k, m, a, b)


@pytest.mark.parametrize("core", ["matmul"], indirect=True)
def test_matmul_worked_example(core: CCore) -> None:
    rc, out = core.run(matmul_input(2, 1, 2, [1, 2], [3, 4]))
    assert (rc, out) == (0, struct.pack("<4d", 3, 4, 6, 8))


@pytest.mark.parametrize("core", ["matmul"], indirect=True)
@pytest.mark.parametrize("data", [
    b"", b"\x01\x00\x00\x00", struct.pack("<3I", 1, 1, 1), struct.pack("<3I", 1, 1, 1) + b"\x00" * 24,
    struct.pack("<3I", 2**32 - 1, 2**32 - 1, 2**32 - 1) + b"\x00" * 16,
])
def test_matmul_rejects_wrong_lengths(core: CCore, data: bytes) -> None:
    assert core.run(data) == (1, b"")


@pytest.mark.parametrize("core", ["matmul"], indirect=True)
def test_matmul_refuses_a_product_that_overflows(core: CCore) -> None:
    # k = 0 makes A and B empty, so only the output size can be absurd
    assert core.run(struct.pack("<3I", 2**32 - 1, 0, 2**32 - 1)) == (2, b"")


# -- sha256 ----------------------------------------------------------------------

@pytest.mark.parametrize("core", ["sha256"], indirect=True)
@pytest.mark.parametrize("size", [0, 1, 3, 55, 56, 57, 63, 64, 65, 119, 120, 127, 128, 129, 1000, 65536 + 7])
def test_sha256_matches_hashlib(core: CCore, size: int) -> None:
    data = random.Random(size).randbytes(size)
    assert core.run(sha_batch([data])) == (0, hashlib.sha256(data).digest())


@pytest.mark.parametrize("core", ["sha256"], indirect=True)
def test_sha256_batch_keeps_order(core: CCore) -> None:
    rnd = random.Random(256)
    msgs = [rnd.randbytes(rnd.choice([0, 1, 8, 55, 56, 63, 64, 65, 200, 3000])) for _ in range(300)]
    out = core.run(sha_batch(msgs))
    assert out == (0, sha_ref(msgs)) and len(out[1]) == 32 * len(msgs)
    assert core.run(sha_batch([b""] * 5)) == (0, hashlib.sha256(b"").digest() * 5)
    assert core.run(sha_batch([b"pw", b"pw"])) == (0, hashlib.sha256(b"pw").digest() * 2)


@pytest.mark.parametrize("core", ["sha256"], indirect=True)
def test_sha256_empty_batch(core: CCore) -> None:
    assert sha_batch([]) == b"\x00\x00\x00\x00"
    assert core.run(sha_batch([])) == (0, b"")


@pytest.mark.parametrize("core", ["sha256"], indirect=True)
def test_sha256_known_vector(core: CCore) -> None:
    assert core.run(sha_batch([b"abc"]))[1].hex() == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.mark.parametrize("core", ["sha256"], indirect=True)
@pytest.mark.parametrize("data", SHA_MALFORMED)
def test_sha256_rejects_malformed_batches(core: CCore, data: bytes) -> None:
    assert core.run(data) == (1, b"")
    assert core.run(sha_batch([b"after"])) == (0, hashlib.sha256(b"after").digest())   # no state left behind


# -- mandelbrot ------------------------------------------------------------------

@pytest.mark.parametrize("core", ["mandelbrot"], indirect=True)
@pytest.mark.parametrize("tile", [
    (-2.0, -1.25, 2.5 / 40, 2.5 / 30, 40, 30, 100),
    (-0.75, 0.1, 0.001, 0.001, 17, 9, 500),
    (0.0, 0.0, 0.1, 0.1, 1, 1, 0),
    (-2.0, -1.0, 0.5, 0.5, 0, 5, 10),
])
def test_mandelbrot_matches_python(core: CCore, tile: tuple[float, float, float, float, int, int, int]) -> None:
    rc, out = core.run(mandel_input(*tile))
    w, h = tile[4], tile[5]
    assert rc == 0
    assert list(struct.unpack(f"<{w * h}I", out)) == mandel_ref(*tile)


@pytest.mark.parametrize("core", ["mandelbrot"], indirect=True)
def test_mandelbrot_rejects_bad_input(core: CCore) -> None:
    assert core.run(b"\x00" * 43) == (1, b"")
    assert core.run(b"\x00" * 45) == (1, b"")
    assert core.run(mandel_input(0, 0, 1, 1, 2**16, 2**13, 1)) == (3, b"")


# -- loading ---------------------------------------------------------------------

def test_echo_core_round_trips(build_dir: Path) -> None:
    c = _load(build_dir, TEST_CORES / "echo.c")
    try:
        assert c.run(b"") == (0, b"")
        assert c.run(b"x" * 100_000) == (0, b"x" * 100_000)
    finally:
        c.close()


def test_nonzero_exit_keeps_its_output(build_dir: Path) -> None:
    c = _load(build_dir, TEST_CORES / "nonzero.c")
    try:
        assert c.run(b"abc") == (7, b"failed:abc")
    finally:
        c.close()


def test_missing_symbols_are_named(build_dir: Path) -> None:
    with pytest.raises(CoreError, match="does not export worker_run_job, worker_free_outdata"):
        _load(build_dir, TEST_CORES / "missing_symbols.c")


def test_failing_init_is_reported(build_dir: Path) -> None:
    with pytest.raises(CoreError, match=r"worker_init\(1\) returned 42"):
        _load(build_dir, TEST_CORES / "fail_init.c")


@pytest.mark.parametrize("blob", [b"not an elf file", b"\x7fELF" + b"\x00" * 60])
def test_garbage_library_is_refused(blob: bytes) -> None:
    with pytest.raises(CoreError, match="cannot load the library"):
        CCore("junk", blob)


def test_core_names_are_any_utf8(build_dir: Path) -> None:
    lib = build_core(TEST_CORES / "echo.c", build_dir).read_bytes()
    for name in ("", "with\0nul", "ü/../x" * 100, "\U0001f600" * 300):
        c = CCore(name, lib)
        assert c.run(b"n") == (0, b"n")
        c.close()


def test_empty_library_selects_python_only_by_name() -> None:
    assert isinstance(load_core("fabric.python", b""), PythonCore)
    with pytest.raises(CoreError, match="the library is empty"):
        load_core("other", b"")


def test_two_cores_loaded_one_after_another_are_distinct(build_dir: Path) -> None:
    # dlopen() knows objects by path: /proc/self/fd/N must never hand back an older core
    for _ in range(3):
        echo = _load(build_dir, TEST_CORES / "echo.c")
        assert echo.run(b"q") == (0, b"q")
        echo.close()
        sha = _load(build_dir, EXAMPLES / "sha256.c")
        assert sha.run(sha_batch([b"q"])) == (0, hashlib.sha256(b"q").digest())
        sha.close()

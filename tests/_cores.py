"""Build compute cores and the C worker for tests, and the example cores' Python references.

``build_core(src, out_dir)`` and ``build_worker(out_dir)`` compile; ``matmul_*``, ``sha_*`` and
``mandel_*`` build the example cores' inputs and compute what they must return (shared by
test_cores.py, test_pools.py and test_worker.py).

Each build is cached in *out_dir* under a name that carries the hash of the
source, the shared header and the flags, so a session builds each file once
and an edited source is rebuilt.  Builds go to a temporary name first and are
renamed into place, so two test processes building at once do not collide.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "cores"
TEST_CORES = ROOT / "tests" / "cores"
HEADER = EXAMPLES / "fabric_core.h"
# -ffp-contract=off: no fused multiply-add, so float cores match their Python references bit for bit
CORE_FLAGS = ["-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-ffp-contract=off"]
WORKER_FLAGS = ["-O2", "-Wall", "-Wextra", "-std=gnu11"]


def _build(src: Path, out_dir: Path, suffix: str, flags: list[str], libs: list[str]) -> Path:
    h = hashlib.sha256()
    for part in (src.read_bytes(), HEADER.read_bytes(), " ".join(flags + libs).encode()):
        h.update(part)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{src.stem}-{h.hexdigest()[:16]}{suffix}"
    if out.exists():
        return out
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    proc = subprocess.run(["gcc", *flags, str(src), "-o", str(tmp), *libs],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"gcc failed on {src}:\n{proc.stderr}")
    os.replace(tmp, out)
    return out


def build_core(src: Path, out_dir: Path) -> Path:
    """Compile one compute core source to a ``.so`` in *out_dir* (cached by content)."""
    return _build(Path(src), Path(out_dir), ".so", CORE_FLAGS, [])


def build_worker(out_dir: Path) -> Path:
    """Compile ``examples/cores/worker.c`` (the C external worker) in *out_dir* (cached)."""
    return _build(EXAMPLES / "worker.c", Path(out_dir), "", WORKER_FLAGS, ["-ldl"])


# -- references ------------------------------------------------------------------

def matmul_input(n: int, k: int, m: int, a: list[float], b: list[float]) -> bytes:
    return struct.pack(f"<3I{n * k}d{k * m}d", n, k, m, *a, *b)


def matmul_ref(n: int, k: int, m: int, a: list[float], b: list[float]) -> list[float]:
    out = []
    for i in range(n):
        for j in range(m):
            acc = 0.0
            for p in range(k):
                acc += a[i * k + p] * b[p * m + j]
            out.append(acc)
    return out


def sha_batch(msgs: list[bytes]) -> bytes:
    """The sha256 core's input: count u32 | count x (len u32 | bytes)."""
    return struct.pack("<I", len(msgs)) + b"".join(struct.pack("<I", len(m)) + m for m in msgs)


def sha_ref(msgs: list[bytes]) -> bytes:
    return b"".join(hashlib.sha256(m).digest() for m in msgs)


# inputs the sha256 core must refuse with exit code 1 and no output
SHA_MALFORMED = [
    b"",                                                         # no count
    b"\x01\x00\x00",                                              # a count cut short
    struct.pack("<I", 1),                                        # one record promised, none there
    struct.pack("<I", 1) + b"\x03\x00",                          # a length cut short
    struct.pack("<II", 1, 4) + b"abc",                           # a length one past the end
    struct.pack("<II", 1, 2**32 - 1) + b"abc",                   # a length far past the end
    struct.pack("<I", 2) + struct.pack("<I", 1) + b"a",          # the second record missing
    struct.pack("<II", 2, 2**32 - 1) + struct.pack("<I", 0),     # a huge length, then a record
    struct.pack("<I", 2**32 - 1) + struct.pack("<I", 0) * 3,     # a huge count
    struct.pack("<I", 1) + struct.pack("<I", 1) + b"ab",         # a trailing byte
    struct.pack("<I", 0) + b"\x00",                              # trailing bytes after an empty batch
    struct.pack("<I", 0) + struct.pack("<I", 0),                 # a record beyond count
]


def mandel_input(x0: float, y0: float, dx: float, dy: float, w: int, h: int, it: int) -> bytes:
    return struct.pack("<4d3I", x0, y0, dx, dy, w, h, it)


def mandel_ref(x0: float, y0: float, dx: float, dy: float, w: int, h: int, max_iter: int) -> list[int]:
    out = []
    for row in range(h):
        ci = y0 + row * dy
        for col in range(w):
            cr = x0 + col * dx
            zr = zi = 0.0
            it = 0
            while it < max_iter:
                zr2, zi2 = zr * zr, zi * zi
                if zr2 + zi2 > 4.0:
                    break
                zi = 2.0 * zr * zi + ci
                zr = zr2 - zi2 + cr
                it += 1
            out.append(it)
    return out

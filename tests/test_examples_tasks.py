"""The task examples (examples/tasks/) run end to end against a real one-node fabric.

A JetStream nats-server, the spawner, the gpu-monitor (which registers the node) and the
scheduler run in this process; each example runs as ``python examples/tasks/<name>.py
--nats-url URL`` with small sizes, as a user would run it against ``fabric up``.  The
examples check themselves (exit code 1 on a mismatch); these tests also check what they
wrote, with references of their own: the Mandelbrot PNG is decoded here and compared
pixel for pixel with tests/_cores.py's scalar reference, the matrix product with numpy,
the passwords found with hashes of passwords chosen here.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import struct
import sys
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from tests._cores import EXAMPLES, build_core, mandel_ref
from tests._nats import env_with_repo

pytestmark = pytest.mark.slow

TASKS = Path(__file__).resolve().parent.parent / "examples" / "tasks"


@pytest.fixture(scope="module")
async def fabric_url(js_server: Any, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """A one-node fabric: spawner, gpu-monitor and scheduler on the module's JetStream server."""
    from tests._tasks import one_node_fabric

    async with one_node_fabric(js_server.url, tmp_path_factory.mktemp("examples-state"), prefix="examples"):
        yield js_server.url


async def run_example(name: str, url: str, *args: str) -> str:
    """Run examples/tasks/<name>.py against *url* (in a subprocess: this loop keeps serving the fabric);
    its output, once it exited 0."""
    proc = await asyncio.create_subprocess_exec(sys.executable, str(TASKS / f"{name}.py"), "--nats-url", url, *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                                                env=env_with_repo())
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"{name}.py exited {proc.returncode}:\n{text}"
    return text


def load_example(name: str) -> ModuleType:
    """An example as a module (its main() does not run)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", TASKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_png(data: bytes) -> np.ndarray:
    """An 8-bit RGB PNG (filter 0 rows, as the example writes) as ``height x width x 3``, every chunk's CRC checked."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body), f"bad CRC in {kind!r}"
        chunks.append((kind, body))
        pos += 12 + length
    assert pos == len(data) and chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour, interlace) == (8, 2, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    rows = np.frombuffer(raw, np.uint8).reshape(height, 1 + 3 * width)
    assert not rows[:, 0].any()  # filter type 0 (None) on every row
    return rows[:, 1:].reshape(height, width, 3)


async def test_mandelbrot(fabric_url: str, build_dir: Path, tmp_path: Path) -> None:
    library = build_core(EXAMPLES / "mandelbrot.c", build_dir)
    out = tmp_path / "m.png"
    width, height, max_iter = 96, 64, 100
    text = await run_example("mandelbrot", fabric_url, "--width", str(width), "--height", str(height), "--tile", "28",
                             "--max-iter", str(max_iter), "--core", str(library), "--out", str(out))
    assert "the compute core's image equals the Python tasks' exactly" in text, text
    assert "rendered here equals the fabric's tiles exactly" in text, text

    example = load_example("mandelbrot")
    x0, y0, dx, dy = example.view(width, height)
    counts = np.array(mandel_ref(x0, y0, dx, dy, width, height, max_iter), dtype=np.intp).reshape(height, width)
    assert counts.min() < 5 and counts.max() == max_iter  # the view holds both the set and its outside
    assert np.array_equal(read_png(out.read_bytes()), example.palette(max_iter)[counts])


async def test_matmul(fabric_url: str, tmp_path: Path) -> None:
    out = tmp_path / "c.npz"
    # uneven sizes: edge blocks are smaller; 5x3 blocks of C, 4 products each (so 15 sums on the fabric)
    text = await run_example("matmul", fabric_url, "--n", "70", "--k", "50", "--m", "40", "--block", "16",
                             "--seed", "3", "--out", str(out))
    assert "numpy.allclose(C, A @ B) is True" in text, text
    saved = np.load(out)
    a, b, c = saved["a"], saved["b"], saved["c"]
    assert a.shape == (70, 50) and b.shape == (50, 40) and c.shape == (70, 40)
    assert np.abs(a).sum() > 0 and np.allclose(c, a @ b)


async def test_passwords(fabric_url: str, tmp_path: Path) -> None:
    # candidates over "abc12" up to 3 characters: 5 + 25 + 125 = 155, in batches of 40 (4 tasks)
    hidden = {"sha256": ["ab1", "2"], "sha512": ["c1c", "ba"]}
    lines = [f"{algo}:{hashlib.new(algo, pw.encode()).hexdigest()}" for algo, pws in hidden.items() for pw in pws]
    bare = hashlib.sha256(b"12a").hexdigest()  # a bare digest: sha256 by its length
    outside = f"sha512:{hashlib.sha512(b'abcd').hexdigest()}"  # 4 characters: not a candidate
    targets = tmp_path / "targets.txt"
    targets.write_text("\n".join(["# hashes to find", *lines, bare, outside]) + "\n")
    out = tmp_path / "found.json"
    text = await run_example("passwords", fabric_url, "--alphabet", "abc12", "--max-len", "3", "--batch", "40",
                             "--targets", str(targets), "--out", str(out))
    expected = {f"{algo}:{hashlib.new(algo, pw.encode()).hexdigest()}": pw
                for algo, pws in hidden.items() for pw in pws}
    expected[f"sha256:{bare}"] = "12a"
    assert json.loads(out.read_text()) == expected, text
    assert "not found" in text  # the outside one


async def test_passwords_demo(fabric_url: str) -> None:
    """The demo draws its own targets and checks them; bcrypt's part runs only where bcrypt is installed."""
    text = await run_example("passwords", fabric_url, "--alphabet", "xyz9", "--max-len", "3", "--batch", "20",
                             "--bcrypt-limit", "30", "--seed", "7")
    try:
        import bcrypt  # noqa: F401
    except ImportError:
        assert "bcrypt is not installed here: skipping the bcrypt part" in text, text
        assert "check: 3 of 4 targets found" in text, text
    else:
        assert "check: 5 of 6 targets found" in text, text

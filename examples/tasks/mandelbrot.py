"""The Mandelbrot set rendered as tiles over the fabric: ``fabric up``, then ``python examples/tasks/mandelbrot.py``.

The image is cut into tiles; each tile is one task.  ``fc.map`` runs :func:`render_tile`
(numpy) as Python tasks, and, when the compute core is built (``make -C examples/cores``),
``fc.submit_core("mandelbrot", ...)`` runs the same tiles on the C core, loaded on every
node first (a core task runs only where a pool of that name is live).  Tiles are placed
as they end (``fabric.as_completed``) under a progress bar (``fc.progress``); the image is
written as a PNG by the small writer below (zlib only).

The check: a window of the image (the whole image when small) is rendered here and must
equal the fabric's pixels exactly, and the core's image must equal numpy's.  Exactness
holds because the pixel size is a power of two and the corner a multiple of it: every
pixel's coordinate is then the same double however the image is cut into tiles
(:func:`view`), and the C core does the arithmetic in the order :func:`render_tile` does.
"""

from __future__ import annotations

import argparse
import math
import struct
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from fabric import FabricClient, as_completed

HERE = Path(__file__).resolve().parent
DEFAULT_CORE = HERE.parent / "cores" / "libmandelbrot.so"
#: the check renders at most this window here (the whole image when it is smaller)
CHECK_WINDOW = 128

Spec = tuple[float, float, float, float, int, int, int]  # x0, y0, dx, dy, width, height, max_iter


def render_tile(x0: float, y0: float, dx: float, dy: float, width: int, height: int, max_iter: int) -> np.ndarray:
    """Iteration counts of a tile (``height x width`` uint32): pixel (col, row) has
    ``c = (x0 + col*dx) + (y0 + row*dy)i``; count ``z = z^2 + c`` from 0 while ``|z|^2 <= 4``,
    at most *max_iter* times.  The operations are those of examples/cores/mandelbrot.c,
    in its order, so both give the same counts.  This function runs on the nodes."""
    cr = np.tile(x0 + np.arange(width, dtype=np.float64) * dx, height)
    ci = np.repeat(y0 + np.arange(height, dtype=np.float64) * dy, width)
    counts = np.zeros(width * height, dtype=np.uint32)
    idx = np.arange(width * height)
    zr = np.zeros_like(cr)
    zi = np.zeros_like(ci)
    for it in range(max_iter):
        zr2, zi2 = zr * zr, zi * zi
        escaped = zr2 + zi2 > 4.0  # as C's test: a NaN does not escape
        if escaped.any():  # the escaped keep the count they have; only the others go on
            keep = ~escaped
            idx, zr, zi, zr2, zi2, cr, ci = idx[keep], zr[keep], zi[keep], zr2[keep], zi2[keep], cr[keep], ci[keep]
            if idx.size == 0:
                break
        zi = 2.0 * zr * zi + ci
        zr = zr2 - zi2 + cr
        counts[idx] = it + 1
    return counts.reshape(height, width)


def view(width: int, height: int, center: tuple[float, float] = (-0.75, 0.0), zoom: float = 1.0) \
        -> tuple[float, float, float, float]:
    """``(x0, y0, dx, dy)`` of an image about *center*, about 3/zoom wide; row 0 is the top.

    The pixel size is a power of two and the corner a multiple of it, so ``x0 + n*dx`` is
    exact for every column n: a tile starting at column t computes the same coordinates
    as the whole image does (``(x0 + t*dx) + col*dx == x0 + (t + col)*dx``)."""
    exp = math.floor(math.log2(width * zoom / 3.0))
    step = math.ldexp(1.0, -exp)
    x0 = (round(center[0] / step) - width // 2) * step
    y0 = (round(center[1] / step) + height // 2) * step
    return x0, y0, step, -step


def tiles(width: int, height: int, size: int) -> list[tuple[int, int, int, int]]:
    """``(col, row, width, height)`` of each tile, row by row; the last ones may be smaller."""
    return [(c, r, min(size, width - c), min(size, height - r))
            for r in range(0, height, size) for c in range(0, width, size)]


def tile_spec(corner: tuple[float, float, float, float], tile: tuple[int, int, int, int], max_iter: int) -> Spec:
    x0, y0, dx, dy = corner
    c, r, w, h = tile
    return (x0 + c * dx, y0 + r * dy, dx, dy, w, h, max_iter)


def core_input(spec: Spec) -> bytes:
    """The mandelbrot core's job: ``x0 f64 | y0 f64 | dx f64 | dy f64 | width u32 | height u32 | max_iter u32``."""
    return struct.pack("<4d3I", *spec)


def palette(max_iter: int) -> np.ndarray:
    """RGB of each count 0..max_iter: a smooth ramp outside the set, black inside (count == max_iter)."""
    t = np.sqrt(np.arange(max_iter + 1, dtype=np.float64) / max(max_iter, 1))  # sqrt: low counts show
    rgb = np.stack([9 * (1 - t) * t**3, 15 * (1 - t) ** 2 * t**2, 8.5 * (1 - t) ** 3 * t], axis=1)
    out: np.ndarray = (np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8)
    out[max_iter] = 0
    return out


def png(rgb: np.ndarray) -> bytes:
    """A PNG (8-bit RGB, no interlace, filter 0 on every row) of an ``height x width x 3`` uint8 array."""
    height, width, _ = rgb.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, width * 3)], axis=1)
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
            + chunk(b"IEND", b""))


def load_core_everywhere(fc: FabricClient, library: Path) -> list[str]:
    """Load the core as pool "mandelbrot" on every live node (the scheduler may place a tile on any)."""
    nodes = [n.node for n in fc.nodes() if n.status == "up"]
    for node in nodes:
        # a pool outlives this client; unload_after lets it go once nobody has used it for a minute
        core = fc.load_core("mandelbrot", library, node=node, unload_after=60)
        print(f"core {core.name!r} on {node}: {'reused' if core.reused else 'loaded'}")
    return nodes


def render(fc: FabricClient, futures: list[Any], placed: list[tuple[int, int, int, int]], decode: Any,
           image: np.ndarray, description: str) -> None:
    """Put each tile's counts into *image* as its task ends."""
    where = dict(zip(futures, placed, strict=True))
    with fc.progress(futures, description=description):
        for fut in as_completed(futures, timeout=600):
            c, r, w, h = where[fut]
            image[r:r + h, c:c + w] = decode(fut.result(), w, h)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--nats-url", default=None, help="NATS URL (default: $FABRIC_NATS_URL or fabric up's)")
    p.add_argument("--width", type=int, default=800)
    p.add_argument("--height", type=int, default=600)
    p.add_argument("--tile", type=int, default=100, help="tile side in pixels (one task each)")
    p.add_argument("--max-iter", type=int, default=256)
    p.add_argument("--center", type=float, nargs=2, default=(-0.75, 0.0), metavar=("X", "Y"))
    p.add_argument("--zoom", type=float, default=1.0)
    p.add_argument("--core", type=Path, default=DEFAULT_CORE,
                   help="the mandelbrot compute core (make -C examples/cores); rendered by it too when it exists")
    p.add_argument("--no-core", action="store_true", help="render with Python tasks only")
    p.add_argument("--out", type=Path, default=Path("mandelbrot.png"))
    args = p.parse_args(argv)
    if min(args.width, args.height, args.tile, args.max_iter) < 1 or args.tile > 4096:
        p.error("width, height, tile and max-iter must be positive (tile at most 4096)")

    corner = view(args.width, args.height, tuple(args.center), args.zoom)
    placed = tiles(args.width, args.height, args.tile)
    specs = [tile_spec(corner, t, args.max_iter) for t in placed]
    print(f"{args.width}x{args.height}, {len(placed)} tiles of up to {args.tile}x{args.tile}, "
          f"max_iter {args.max_iter}, corner ({corner[0]:g}, {corner[1]:g}), pixel {corner[2]:g}")

    with FabricClient(args.nats_url) as fc:
        image = np.zeros((args.height, args.width), dtype=np.uint32)
        futures = fc.map(render_tile, *zip(*specs, strict=True))
        render(fc, futures, placed, lambda counts, w, h: counts, image, "python tiles")

        core_image = None
        if args.no_core:
            pass
        elif not args.core.exists():
            print(f"no compute core at {args.core}: build it with `make -C examples/cores` to render with it too "
                  "(skipped)")
        else:
            load_core_everywhere(fc, args.core)
            core_image = np.zeros_like(image)
            futures = [fc.submit_core("mandelbrot", core_input(s)) for s in specs]
            render(fc, futures, placed, lambda out, w, h: np.frombuffer(out, "<u4").reshape(h, w), core_image,
                   "core tiles")

    # the check: a window rendered here in one piece must match the tiles exactly
    cw, ch = min(args.width, CHECK_WINDOW), min(args.height, CHECK_WINDOW)
    cc, cr = (args.width - cw) // 2, (args.height - ch) // 2
    local = render_tile(*tile_spec(corner, (cc, cr, cw, ch), args.max_iter))
    failed = False
    if not np.array_equal(local, image[cr:cr + ch, cc:cc + cw]):
        print(f"MISMATCH: the {cw}x{ch} window at ({cc}, {cr}) rendered here differs from the fabric's tiles")
        failed = True
    else:
        print(f"check: the {cw}x{ch} window at ({cc}, {cr}) rendered here equals the fabric's tiles exactly")
    if core_image is not None:
        if np.array_equal(core_image, image):
            print("check: the compute core's image equals the Python tasks' exactly")
        else:
            diff = int(np.count_nonzero(core_image != image))
            print(f"MISMATCH: the compute core's image differs from the Python tasks' in {diff} pixels")
            failed = True

    args.out.write_bytes(png(palette(args.max_iter)[image]))
    print(f"wrote {args.out} ({args.width}x{args.height})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

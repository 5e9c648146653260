"""A blocked matrix product over the fabric: ``fabric up``, then ``python examples/tasks/matmul.py``.

``C = A @ B`` is cut into blocks: ``C[i, j] = sum over p of A[i, p] @ B[p, j]``.  Each
block product is a Python task (``fc.map``, one call per (i, j, p)); each ``C[i, j]`` is
then one more task, :func:`add_blocks`, that takes the futures of its products as its
argument: futures in a task's arguments are dependencies, so the sums run on the fabric
as soon as their products are done, and only the C blocks come back here.  Progress is
drawn by ``fc.progress``; the assembled C is checked with ``numpy.allclose`` against
``A @ B`` computed here.

Every call carries its two blocks, so a block's side is bounded by the NATS server's
max payload (1 MiB by default: two 128x128 float64 blocks are 256 KiB); larger inputs
belong in remote memory (examples/remote_memory.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from fabric import FabricClient, TaskFuture, as_completed


def block_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One block product (runs on a node)."""
    product: np.ndarray = a @ b
    return product


def add_blocks(parts: list[np.ndarray]) -> np.ndarray:
    """The sum of one C block's products (runs on a node, once its products are done)."""
    total = parts[0].copy()
    for part in parts[1:]:
        total += part
    return total


def spans(size: int, block: int) -> list[slice]:
    return [slice(start, min(start + block, size)) for start in range(0, size, block)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nats-url", default=None, help="NATS URL (default: $FABRIC_NATS_URL or fabric up's)")
    p.add_argument("--n", type=int, default=512, help="rows of A and C")
    p.add_argument("--k", type=int, default=512, help="columns of A, rows of B")
    p.add_argument("--m", type=int, default=512, help="columns of B and C")
    p.add_argument("--block", type=int, default=128, help="block side (a call carries two blocks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="save A, B and C here (.npz)")
    args = p.parse_args(argv)
    if min(args.n, args.k, args.m, args.block) < 1:
        p.error("sizes and block must be positive")

    rng = np.random.default_rng(args.seed)
    a = rng.standard_normal((args.n, args.k))
    b = rng.standard_normal((args.k, args.m))
    rows, inner, cols = spans(args.n, args.block), spans(args.k, args.block), spans(args.m, args.block)
    print(f"A {a.shape} @ B {b.shape}: {len(rows)}x{len(cols)} blocks of C, {len(inner)} products each, "
          f"{len(rows) * len(cols) * len(inner)} product tasks and {len(rows) * len(cols)} sums")

    c = np.zeros((args.n, args.m))
    with FabricClient(args.nats_url) as fc:
        keys = [(i, j, q) for i in range(len(rows)) for j in range(len(cols)) for q in range(len(inner))]
        products = fc.map(block_product, [a[rows[i], inner[q]] for i, j, q in keys],
                          [b[inner[q], cols[j]] for i, j, q in keys])
        by_block: dict[tuple[int, int], list[TaskFuture]] = {}
        for (i, j, _), fut in zip(keys, products, strict=True):
            by_block.setdefault((i, j), []).append(fut)
        # one product: that is the block; more: a sum task that depends on them
        sums = {ij: (parts[0] if len(parts) == 1 else fc.submit(add_blocks, parts)) for ij, parts in by_block.items()}
        where = {fut: ij for ij, fut in sums.items()}
        with fc.progress(products + [f for f in sums.values() if f not in products], description="blocks"):
            for fut in as_completed(list(sums.values()), timeout=600):
                i, j = where[fut]
                c[rows[i], cols[j]] = fut.result()

    expected = a @ b
    ok = np.allclose(c, expected)
    err = float(np.max(np.abs(c - expected))) if c.size else 0.0
    print(f"check: numpy.allclose(C, A @ B) is {ok} (largest difference {err:.3g})")
    if args.out is not None:
        np.savez(args.out, a=a, b=b, c=c)
        print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

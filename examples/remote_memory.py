"""Remote memory in a dozen lines: run `fabric up` first, then `python examples/remote_memory.py`.

Allocates a block, writes and reads it, shares a read-only handle, batches reads,
and shows the typed errors a use-after-free and a double free raise.
"""

import os

from fabric import DoubleFree, FabricClient, StaleHandle

url = os.environ.get("FABRIC_NATS_URL", "nats://127.0.0.1:4222")
with FabricClient(url) as fc:
    buf = fc.rmalloc(1024)
    fc.rwrite(buf, b"hello", offset=0)
    print("read:", fc.rread(buf, 5))

    ro = fc.rshare(buf)
    print("read-only handle:", ro)
    buf[5:11] = b" world"
    print("through the read-only handle:", fc.rread(ro, 11))

    others = [fc.rmalloc(64) for _ in range(3)]
    fc.rwritev([(b, 0, f"block {i}".encode()) for i, b in enumerate(others)])
    print("batch:", fc.rreadv([(b, 0, 7) for b in others]))
    for b in others:
        b.free()

    fc.rfree(buf)
    try:
        fc.rread(buf, 5)
    except StaleHandle as exc:
        print("use after free ->", exc.code, exc.kind)
    try:
        fc.rfree(buf)
    except DoubleFree as exc:
        print("double free ->", exc.code, exc.kind)

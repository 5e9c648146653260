"""Build compute cores and the C worker for tests: ``build_core(src, out_dir)``, ``build_worker(out_dir)``.

Each build is cached in *out_dir* under a name that carries the hash of the
source, the shared header and the flags, so a session builds each file once
and an edited source is rebuilt.  Builds go to a temporary name first and are
renamed into place, so two test processes building at once do not collide.
"""

from __future__ import annotations

import hashlib
import os
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

"""Builds the fake ``libnvidia-ml.so.1`` (tests/fakenvml/fake_nvml.c) that stands in for a GPU driver.

The real pynvml and the real :class:`fabric.services.gpu_monitor.nvml.NvmlProbe` run against it
in a subprocess whose ``LD_LIBRARY_PATH`` starts with the returned directory (pynvml
loads ``CDLL("libnvidia-ml.so.1")`` once per process, so each behaviour gets its own
process).  See the C file's header for the ``FAKE_NVML_*`` variables it reads.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).parent / "fakenvml" / "fake_nvml.c"
LIBRARY = "libnvidia-ml.so.1"

_built: dict[Path, Path] = {}   # dest_dir -> dest_dir, once per test session


def build_fake_nvml(dest_dir: Path) -> Path:
    """Compile the fake NVML into *dest_dir*/libnvidia-ml.so.1 (once per session); returns *dest_dir*."""
    dest_dir = Path(dest_dir).resolve()
    if dest_dir in _built:
        return dest_dir
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) to build the fake NVML library")
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = dest_dir / LIBRARY
    # -Wl,-soname: the name pynvml asks the dynamic loader for
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-Wall", f"-Wl,-soname,{LIBRARY}",
                    "-o", str(out), str(SOURCE)], check=True, capture_output=True, text=True)
    _built[dest_dir] = dest_dir
    return dest_dir

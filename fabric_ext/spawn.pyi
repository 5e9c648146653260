"""Type stub of fabric_ext.spawn: clone+exec in C with the child's setup (see spawn.pyx)."""

from collections.abc import Iterable
from os import PathLike

__all__ = ["spawn", "ChildSetupError", "STEPS", "MAX_RLIMITS"]

MAX_RLIMITS: int
STEPS: dict[int, str]

class ChildSetupError(OSError):
    step: str
    def __init__(self, step: str, errno: int) -> None: ...

_Path = str | bytes | PathLike[str] | PathLike[bytes]

def spawn(
    path: _Path,
    argv: list[str] | list[bytes] | list[str | bytes],
    env: list[str] | list[bytes] | list[str | bytes],
    *,
    stdin: int = -1,
    stdout: int = -1,
    stderr: int = -1,
    cwd: _Path | None = None,
    process_group: int = 0,
    cgroup_fd: int = -1,
    unshare_flags: int = 0,
    rlimits: Iterable[tuple[int, int, int]] = (),
    uid: int | None = None,
    gid: int | None = None,
    pdeathsig: int = 0,
    no_new_privs: bool = False,
) -> tuple[int, int]: ...

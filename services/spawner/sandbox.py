"""What this node can do to isolate a child, found out for real at start-up.

* ``no_new_privs``: ``prctl(PR_SET_NO_NEW_PRIVS)`` (Linux >= 3.5);
* ``network``: a new network namespace.  ``unshare(CLONE_NEWNET)`` needs
  CAP_SYS_ADMIN; without it, a new user namespace first (``CLONE_NEWUSER``) where the
  kernel allows unprivileged ones.  The probe runs the call in a forked child, so
  "available" means the kernel did it here, not that a header declares it;
* ``user``: switching to another user needs CAP_SETUID/CAP_SETGID (or the same uid).

The probes use libc through ctypes; the children themselves apply the same calls
in C between clone and exec (:mod:`fabric_ext.spawn`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import pwd
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["SandboxCaps", "detect", "resolve_user", "CLONE_NEWNET", "CLONE_NEWUSER"]

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39

CAP_SETGID = 6
CAP_SETUID = 7
CAP_SYS_ADMIN = 21
CAP_SYS_RESOURCE = 24

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.unshare.argtypes = [ctypes.c_int]


def prctl(option: int, arg: int = 0) -> None:
    if _libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare({flags:#x}): {os.strerror(err)}")


def effective_caps() -> int:
    """This process's effective capability bits (``CapEff`` of /proc/self/status)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


def has_cap(cap: int) -> bool:
    return bool(effective_caps() >> cap & 1)


@dataclass(frozen=True)
class SandboxCaps:
    """Which sandbox options this node applies, and why not where it does not."""

    no_new_privs: str | None  # None = available, else the reason it is not
    network: str | None
    netns_flags: int  # what the child passes to unshare()
    user: str | None
    #: root with CAP_SYS_ADMIN/CAP_SYS_RESOURCE ignores RLIMIT_NPROC
    nproc_bypass: bool
    #: CAP_SYS_RESOURCE: rlimits may be set above the spawner's own hard limits
    raise_rlimits: bool = False


def _probe_in_child(fn: Callable[[], object]) -> str | None:
    """Run *fn* in a forked child; None if it returned, else the error it raised."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(r)
        code = 0
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - report any failure to the parent
            os.write(w, str(exc).encode()[:500] or b"failed")
            code = 1
        os._exit(code)
    os.close(w)
    chunks = []
    while True:
        data = os.read(r, 4096)
        if not data:
            break
        chunks.append(data)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) == 0:
        return None
    return b"".join(chunks).decode(errors="replace") or "the probe child failed"


def detect() -> SandboxCaps:
    nnp = _probe_in_child(lambda: prctl(PR_SET_NO_NEW_PRIVS, 1))
    net_err = _probe_in_child(lambda: unshare(CLONE_NEWNET))
    flags = CLONE_NEWNET
    if net_err is not None:
        user_err = _probe_in_child(lambda: unshare(CLONE_NEWUSER | CLONE_NEWNET))
        if user_err is None:
            net_err, flags = None, CLONE_NEWUSER | CLONE_NEWNET
        else:
            net_err = f"cannot create a network namespace: {net_err}; with a user namespace: {user_err}"
    user = None if (has_cap(CAP_SETUID) and has_cap(CAP_SETGID)) else \
        "the spawner lacks CAP_SETUID/CAP_SETGID: it can run processes only as its own user"
    bypass = has_cap(CAP_SYS_ADMIN) or has_cap(CAP_SYS_RESOURCE)
    return SandboxCaps(no_new_privs=nnp, network=net_err, netns_flags=flags, user=user, nproc_bypass=bypass,
                       raise_rlimits=has_cap(CAP_SYS_RESOURCE))


def resolve_user(spec: str) -> tuple[int, int]:
    """A user name or numeric uid -> (uid, gid); KeyError if unknown."""
    if spec.isdigit():
        uid = int(spec)
        try:
            return uid, pwd.getpwuid(uid).pw_gid
        except KeyError:
            return uid, uid  # a uid without a passwd entry: its own gid, as containers do
    entry = pwd.getpwnam(spec)
    return entry.pw_uid, entry.pw_gid

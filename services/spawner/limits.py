"""From a spawn request's limits and sandbox to what the child applies, honestly.

:func:`plan` turns :class:`fabric.schema.Limits` and :class:`fabric.schema.Sandbox`
into a :class:`Plan`: the rlimits to set, the namespaces to leave, the user to
become, the cgroup to join -- and two lists the spawn reply returns verbatim:
``enforced`` (applied by the kernel for this process) and ``unenforced`` (asked for,
not applicable here, with the reason).  A name is in ``enforced`` only when the
code that applies it runs and raises on failure, so a spawn either applies it or
fails; nothing is claimed on a header's say-so.

The names are ``limits.<field>`` and ``sandbox.<field>``.  Everything but
``wall_s`` (which the spawner enforces itself) is applied in the child, between
clone and exec, by :func:`fabric_ext.spawn.spawn` -- system calls in C, each one
failing the spawn with its errno, in the order that keeps the next one possible:
cgroup, network namespace, rlimits, user switch, parent-death signal, no_new_privs.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass, field

from fabric.errors import BadRequest, NotEnforceable
from fabric.schema import Limits, Sandbox

from .cgroups import CgroupRoot
from .sandbox import SandboxCaps, resolve_user

__all__ = ["Plan", "plan", "RLIMITS"]

#: Limits field -> the rlimit it sets
RLIMITS: dict[str, int] = {
    "cpu_s": resource.RLIMIT_CPU,
    "address_space": resource.RLIMIT_AS,
    "open_files": resource.RLIMIT_NOFILE,
    "processes": resource.RLIMIT_NPROC,
    "file_size": resource.RLIMIT_FSIZE,
}


@dataclass
class Plan:
    """What one spawn applies in the child (and what the reply may call enforced)."""

    enforced: list[str] = field(default_factory=list)
    unenforced: dict[str, str] = field(default_factory=dict)
    rlimits: list[tuple[int, int, int]] = field(default_factory=list)  # (resource, soft, hard)
    no_new_privs: bool = False
    netns_flags: int = 0
    uid: int | None = None
    gid: int | None = None
    mem_bytes: int | None = None  # cgroup memory limit, bytes
    wall_s: float | None = None
    cpu_s: int | None = None

    @property
    def needs_child(self) -> bool:
        """Whether the child applies anything (such a process also gets the parent-death signal)."""
        return bool(self.rlimits or self.no_new_privs or self.netns_flags or self.mem_bytes is not None
                    or self.uid is not None)


def _clamp(res: int, value: int, privileged: bool) -> tuple[int, int]:
    """(soft, hard) for *value*; an unprivileged spawner cannot go above its own hard limit."""
    if not privileged:
        _, hard = resource.getrlimit(res)
        if hard != resource.RLIM_INFINITY and value > hard:
            return hard, hard  # the inherited limit is stricter, and applies anyway
    return value, value


def plan(limits: Limits | None, sandbox: Sandbox | None, caps: SandboxCaps, cgroups: CgroupRoot | None,
         cgroup_reason: str, *, strict: bool) -> Plan:
    p = Plan()
    if limits is None and sandbox is None:  # the common case: nothing to decide
        return p
    privileged = caps.raise_rlimits
    if sandbox is not None:
        if sandbox.user is not None:
            try:
                uid, gid = resolve_user(sandbox.user)
            except KeyError:
                raise BadRequest(f"sandbox.user: no user {sandbox.user!r} on this node") from None
            if caps.user is not None and uid != os.getuid():
                p.unenforced["sandbox.user"] = caps.user
            else:
                p.uid, p.gid = uid, gid
                p.enforced.append("sandbox.user")
        if sandbox.no_new_privs:
            if caps.no_new_privs is None:
                p.no_new_privs = True
                p.enforced.append("sandbox.no_new_privs")
            else:
                p.unenforced["sandbox.no_new_privs"] = caps.no_new_privs
        if not sandbox.network:
            if caps.network is None:
                p.netns_flags = caps.netns_flags
                p.enforced.append("sandbox.network")
            else:
                p.unenforced["sandbox.network"] = caps.network
    if limits is not None:
        for name, res in RLIMITS.items():
            value = getattr(limits, name)
            if value is None:
                continue
            if name == "processes" and caps.nproc_bypass and (p.uid is None or p.uid == 0):
                p.unenforced["limits.processes"] = (
                    "the process would run as root with CAP_SYS_ADMIN/CAP_SYS_RESOURCE, which the kernel "
                    "exempts from RLIMIT_NPROC: set sandbox.user to a non-root user")
                continue
            if value > 2**63 - 1:
                raise BadRequest(f"limits.{name} is too large ({value})")
            if name == "cpu_s":
                if value == 0:
                    raise BadRequest("limits.cpu_s must be at least 1 second")
                # soft: SIGXCPU; one second later the hard limit's SIGKILL
                _, hard = _clamp(res, value + 1, privileged)
                p.rlimits.append((res, min(value, hard), hard))
                p.cpu_s = value
            else:
                p.rlimits.append((res, *_clamp(res, value, privileged)))
            p.enforced.append(f"limits.{name}")
        if limits.mem_bytes is not None:
            if cgroups is None:
                p.unenforced["limits.mem_bytes"] = cgroup_reason
            else:
                p.mem_bytes = limits.mem_bytes
                p.enforced.append("limits.mem_bytes")
        if limits.wall_s is not None:
            if limits.wall_s <= 0:
                raise BadRequest("limits.wall_s must be positive")
            p.wall_s = limits.wall_s
            p.enforced.append("limits.wall_s")
    if strict and p.unenforced:
        detail = "; ".join(f"{k}: {v}" for k, v in p.unenforced.items())
        raise NotEnforceable(f"cannot enforce {', '.join(p.unenforced)} on this node ({detail}); "
                             "send strict=false to run without them", unenforced=dict(p.unenforced))
    return p

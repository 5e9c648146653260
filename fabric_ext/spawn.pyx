"""Start a process in one system-call sequence: clone(CLONE_VM|CLONE_VFORK), the
child's setup, execve -- in C, with no Python in the child.

The spawner's only way of starting processes.  Everything a child applies (process
group, default signals, stdio, close-on-exec for every other descriptor, working
directory, cgroup, network namespace, rlimits, user switch, parent-death signal,
no_new_privs) is done by async-signal-safe system calls between clone and exec (see
``include/fabric_spawn.h``), so a process with limits starts as fast as one without,
and a step that fails is reported back with its errno before :func:`spawn` returns:

* the exec itself failing raises the ``OSError`` subclass of its errno
  (``FileNotFoundError`` for a missing executable, ``PermissionError``, ...);
* a setup step failing raises :class:`ChildSetupError` (``.step``, ``.errno``);
* nothing ran: ``OSError`` (out of descriptors or processes: ``EMFILE``, ``EAGAIN``).

    >>> import os
    >>> pid, pidfd = spawn(b"/bin/true", [b"true"], [b"PATH=/bin"])
    >>> os.waitpid(pid, 0)[1], os.close(pidfd)
    (0, None)
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.string cimport memchr

import os

__all__ = ["spawn", "ChildSetupError", "STEPS", "MAX_RLIMITS"]

#: the most rlimits one spawn sets
MAX_RLIMITS = FABRIC_SPAWN_MAX_RLIMITS

#: step number -> what the child was doing
STEPS = {
    FABRIC_SPAWN_SETPGID: "setpgid",
    FABRIC_SPAWN_SIGNALS: "signal dispositions",
    FABRIC_SPAWN_STDIO: "stdio",
    FABRIC_SPAWN_FDS: "close-on-exec of inherited descriptors",
    FABRIC_SPAWN_CHDIR: "chdir",
    FABRIC_SPAWN_CGROUP: "joining the cgroup",
    FABRIC_SPAWN_UNSHARE: "unshare (namespaces)",
    FABRIC_SPAWN_RLIMIT: "setrlimit",
    FABRIC_SPAWN_SETGROUPS: "setgroups",
    FABRIC_SPAWN_SETGID: "setgid",
    FABRIC_SPAWN_SETUID: "setuid",
    FABRIC_SPAWN_PDEATHSIG: "prctl(PR_SET_PDEATHSIG)",
    FABRIC_SPAWN_NO_NEW_PRIVS: "prctl(PR_SET_NO_NEW_PRIVS)",
    FABRIC_SPAWN_EXEC: "execve",
    FABRIC_SPAWN_PIPE: "the error pipe",
    FABRIC_SPAWN_CLONE: "clone",
    FABRIC_SPAWN_PIDFD: "pidfd_open",
}


class ChildSetupError(OSError):
    """Raised when the child failed a setup step before exec (``step`` names it)."""

    def __init__(self, step: str, errno: int) -> None:
        super().__init__(errno, f"{step}: {os.strerror(errno)}")
        self.step = step


cdef bytes _c_string(object value, str what):
    cdef bytes b = os.fsencode(value) if not isinstance(value, bytes) else value
    if memchr(PyBytes_AS_STRING(b), 0, <size_t>PyBytes_GET_SIZE(b)) != NULL:
        raise ValueError(f"{what} must not contain null bytes")
    return b


cdef char **_c_array(list items, list keep, str what) except NULL:
    """A NULL-terminated char* array of *items* (kept alive by *keep*)."""
    cdef Py_ssize_t i, n = len(items)
    cdef char **arr = <char **>PyMem_Malloc((n + 1) * sizeof(char *))
    cdef bytes b
    if arr == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            b = _c_string(items[i], what)
            keep.append(b)
            arr[i] = PyBytes_AS_STRING(b)
    except BaseException:
        PyMem_Free(arr)
        raise
    arr[n] = NULL
    return arr


def spawn(path, list argv, list env, *, int stdin=-1, int stdout=-1, int stderr=-1, cwd=None,
          int process_group=0, int cgroup_fd=-1, int unshare_flags=0, rlimits=(), uid=None, gid=None,
          int pdeathsig=0, bint no_new_privs=False):
    """Start *path* with *argv* and *env* (``KEY=VALUE`` strings); returns ``(pid, pidfd)``.

    *stdin*/*stdout*/*stderr* are descriptors that become 0/1/2 (-1: ``/dev/null``);
    *process_group* is the ``setpgid`` target (0: a new group led by the child, -1:
    the spawner's); *rlimits* is ``(resource, soft, hard)`` triples.  The pidfd is
    close-on-exec and belongs to the caller.
    """
    cdef fabric_spawn_args a
    cdef list keep = []
    cdef bytes b_path = _c_string(path, "the executable path")
    cdef bytes b_cwd
    cdef int pidfd = -1, step = 0, err = 0, i = 0
    cdef pid_t pid
    limits = list(rlimits)
    if len(limits) > FABRIC_SPAWN_MAX_RLIMITS:
        raise ValueError(f"at most {FABRIC_SPAWN_MAX_RLIMITS} rlimits")
    if not argv:
        raise ValueError("argv must not be empty")
    a.path = PyBytes_AS_STRING(b_path)
    a.cwd = NULL
    if cwd is not None:
        b_cwd = _c_string(cwd, "cwd")
        a.cwd = PyBytes_AS_STRING(b_cwd)
    a.fd_in, a.fd_out, a.fd_err = stdin, stdout, stderr
    a.pgid = process_group
    a.cgroup_fd = cgroup_fd
    a.unshare_flags = unshare_flags
    a.n_rlimits = len(limits)
    for i, (res, soft, hard) in enumerate(limits):
        a.rlimits[i].resource = res
        # resource.RLIM_INFINITY may read -1: the all-ones rlim_t it stands for
        a.rlimits[i].soft = soft & 0xFFFFFFFFFFFFFFFF
        a.rlimits[i].hard = hard & 0xFFFFFFFFFFFFFFFF
    a.uid = -1 if uid is None else uid
    a.gid = -1 if gid is None else gid
    a.pdeathsig = pdeathsig
    a.no_new_privs = no_new_privs
    a.argv = NULL
    a.envp = NULL
    try:
        a.argv = _c_array(argv, keep, "argv strings")
        a.envp = _c_array(env, keep, "environment strings")
        # the GIL stays held: one spawn at a time (one child stack), and the parent
        # is suspended only until the child has exec'd
        pid = fabric_spawn(&a, &pidfd, &step, &err)
    finally:
        PyMem_Free(<void *>a.argv)
        PyMem_Free(<void *>a.envp)
    if pid > 0:
        return pid, pidfd
    if step == FABRIC_SPAWN_EXEC or step >= FABRIC_SPAWN_PIPE:
        raise OSError(err, os.strerror(err), os.fsdecode(b_path) if step == FABRIC_SPAWN_EXEC else None)
    raise ChildSetupError(STEPS.get(step, f"step {step}"), err)

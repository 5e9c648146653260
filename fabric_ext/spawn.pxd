# Declarations of fabric_ext.spawn: the C spawner in include/fabric_spawn.h.

from libc.stdint cimport uint64_t
from posix.types cimport pid_t


cdef extern from "fabric_spawn.h" nogil:
    enum:
        FABRIC_SPAWN_OK
        FABRIC_SPAWN_SETPGID
        FABRIC_SPAWN_SIGNALS
        FABRIC_SPAWN_STDIO
        FABRIC_SPAWN_FDS
        FABRIC_SPAWN_CHDIR
        FABRIC_SPAWN_CGROUP
        FABRIC_SPAWN_UNSHARE
        FABRIC_SPAWN_RLIMIT
        FABRIC_SPAWN_SETGROUPS
        FABRIC_SPAWN_SETGID
        FABRIC_SPAWN_SETUID
        FABRIC_SPAWN_PDEATHSIG
        FABRIC_SPAWN_NO_NEW_PRIVS
        FABRIC_SPAWN_EXEC
        FABRIC_SPAWN_PIPE
        FABRIC_SPAWN_CLONE
        FABRIC_SPAWN_PIDFD
        FABRIC_SPAWN_MAX_RLIMITS

    ctypedef struct fabric_rlimit:
        int resource
        uint64_t soft
        uint64_t hard

    ctypedef struct fabric_spawn_args:
        const char *path           # what execve() runs
        char *const *argv          # NULL-terminated
        char *const *envp          # NULL-terminated
        const char *cwd            # NULL: the parent's
        int fd_in                  # becomes 0; -1: /dev/null
        int fd_out                 # becomes 1; -1: /dev/null
        int fd_err                 # becomes 2; -1: /dev/null
        int pgid                   # setpgid(0, pgid); -1: the parent's group
        int cgroup_fd              # an open cgroup.procs the child writes its pid to; -1: none
        int unshare_flags          # unshare() flags; 0: none
        int n_rlimits              # entries used in rlimits
        fabric_rlimit rlimits[16]  # (resource, soft, hard) set by the child
        long uid                   # switch to this uid; -1: none
        long gid                   # with this gid (-1: the uid's number)
        int pdeathsig              # the signal the child gets when the spawner dies; 0: none
        int no_new_privs           # prctl(PR_SET_NO_NEW_PRIVS) before exec

    pid_t fabric_spawn(fabric_spawn_args *a, int *pidfd, int *step, int *err)

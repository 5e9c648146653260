/* fabric_spawn.h -- start a process with clone(CLONE_VM|CLONE_VFORK) and exec, in C.
 *
 * The child shares the parent's memory until execve(), so between clone() and
 * execve() it makes system calls only: no malloc, no locks, no Python, nothing that
 * is not async-signal-safe.  Everything it needs (argv, envp, the rlimits, the path
 * of its cgroup's procs file) is prepared by the parent before the clone.  The
 * parent is suspended until the child has exec'd or exited (CLONE_VFORK), which also
 * makes sharing the parent thread's errno harmless.
 *
 * A step that fails in the child is reported through a CLOEXEC pipe as two ints
 * (step, errno) and the child exits 127 without running anything: the pipe reads
 * empty when execve() succeeded.  The pid comes back with a pidfd (CLONE_PIDFD, or
 * pidfd_open() where clone() does not take the flag).
 *
 * Order of the steps in the child (each one keeps the next possible): process group,
 * signal dispositions back to default, stdio, every other descriptor marked
 * close-on-exec, working directory, cgroup, network namespace, rlimits, user switch
 * (groups, gid, uid: raw system calls, one thread's credentials), parent-death
 * signal (after the switch: the kernel clears it when credentials change),
 * no_new_privs, signal mask, execve.
 */
#ifndef FABRIC_SPAWN_H
#define FABRIC_SPAWN_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef CLONE_PIDFD
#define CLONE_PIDFD 0x00001000
#endif
#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif
#ifndef PR_SET_NO_NEW_PRIVS
#define PR_SET_NO_NEW_PRIVS 38
#endif

/* the step that failed, as reported to the parent */
enum {
    FABRIC_SPAWN_OK = 0,
    FABRIC_SPAWN_SETPGID,
    FABRIC_SPAWN_SIGNALS,
    FABRIC_SPAWN_STDIO,
    FABRIC_SPAWN_FDS,
    FABRIC_SPAWN_CHDIR,
    FABRIC_SPAWN_CGROUP,
    FABRIC_SPAWN_UNSHARE,
    FABRIC_SPAWN_RLIMIT,
    FABRIC_SPAWN_SETGROUPS,
    FABRIC_SPAWN_SETGID,
    FABRIC_SPAWN_SETUID,
    FABRIC_SPAWN_PDEATHSIG,
    FABRIC_SPAWN_NO_NEW_PRIVS,
    FABRIC_SPAWN_EXEC,
    /* parent-side steps (no child ran) */
    FABRIC_SPAWN_PIPE,
    FABRIC_SPAWN_CLONE,
    FABRIC_SPAWN_PIDFD,
};

#define FABRIC_SPAWN_MAX_RLIMITS 16
#define FABRIC_SPAWN_STACK (64 * 1024)

typedef struct {
    int resource;
    uint64_t soft, hard;
} fabric_rlimit;

typedef struct {
    const char *path;          /* what execve() runs */
    char *const *argv;         /* NULL-terminated */
    char *const *envp;         /* NULL-terminated */
    const char *cwd;           /* NULL: the parent's */
    int fd_in, fd_out, fd_err; /* become 0, 1, 2; -1: /dev/null */
    int pgid;                  /* setpgid(0, pgid); -1: stay in the parent's group */
    int cgroup_fd;             /* an open cgroup.procs to write our pid to; -1: none */
    int unshare_flags;         /* 0: none */
    int n_rlimits;
    fabric_rlimit rlimits[FABRIC_SPAWN_MAX_RLIMITS];
    long uid, gid;             /* -1: no switch */
    int pdeathsig;             /* 0: none */
    int no_new_privs;
    /* set by fabric_spawn for the child */
    int err_fd;
    sigset_t mask;             /* the parent's mask, restored just before execve */
} fabric_spawn_args;

static void fabric_spawn_report(int fd, int step, int err) {
    int msg[2] = {step, err};
    ssize_t n;
    do {
        n = write(fd, msg, sizeof(msg));
    } while (n < 0 && errno == EINTR);
    _exit(127);
}

/* the decimal digits of v into buf (no NUL); returns the length */
static int fabric_spawn_utoa(char *buf, unsigned long v) {
    char tmp[24];
    int n = 0, i;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    for (i = 0; i < n; i++) buf[i] = tmp[n - 1 - i];
    return n;
}

/* dup2 that also clears close-on-exec when from == to */
static int fabric_spawn_dup_to(int from, int to) {
    if (from == to) {
        int flags = fcntl(from, F_GETFD);
        return flags < 0 ? -1 : fcntl(from, F_SETFD, flags & ~FD_CLOEXEC);
    }
    return dup2(from, to) < 0 ? -1 : 0;
}

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FABRIC_NO_SANITIZE __attribute__((no_sanitize("address", "undefined")))
#endif
#endif
#ifndef FABRIC_NO_SANITIZE
#if defined(__SANITIZE_ADDRESS__)
#define FABRIC_NO_SANITIZE __attribute__((no_sanitize_address, no_sanitize("undefined")))
#else
#define FABRIC_NO_SANITIZE
#endif
#endif

FABRIC_NO_SANITIZE static int fabric_spawn_child(void *arg) {
    fabric_spawn_args *a = (fabric_spawn_args *)arg;
    int fd = a->err_fd, i, sig;
    int src[3];
    struct sigaction sa;

    if (a->pgid >= 0 && setpgid(0, a->pgid) < 0) fabric_spawn_report(fd, FABRIC_SPAWN_SETPGID, errno);

    /* Every handled signal back to its default: a handler is the parent's code, and it
     * must not run in this child while the memory is shared.  Ignored SIGPIPE/SIGXFSZ
     * (Python ignores them) back to default too: an ignored signal stays ignored across
     * exec.  Signals are all blocked (the parent did it) until just before execve(). */
    memset(&sa, 0, sizeof(sa));
    for (sig = 1; sig < NSIG; sig++) {
        struct sigaction old;
        if (sig == SIGKILL || sig == SIGSTOP) continue;
        if (sigaction(sig, NULL, &old) < 0) continue; /* one glibc reserves */
        if (old.sa_handler == SIG_DFL) continue;
        if (old.sa_handler == SIG_IGN && sig != SIGPIPE && sig != SIGXFSZ) continue;
        sa.sa_handler = SIG_DFL;
        if (sigaction(sig, &sa, NULL) < 0)
            fabric_spawn_report(fd, FABRIC_SPAWN_SIGNALS, errno);
    }

    /* stdio: first move sources out of 0..2 so that no dup2 clobbers a later source */
    src[0] = a->fd_in;
    src[1] = a->fd_out;
    src[2] = a->fd_err;
    for (i = 0; i < 3; i++) {
        if (src[i] < 0) {
            src[i] = open("/dev/null", (i == 0 ? O_RDONLY : O_WRONLY) | O_CLOEXEC);
            if (src[i] < 0) fabric_spawn_report(fd, FABRIC_SPAWN_STDIO, errno);
        }
        if (src[i] < 3 && src[i] != i) {
            src[i] = fcntl(src[i], F_DUPFD_CLOEXEC, 3);
            if (src[i] < 0) fabric_spawn_report(fd, FABRIC_SPAWN_STDIO, errno);
        }
    }
    for (i = 0; i < 3; i++)
        if (fabric_spawn_dup_to(src[i], i) < 0) fabric_spawn_report(fd, FABRIC_SPAWN_STDIO, errno);

    /* nothing but 0, 1, 2 crosses exec: not the parent's NATS socket, rings or pidfds,
     * whatever a library forgot to open close-on-exec (this pipe closes on exec too) */
    if (syscall(SYS_close_range, 3U, ~0U, CLOSE_RANGE_CLOEXEC) < 0) {
        if (errno != ENOSYS && errno != EINVAL) fabric_spawn_report(fd, FABRIC_SPAWN_FDS, errno);
        /* an old kernel: mark them one by one up to the descriptor limit */
        struct rlimit rl;
        long top = getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < 65536 ? (long)rl.rlim_cur : 65536;
        for (long f = 3; f < top; f++) {
            int flags = fcntl((int)f, F_GETFD);
            if (flags >= 0 && !(flags & FD_CLOEXEC)) fcntl((int)f, F_SETFD, flags | FD_CLOEXEC);
        }
    }

    if (a->cwd != NULL && chdir(a->cwd) < 0) fabric_spawn_report(fd, FABRIC_SPAWN_CHDIR, errno);

    /* the cgroup first: a user namespace would take away the right to join it */
    if (a->cgroup_fd >= 0) {
        char buf[24];
        int n = fabric_spawn_utoa(buf, (unsigned long)getpid());
        if (write(a->cgroup_fd, buf, (size_t)n) != n) fabric_spawn_report(fd, FABRIC_SPAWN_CGROUP, errno);
    }
    if (a->unshare_flags && unshare(a->unshare_flags) < 0) fabric_spawn_report(fd, FABRIC_SPAWN_UNSHARE, errno);
    for (i = 0; i < a->n_rlimits; i++) {
        struct rlimit rl;
        rl.rlim_cur = (rlim_t)a->rlimits[i].soft;
        rl.rlim_max = (rlim_t)a->rlimits[i].hard;
        if (setrlimit(a->rlimits[i].resource, &rl) < 0) fabric_spawn_report(fd, FABRIC_SPAWN_RLIMIT, errno);
    }
    /* raw system calls: glibc's wrappers would try to switch every thread of the
     * process they think this is (the parent's), and this child is one thread */
    if (a->uid >= 0) {
        if (syscall(SYS_setgroups, 0, NULL) < 0) fabric_spawn_report(fd, FABRIC_SPAWN_SETGROUPS, errno);
        long gid = a->gid >= 0 ? a->gid : a->uid;
        if (syscall(SYS_setresgid, gid, gid, gid) < 0) fabric_spawn_report(fd, FABRIC_SPAWN_SETGID, errno);
        if (syscall(SYS_setresuid, a->uid, a->uid, a->uid) < 0) fabric_spawn_report(fd, FABRIC_SPAWN_SETUID, errno);
    }
    if (a->pdeathsig > 0 && prctl(PR_SET_PDEATHSIG, (unsigned long)a->pdeathsig, 0UL, 0UL, 0UL) < 0)
        fabric_spawn_report(fd, FABRIC_SPAWN_PDEATHSIG, errno);
    if (a->no_new_privs && prctl(PR_SET_NO_NEW_PRIVS, 1UL, 0UL, 0UL, 0UL) < 0)
        fabric_spawn_report(fd, FABRIC_SPAWN_NO_NEW_PRIVS, errno);

    if (sigprocmask(SIG_SETMASK, &a->mask, NULL) < 0)
        fabric_spawn_report(fd, FABRIC_SPAWN_SIGNALS, errno);
    execve(a->path, a->argv, a->envp);
    fabric_spawn_report(fd, FABRIC_SPAWN_EXEC, errno);
    return 127;
}

/* the child's stack: one spawn at a time (the caller serialises), allocated once */
static char *fabric_spawn_stack = NULL;

/* Start the child.  Returns its pid (>0) and *pidfd; or -1 with *step and *err saying
 * what failed (a child that failed is already reaped). */
static pid_t fabric_spawn(fabric_spawn_args *a, int *pidfd, int *step, int *err) {
    int pipefd[2], msg[2], status;
    sigset_t all;
    pid_t pid;
    ssize_t n;
    size_t got = 0;

    *pidfd = -1;
    *step = FABRIC_SPAWN_OK;
    *err = 0;
    if (fabric_spawn_stack == NULL) {
        void *p = mmap(NULL, FABRIC_SPAWN_STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK,
                       -1, 0);
        if (p == MAP_FAILED) {
            *step = FABRIC_SPAWN_CLONE;
            *err = errno;
            return -1;
        }
        fabric_spawn_stack = (char *)p;
    }
    if (pipe2(pipefd, O_CLOEXEC) < 0) {
        *step = FABRIC_SPAWN_PIPE;
        *err = errno;
        return -1;
    }
    a->err_fd = pipefd[1];
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &a->mask);
    pid = clone(fabric_spawn_child, fabric_spawn_stack + FABRIC_SPAWN_STACK,
                CLONE_VM | CLONE_VFORK | CLONE_PIDFD | SIGCHLD, a, pidfd);
    if (pid < 0 && errno == EINVAL) { /* a kernel before 5.2: no CLONE_PIDFD */
        *pidfd = -1;
        pid = clone(fabric_spawn_child, fabric_spawn_stack + FABRIC_SPAWN_STACK, CLONE_VM | CLONE_VFORK | SIGCHLD,
                    a, NULL);
    }
    *err = errno;
    pthread_sigmask(SIG_SETMASK, &a->mask, NULL);
    close(pipefd[1]);
    if (pid < 0) {
        close(pipefd[0]);
        *step = FABRIC_SPAWN_CLONE;
        return -1;
    }
    while (got < sizeof(msg)) {
        n = read(pipefd[0], (char *)msg + got, sizeof(msg) - got);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        got += (size_t)n;
    }
    close(pipefd[0]);
    if (got == sizeof(msg)) { /* the child failed a step and exited */
        if (*pidfd >= 0) close(*pidfd);
        *pidfd = -1;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
        }
        *step = msg[0];
        *err = msg[1];
        return -1;
    }
    if (*pidfd < 0) {
        *pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
        if (*pidfd < 0) { /* it runs but cannot be watched: it must not run */
            *err = errno;
            kill(a->pgid == 0 ? -pid : pid, SIGKILL);
            while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
            }
            *step = FABRIC_SPAWN_PIDFD;
            return -1;
        }
    }
    *err = 0;
    return pid;
}

#endif /* FABRIC_SPAWN_H */

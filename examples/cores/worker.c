/* fabric-worker: an external compute worker in C (worker socket protocol version 1).
 *
 *     fabric-worker HOST:PORT | tcp:HOST:PORT | unix:PATH
 *
 * Connects to a controller (a spawner pool's listening socket) and serves it
 * exactly as `python -m fabric.services.spawner.worker --connect ...` does:
 *   0x01 version exchange: accepts version 1 (reply 0x01 [1]); any other version
 *        is answered 0x01 [0] and the worker exits.
 *   0x02 new compute core: the .so blob goes into a memfd and is dlopen()ed from
 *        /proc/self/fd/N; worker_init(1) is called.  Missing symbols, a failed
 *        dlopen or a nonzero worker_init answer 0xFF (the worker keeps serving
 *        and waits for another core).
 *   0x03 new job: worker_run_job, reply 0x01 (i32 exit code, blob output)
 *        whatever the exit code, then worker_free_outdata.  No core: 0xFF.
 * The built-in cores ("fabric.python", "fabric.opencl") exist only in the Python worker.
 * All integers are little-endian; this file assumes a little-endian host.
 * Build: gcc -O2 -std=gnu11 worker.c -o fabric-worker -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#define V1_HEADER 17
#define MAX_PAYLOAD ((uint64_t)1 << 30)

typedef int32_t (*init_fn)(int32_t);
typedef int32_t (*run_fn)(uint64_t, void *, uint64_t *, void **);
typedef void (*free_fn)(uint64_t, void *);

static int sock = -1;
static int versioned = 0;
static struct {
    void *lib;          /* dlopen handle, NULL when no core is loaded */
    int fd;             /* its memfd, open while loaded (dlopen knows objects by path) */
    run_fn run;
    free_fn free_out;
} core = {NULL, -1, NULL, NULL};

static void put_le64(unsigned char *p, uint64_t v) { memcpy(p, &v, 8); }
static uint64_t get_le64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }

static int read_exact(void *buf, size_t n, int *eof_at_start)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(sock, (char *)buf + got, n - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            if (eof_at_start)
                *eof_at_start = (r == 0 && got == 0);
            return -1;
        }
        got += (size_t)r;
    }
    return 0;
}

static void write_iov(struct iovec *iov, int cnt)
{
    while (cnt > 0) {
        ssize_t w = writev(sock, iov, cnt);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0) {
            perror("fabric-worker: write");
            exit(1);
        }
        while (cnt > 0 && (size_t)w >= iov->iov_len) {
            w -= (ssize_t)iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt > 0) {
            iov->iov_base = (char *)iov->iov_base + w;
            iov->iov_len -= (size_t)w;
        }
    }
}

static void reply(uint8_t kind, uint64_t id, const void *a, uint64_t alen, const void *b, uint64_t blen)
{
    unsigned char hdr[V1_HEADER];
    hdr[0] = kind;
    put_le64(hdr + 1, id);
    put_le64(hdr + 9, alen + blen);
    struct iovec iov[3] = {{hdr, V1_HEADER}, {(void *)a, alen}, {(void *)b, blen}};
    write_iov(iov, 3);
}

static void reply_error(uint64_t id, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    reply(0xFF, id, msg, strlen(msg), NULL, 0);
}

static void unload_core(void)
{
    if (core.lib)
        dlclose(core.lib);
    if (core.fd >= 0)
        close(core.fd);
    core.lib = NULL;
    core.fd = -1;
    core.run = NULL;
    core.free_out = NULL;
}

/* Read a u64-length-prefixed field at *pos; 0 and (start, len) on success, -1 if it runs past n. */
static int take_blob(const unsigned char *p, uint64_t n, uint64_t *pos, uint64_t *start, uint64_t *len)
{
    if (n - *pos < 8)
        return -1;
    *len = get_le64(p + *pos);
    *pos += 8;
    if (*len > n - *pos)
        return -1;
    *start = *pos;
    *pos += *len;
    return 0;
}

static void on_core(uint64_t id, unsigned char *p, uint64_t n)
{
    uint64_t pos = 0, ns, nl, ls, ll;
    if (!versioned) {
        reply_error(id, "the version exchange must come first");
        return;
    }
    if (take_blob(p, n, &pos, &ns, &nl) || take_blob(p, n, &pos, &ls, &ll) || pos != n) {
        reply_error(id, "malformed core message: truncated, or trailing bytes");
        return;
    }
    char name[128];
    size_t k = nl < sizeof name - 1 ? nl : sizeof name - 1;
    memcpy(name, p + ns, k);
    name[k] = 0;
    unload_core();   /* a failed load leaves no core: jobs for the new one must not run on the old */
    if (ll == 0) {
        reply_error(id, "core '%s': the library is empty (the C worker has no built-in cores)", name);
        return;
    }
    int fd = memfd_create("fabric-core", MFD_CLOEXEC);
    if (fd < 0) {
        reply_error(id, "core '%s': memfd_create: %s", name, strerror(errno));
        return;
    }
    for (uint64_t off = 0; off < ll;) {
        ssize_t w = write(fd, p + ls + off, ll - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            reply_error(id, "core '%s': writing the library: %s", name, strerror(errno));
            close(fd);
            return;
        }
        off += (uint64_t)w;
    }
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        reply_error(id, "core '%s': cannot load the library: %s", name, dlerror());
        close(fd);
        return;
    }
    init_fn init = (init_fn)dlsym(lib, "worker_init");
    run_fn run = (run_fn)dlsym(lib, "worker_run_job");
    free_fn free_out = (free_fn)dlsym(lib, "worker_free_outdata");
    if (!init || !run || !free_out) {
        reply_error(id, "core '%s': the library does not export%s%s%s (compute core API version 1 needs "
                    "worker_init, worker_run_job, worker_free_outdata)", name,
                    init ? "" : " worker_init", run ? "" : " worker_run_job",
                    free_out ? "" : " worker_free_outdata");
        dlclose(lib);
        close(fd);
        return;
    }
    int32_t rc = init(1);
    if (rc != 0) {
        reply_error(id, "core '%s': worker_init(1) returned %d", name, rc);
        dlclose(lib);
        close(fd);
        return;
    }
    core.lib = lib;
    core.fd = fd;
    core.run = run;
    core.free_out = free_out;
    reply(0x01, id, NULL, 0, NULL, 0);
}

static void on_job(uint64_t id, unsigned char *p, uint64_t n)
{
    uint64_t pos = 8, ds, dl;
    if (!core.lib) {
        reply_error(id, versioned ? "no compute core loaded" : "the version exchange must come first");
        return;
    }
    if (n < 8 || take_blob(p, n, &pos, &ds, &dl) || pos != n) {
        reply_error(id, "malformed job message: truncated, or trailing bytes");
        return;
    }
    uint64_t outsize = 0;
    void *outdata = NULL;
    int32_t rc = core.run(dl, p + ds, &outsize, &outdata);
    if (outsize && !outdata) {
        core.free_out(outsize, outdata);
        reply_error(id, "worker_run_job reported %llu output bytes at a null pointer",
                    (unsigned long long)outsize);
        return;
    }
    unsigned char head[12];
    memcpy(head, &rc, 4);
    put_le64(head + 4, outsize);
    reply(0x01, id, head, sizeof head, outdata, outsize);
    core.free_out(outsize, outdata);
}

static int connect_to(const char *target)
{
    if (strncmp(target, "unix:", 5) == 0) {
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        if (strlen(target + 5) >= sizeof sa.sun_path) {
            fprintf(stderr, "fabric-worker: socket path too long\n");
            return -1;
        }
        strcpy(sa.sun_path, target + 5);
        int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (s < 0 || connect(s, (struct sockaddr *)&sa, sizeof sa) < 0) {
            perror("fabric-worker: connect");
            return -1;
        }
        return s;
    }
    if (strncmp(target, "tcp:", 4) == 0)
        target += 4;
    char host[256];
    const char *colon = strrchr(target, ':');
    if (!colon || colon == target || (size_t)(colon - target) >= sizeof host) {
        fprintf(stderr, "fabric-worker: want HOST:PORT, tcp:HOST:PORT or unix:PATH, not '%s'\n", target);
        return -1;
    }
    memcpy(host, target, (size_t)(colon - target));
    host[colon - target] = 0;
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res, *ai;
    int err = getaddrinfo(host, colon + 1, &hints, &res);
    if (err) {
        fprintf(stderr, "fabric-worker: %s: %s\n", host, gai_strerror(err));
        return -1;
    }
    int s = -1;
    for (ai = res; ai; ai = ai->ai_next) {
        s = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
        if (s >= 0 && connect(s, ai->ai_addr, ai->ai_addrlen) == 0)
            break;
        if (s >= 0)
            close(s);
        s = -1;
    }
    freeaddrinfo(res);
    if (s < 0) {
        perror("fabric-worker: connect");
        return -1;
    }
    int one = 1;
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return s;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s HOST:PORT | tcp:HOST:PORT | unix:PATH\n", argv[0]);
        return 2;
    }
    sock = connect_to(argv[1]);
    if (sock < 0)
        return 1;
    for (;;) {
        unsigned char hdr[V1_HEADER];
        int eof = 0;
        if (read_exact(hdr, V1_HEADER, &eof) < 0)
            return eof ? 0 : 1;
        uint8_t kind = hdr[0];
        uint64_t id = get_le64(hdr + 1), n = get_le64(hdr + 9);
        if ((kind < 0x01 || kind > 0x03) && kind != 0xFF) {
            reply_error(id, "malformed v1 frame: unknown v1 message type 0x%02x; closing the connection", kind);
            return 1;
        }
        if (n > MAX_PAYLOAD) {
            reply_error(id, "malformed v1 frame: v1 payload of %llu bytes, the limit is %llu; closing the connection",
                        (unsigned long long)n, (unsigned long long)MAX_PAYLOAD);
            return 1;
        }
        unsigned char *p = malloc(n ? n : 1);
        if (!p) {
            fprintf(stderr, "fabric-worker: out of memory for a %llu-byte message\n", (unsigned long long)n);
            return 1;
        }
        if (n && read_exact(p, n, NULL) < 0) {
            free(p);
            return 1;
        }
        if (kind == 0x01) {
            if (n != 4) {
                reply_error(id, "malformed version exchange: %llu bytes, expected 4", (unsigned long long)n);
            } else {
                uint32_t v;
                memcpy(&v, p, 4);
                unsigned char yes = v == 1;
                reply(0x01, id, &yes, 1, NULL, 0);
                if (!yes) {
                    free(p);
                    return 0;
                }
                versioned = 1;
            }
        } else if (kind == 0x02) {
            on_core(id, p, n);
        } else if (kind == 0x03) {
            on_job(id, p, n);
        } else {
            reply_error(id, "unexpected message type 0x%02x from the controller", kind);
        }
        free(p);
    }
}

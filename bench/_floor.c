/* The bare-socket floor of bench/mem.py: a TCP server that answers each request with N bytes.
 *
 * A request is 8 bytes -- little-endian u32 reply length N, u32 request length M -- then M
 * bytes, read and dropped; the reply is N bytes from a buffer filled once.  One connection
 * at a time, TCP_NODELAY, blocking I/O: the least a server can do per request, so what a
 * client spends against it is the kernel's and the client's own.
 *
 *     floor IPV4      prints the port it listens on (a free one), then serves until killed
 *
 * bench/_floor.py compiles it with gcc into a temporary directory at bench time.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_LEN (64u << 20) /* a longer length is a broken client: drop the connection */

static int read_full(int fd, unsigned char *p, size_t n) {
    while (n) {
        ssize_t k = recv(fd, p, n, 0);
        if (k == 0)
            return -1;
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

static int write_full(int fd, const unsigned char *p, size_t n) {
    while (n) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

static uint32_t le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

int main(int argc, char **argv) {
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    if (argc != 2 || inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1) {
        fprintf(stderr, "usage: floor IPV4\n");
        return 2;
    }
    int one = 1;
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    if (ls < 0 || setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) ||
        bind(ls, (struct sockaddr *)&addr, sizeof addr) || listen(ls, 4)) {
        perror("floor: listen");
        return 1;
    }
    socklen_t alen = sizeof addr;
    if (getsockname(ls, (struct sockaddr *)&addr, &alen)) {
        perror("floor: getsockname");
        return 1;
    }
    printf("%u\n", (unsigned)ntohs(addr.sin_port));
    fflush(stdout);

    size_t cap = 1u << 20;
    unsigned char *reply = malloc(cap), *scratch = malloc(cap);
    if (!reply || !scratch)
        return 1;
    memset(reply, 'f', cap);
    for (;;) {
        int c = accept(ls, NULL, NULL);
        if (c < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            perror("floor: accept");
            return 1;
        }
        setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        unsigned char head[8];
        while (read_full(c, head, sizeof head) == 0) {
            uint32_t n = le32(head), m = le32(head + 4);
            if (n > MAX_LEN || m > MAX_LEN)
                break;
            size_t need = n > m ? n : m;
            if (need > cap) {
                unsigned char *r = realloc(reply, need), *s = realloc(scratch, need);
                if (r)
                    reply = r;
                if (s)
                    scratch = s;
                if (!r || !s)
                    break;
                memset(reply + cap, 'f', need - cap);
                cap = need;
            }
            if (m && read_full(c, scratch, m))
                break;
            if (write_full(c, reply, n))
                break;
        }
        close(c);
    }
}

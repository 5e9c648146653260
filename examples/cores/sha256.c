/* Compute core: SHA-256 (FIPS 180-4) of a batch of messages, e.g. passwords.
 *
 * Job input (little-endian):  count u32 | count x (len u32 | len bytes)
 * Job output:                 count x 32-byte digest, in input order (0 bytes for count 0)
 * Exit codes: 0 ok; 1 malformed input (a truncated record, a length that runs
 *             past the end, bytes after the last record), no output;
 *             2 out of memory.
 * The whole input is validated before anything is hashed or allocated.
 */
#include <stdlib.h>
#include <string.h>

#include "fabric_core.h"

static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void compress(uint32_t h[8], const unsigned char *block)
{
    uint32_t w[64];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)block[4 * i] << 24 | (uint32_t)block[4 * i + 1] << 16 |
               (uint32_t)block[4 * i + 2] << 8 | (uint32_t)block[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = hh + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
        uint32_t t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        hh = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += hh;
}

static uint32_t load_u32(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);   /* the x86-64/aarch64 hosts fabric runs on are little-endian */
    return v;
}

/* SHA-256 of p[0..len) into out[32] */
static void sha256(const unsigned char *p, uint64_t len, unsigned char *out)
{
    uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                     0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    uint64_t left = len;
    unsigned char tail[128];
    while (left >= 64) {
        compress(h, p);
        p += 64;
        left -= 64;
    }
    /* the last block(s): the rest, 0x80, zeros, the bit length big-endian */
    memset(tail, 0, sizeof tail);
    if (left)
        memcpy(tail, p, left);
    tail[left] = 0x80;
    size_t tail_len = left < 56 ? 64 : 128;
    uint64_t bits = len * 8;
    for (int i = 0; i < 8; i++)
        tail[tail_len - 1 - i] = (unsigned char)(bits >> (8 * i));
    compress(h, tail);
    if (tail_len == 128)
        compress(h, tail + 64);
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (unsigned char)(h[i] >> 24);
        out[4 * i + 1] = (unsigned char)(h[i] >> 16);
        out[4 * i + 2] = (unsigned char)(h[i] >> 8);
        out[4 * i + 3] = (unsigned char)h[i];
    }
}

int32_t worker_init(int32_t version)
{
    return version == FABRIC_CORE_API_VERSION ? 0 : 1;
}

int32_t worker_run_job(uint64_t size, void *data, uint64_t *outsize, void **outdata)
{
    const unsigned char *in = data;
    *outsize = 0;
    *outdata = NULL;
    if (size < 4)
        return 1;
    uint64_t count = load_u32(in);
    /* every record takes at least 4 bytes: this bounds the loop and the output
     * (count * 32 <= 8 * size) before anything else is read */
    if (count > (size - 4) / 4)
        return 1;
    /* validate: off <= size holds throughout, so size - off never wraps */
    uint64_t off = 4;
    for (uint64_t i = 0; i < count; i++) {
        if (size - off < 4)
            return 1;
        uint64_t len = load_u32(in + off);
        off += 4;
        if (len > size - off)
            return 1;
        off += len;
    }
    if (off != size)
        return 1;
    if (count == 0)
        return 0;   /* an empty batch: no digests, no output */
    unsigned char *out = malloc(count * 32);
    if (!out)
        return 2;
    off = 4;
    for (uint64_t i = 0; i < count; i++) {
        uint64_t len = load_u32(in + off);
        sha256(in + off + 4, len, out + 32 * i);
        off += 4 + len;
    }
    *outsize = count * 32;
    *outdata = out;
    return 0;
}

void worker_free_outdata(uint64_t size, void *outdata)
{
    (void)size;
    free(outdata);
}

/* Compute core: dense matrix product C = A x B in float64.
 *
 * Job input (little-endian):  n u32 | k u32 | m u32 | A: n*k f64, row-major | B: k*m f64, row-major
 * Job output:                 C: n*m f64, row-major
 * Exit codes: 0 ok; 1 input shorter/longer than its dimensions say; 2 output too large / out of memory.
 * The dot products are summed in index order (p = 0..k-1), so a plain Python
 * triple loop gives the same doubles.
 */
#include <stdlib.h>
#include <string.h>

#include "fabric_core.h"

static uint32_t load_u32(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);   /* the x86-64/aarch64 hosts fabric runs on are little-endian */
    return v;
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
    if (size < 12)
        return 1;
    uint64_t n = load_u32(in), k = load_u32(in + 4), m = load_u32(in + 8);
    /* n, k, m < 2^32: each product fits in 64 bits; bounding each by size/8
     * keeps the sum and the byte count from wrapping */
    uint64_t na = n * k, nb = k * m;
    if (na > size / 8 || nb > size / 8 || size != 12 + 8 * (na + nb))
        return 1;
    if (m != 0 && n > UINT64_MAX / 8 / m)   /* k == 0 allows a huge all-zero C: refuse to wrap */
        return 2;
    double *out = malloc(n * m != 0 ? n * m * sizeof(double) : 1);
    if (!out)
        return 2;
    const unsigned char *a = in + 12, *b = a + 8 * n * k;
    for (uint64_t i = 0; i < n; i++) {
        for (uint64_t j = 0; j < m; j++) {
            double acc = 0.0;
            for (uint64_t p = 0; p < k; p++) {
                double x, y;
                memcpy(&x, a + 8 * (i * k + p), 8);   /* the input need not be 8-byte aligned */
                memcpy(&y, b + 8 * (p * m + j), 8);
                acc += x * y;
            }
            out[i * m + j] = acc;
        }
    }
    *outsize = n * m * sizeof(double);
    *outdata = out;
    return 0;
}

void worker_free_outdata(uint64_t size, void *outdata)
{
    (void)size;
    free(outdata);
}

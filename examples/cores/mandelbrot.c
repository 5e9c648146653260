/* Compute core: one tile of the Mandelbrot set.
 *
 * Job input (little-endian, 44 bytes):
 *     x0 f64 | y0 f64 | dx f64 | dy f64 | width u32 | height u32 | max_iter u32
 * Job output: width*height u32 iteration counts, row by row: pixel (col, row) is
 *     c = (x0 + col*dx) + (y0 + row*dy)i; z0 = 0; count the iterations
 *     z = z^2 + c until |z|^2 > 4 or max_iter is reached.
 * Exit codes: 0 ok; 1 input is not 44 bytes; 2 out of memory; 3 tile larger than 2^28 pixels.
 * The arithmetic is written in the order a Python reference uses (built with
 * -ffp-contract=off so no fused multiply-add changes a result).
 */
#include <stdlib.h>
#include <string.h>

#include "fabric_core.h"

int32_t worker_init(int32_t version)
{
    return version == FABRIC_CORE_API_VERSION ? 0 : 1;
}

int32_t worker_run_job(uint64_t size, void *data, uint64_t *outsize, void **outdata)
{
    const unsigned char *in = data;
    double x0, y0, dx, dy;
    uint32_t width, height, max_iter;
    *outsize = 0;
    *outdata = NULL;
    if (size != 44)
        return 1;
    memcpy(&x0, in, 8);
    memcpy(&y0, in + 8, 8);
    memcpy(&dx, in + 16, 8);
    memcpy(&dy, in + 24, 8);
    memcpy(&width, in + 32, 4);
    memcpy(&height, in + 36, 4);
    memcpy(&max_iter, in + 40, 4);
    uint64_t pixels = (uint64_t)width * height;
    if (pixels > (1u << 28))
        return 3;
    uint32_t *out = malloc(pixels ? pixels * 4 : 1);
    if (!out)
        return 2;
    for (uint32_t row = 0; row < height; row++) {
        double ci = y0 + row * dy;
        for (uint32_t col = 0; col < width; col++) {
            double cr = x0 + col * dx;
            double zr = 0.0, zi = 0.0;
            uint32_t it = 0;
            while (it < max_iter) {
                double zr2 = zr * zr, zi2 = zi * zi;
                if (zr2 + zi2 > 4.0)
                    break;
                zi = 2.0 * zr * zi + ci;
                zr = zr2 - zi2 + cr;
                it++;
            }
            out[(uint64_t)row * width + col] = it;
        }
    }
    *outsize = pixels * 4;
    *outdata = out;
    return 0;
}

void worker_free_outdata(uint64_t size, void *outdata)
{
    (void)size;
    free(outdata);
}

/* Test core: writes into its input (the API allows it) before copying it out, upper-cased. */
#include <stdlib.h>
#include <string.h>

#include "../../examples/cores/fabric_core.h"

int32_t worker_init(int32_t version) { return version == 1 ? 0 : 1; }

int32_t worker_run_job(uint64_t size, void *data, uint64_t *outsize, void **outdata)
{
    unsigned char *p = data;
    for (uint64_t i = 0; i < size; i++)
        if (p[i] >= 'a' && p[i] <= 'z')
            p[i] = (unsigned char)(p[i] - 'a' + 'A');
    *outsize = 0;
    *outdata = NULL;
    if (size == 0)
        return 0;
    void *out = malloc(size);
    if (!out)
        return 2;
    memcpy(out, data, size);
    *outsize = size;
    *outdata = out;
    return 0;
}

void worker_free_outdata(uint64_t size, void *outdata) { (void)size; free(outdata); }

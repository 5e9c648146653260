/* Test core: the output is a copy of the input (an empty job gives an empty output). */
#include <stdlib.h>
#include <string.h>

#include "../../examples/cores/fabric_core.h"

int32_t worker_init(int32_t version) { return version == 1 ? 0 : 1; }

int32_t worker_run_job(uint64_t size, void *data, uint64_t *outsize, void **outdata)
{
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

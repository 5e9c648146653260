/* Test core: a job fails with exit code 7 and still returns output: "failed:" + its input. */
#include <stdlib.h>
#include <string.h>

#include "../../examples/cores/fabric_core.h"

int32_t worker_init(int32_t version) { return version == 1 ? 0 : 1; }

int32_t worker_run_job(uint64_t size, void *data, uint64_t *outsize, void **outdata)
{
    char *out = malloc(7 + size);
    if (!out)
        return 2;
    memcpy(out, "failed:", 7);
    if (size)
        memcpy(out + 7, data, size);
    *outsize = 7 + size;
    *outdata = out;
    return 7;
}

void worker_free_outdata(uint64_t size, void *outdata) { (void)size; free(outdata); }

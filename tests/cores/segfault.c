/* Test core: a job writes through a null pointer (the worker process dies of SIGSEGV). */
#include <stdint.h>

#include "../../examples/cores/fabric_core.h"

int32_t worker_init(int32_t version) { return version == 1 ? 0 : 1; }

int32_t worker_run_job(uint64_t size, void *data, uint64_t *outsize, void **outdata)
{
    (void)size; (void)data; (void)outsize; (void)outdata;
    volatile int *null = (volatile int *)(uintptr_t)0;
    *null = 1;
    return 0;
}

void worker_free_outdata(uint64_t size, void *outdata) { (void)size; (void)outdata; }

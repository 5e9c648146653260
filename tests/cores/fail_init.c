/* Test core: worker_init refuses (returns 42); its jobs must never run. */
#include <stdlib.h>

#include "../../examples/cores/fabric_core.h"

int32_t worker_init(int32_t version) { (void)version; return 42; }

int32_t worker_run_job(uint64_t size, void *data, uint64_t *outsize, void **outdata)
{
    (void)size; (void)data; (void)outsize; (void)outdata;
    abort();   /* a worker that ran a job after a failed init is a bug the test must see */
}

void worker_free_outdata(uint64_t size, void *outdata) { (void)size; (void)outdata; }

/* Test core: an output as large as the job asks for.
 *
 * Input: size u64 (little-endian), optionally followed by exit_code i32.  Output:
 * `size` bytes where byte i is i & 0xff, and the exit code (0 when absent).  Any
 * other input length fails with exit code 1 and no output.  It lets the tests
 * produce outputs above the NATS max payload, or above a ring record, on demand.
 */
#include <stdlib.h>
#include <string.h>

#include "../../examples/cores/fabric_core.h"

int32_t worker_init(int32_t version) { return version == 1 ? 0 : 1; }

int32_t worker_run_job(uint64_t size, void *data, uint64_t *outsize, void **outdata)
{
    *outsize = 0;
    *outdata = NULL;
    if (size != 8 && size != 12)
        return 1;
    uint64_t n;
    int32_t code = 0;
    memcpy(&n, data, 8);  /* the machines this runs on are little-endian */
    if (size == 12)
        memcpy(&code, (char *)data + 8, 4);
    if (n == 0)
        return code;
    unsigned char *out = malloc(n);
    if (!out)
        return 2;
    for (uint64_t i = 0; i < n; i++)
        out[i] = (unsigned char)i;
    *outsize = n;
    *outdata = out;
    return code;
}

void worker_free_outdata(uint64_t size, void *outdata) { (void)size; free(outdata); }

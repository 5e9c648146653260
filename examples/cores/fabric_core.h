/* Compute core API version 1 (seed "Compute core API version 1").
 *
 * A compute core is a shared library exporting these three functions without
 * name mangling.  A fabric worker (services/spawner/worker.py, or the C worker
 * worker.c) loads it, calls worker_init(1) once, then for each job
 * worker_run_job() followed by worker_free_outdata() before the next job.
 */
#ifndef FABRIC_CORE_H
#define FABRIC_CORE_H

#include <stdint.h>

#define FABRIC_CORE_API_VERSION 1

#if defined(__GNUC__)
#  define FABRIC_CORE_EXPORT __attribute__((visibility("default")))
#else
#  define FABRIC_CORE_EXPORT
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* 0 on success; the argument is the API version (1), check it. */
FABRIC_CORE_EXPORT int32_t worker_init(int32_t version);
/* Run one job on data[0:size] (writable, freed when this returns); store the
 * output in *outdata / *outsize (NULL / 0 for none).  0 on success. */
FABRIC_CORE_EXPORT int32_t worker_run_job(uint64_t size, void *data, uint64_t *outsize, void **outdata);
/* Free the output of the last job; called before the next job starts. */
FABRIC_CORE_EXPORT void worker_free_outdata(uint64_t size, void *outdata);

#ifdef __cplusplus
}
#endif

#endif /* FABRIC_CORE_H */

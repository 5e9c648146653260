/* Test core: a valid shared library that exports worker_init only. */
#include <stdint.h>

int32_t worker_init(int32_t version) { return version == 1 ? 0 : 1; }
int32_t not_a_core_function(void) { return 0; }

#!/usr/bin/env bash
# Rebuild the Cython extensions with AddressSanitizer + UBSan (FABRIC_SANITIZE=1), run
# their tests under the sanitizers, then rebuild them normally (also when a test fails).
#
#   tests/sanitize.sh [extra pytest args]      PYTHON=/path/to/python to pick the interpreter
#
# The interpreter itself is not instrumented, so the ASan runtime is preloaded; leak
# detection is off because CPython keeps memory alive until exit by design.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-$(command -v python)}"
rebuild_normal() {
    echo "sanitize.sh: rebuilding the extensions without sanitizers" >&2
    "$PY" setup.py -q build_ext --inplace --force >/dev/null
}
trap rebuild_normal EXIT

FABRIC_SANITIZE=1 "$PY" setup.py -q build_ext --inplace --force

# every test of the Cython modules: the arena, both codecs (FBF1 and worker protocol v1), the ring, the spawn,
# the data plane's socket loops, and the fuzzing of the codecs and the ring (tests/test_fuzz.py: out-of-bounds reads abort here)
tests=(tests/test_arena.py tests/test_wire.py tests/test_worker_protocol.py tests/test_ring.py tests/test_spawn_ext.py tests/test_fuzz.py
       tests/test_dataplane_ext.py)

LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)" \
ASAN_OPTIONS="detect_leaks=0:abort_on_error=1" \
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
    "$PY" -m pytest -q -p no:cacheprovider "${tests[@]}" "$@"

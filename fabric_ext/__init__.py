"""Cython extensions of fabric: the shared-memory arena allocator (``arena``), the
binary wire codec (``wire``), the SPSC shared-memory ring (``ring``) and the
spawner's clone+exec with the child's setup in C (``spawn``), and the errors they raise
(``errors``, re-exported by :mod:`fabric.errors`).

The bottom layer: nothing here imports from ``fabric`` (tests/test_layering.py checks)."""

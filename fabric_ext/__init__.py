"""Cython extensions of fabric: the shared-memory arena allocator (``arena``), the
binary wire codec (``wire``) and the SPSC shared-memory ring (``ring``)."""

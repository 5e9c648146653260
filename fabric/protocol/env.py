"""The environment variables that mark fabric's processes, shared by the sides that set and read them.

Only names more than one module (or process) must agree on live here; configuration
variables (``FABRIC_MEM_CAPACITY``, ``FABRIC_NATS_URL``...) belong to fabric.config.
Part of :mod:`fabric.protocol` (stdlib only).
"""

from __future__ import annotations

from typing import Final

#: set by the spawner on every process it spawns: the process id (``<node>:p<n>``); the
#: gpu-monitor reads it from /proc/<pid>/environ to attribute GPU memory, the orphan sweep to adopt
PROC_ENV: Final = "FABRIC_PROC_ID"
#: set on every worker process of a core pool: the core id (the gpu-monitor reports ``core:<id>``)
CORE_ID_ENV: Final = "FABRIC_CORE_ID"
#: the spawner's orphan marker: which spawner (state dir and node) started the process
MARKER_ENV: Final = "FABRIC_SPAWNER"
#: ``0`` (or false/no/off) turns same-host OpenCL staging files off in a client
STAGING_ENV: Final = "FABRIC_OPENCL_STAGING"

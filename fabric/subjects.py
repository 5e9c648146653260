"""NATS subjects of the public contract, and the other names both sides spell, in one place.

Cluster-wide endpoints are ``fabric.<area>.<verb>`` and listen in a queue group, so any
instance answers.  Requests that must reach one node use the node-scoped form
``fabric.<area>.<node>.<verb>``: a memory handle names its node, so a client derives
the subject from the handle alone and never needs to know the topology.
"""

from __future__ import annotations

import re

PREFIX = "fabric"
NODE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

#: the queue group every cluster-wide endpoint of a service listens in
QUEUE_GROUP = "fabric"

#: the built-in cores (no library): the Python worker and the OpenCL kernels.  The warm
#: worker process spells them again in services/spawner/core_api.py, which must import
#: nothing (tests/test_layering.py checks the two agree)
PYTHON_CORE = "fabric.python"
OPENCL_CORE = "fabric.opencl"
#: the header of a job_failed reply that carries the core's exit code
EXIT_CODE_HEADER = "Fabric-Exit-Code"


def cluster(area: str, verb: str) -> str:
    """``fabric.<area>.<verb>``: answered by any instance (queue group)."""
    return f"{PREFIX}.{area}.{verb}"


def node_scoped(area: str, node: str, verb: str) -> str:
    """``fabric.<area>.<node>.<verb>``: answered by the service on *node*."""
    return f"{PREFIX}.{area}.{node}.{verb}"


def valid_node_name(node: str) -> bool:
    """Node names are single subject tokens: letters, digits, ``_`` and ``-``."""
    return bool(NODE_NAME.match(node))


def sanitize_node_name(raw: str) -> str:
    """Turn a host name into a valid node name (``db-1.example.com`` -> ``db-1_example_com``)."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "_", raw)[:64]
    return cleaned or "node"

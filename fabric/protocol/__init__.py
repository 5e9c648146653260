"""The wire contract's one home: every name both sides spell and every binary frame codec (private).

Nothing here is public API: the client, the services and the warm worker import from
these modules so that no subject, header, core name or process-marker variable is
spelled twice, and every frame is read by one set of rules.  docs/protocol.md is the
contract itself; this package is its Python spelling.

What lives where:

* :mod:`.subjects` -- the subject helpers (``fabric.<area>.<verb>``, the node-scoped form,
  ``$SRV`` discovery, telemetry), the areas and each area's verbs (``Mem.ALLOC`` ...),
  the queue group and the node-name rules;
* :mod:`.headers` -- the NATS header names and the content types a message carries;
* :mod:`.cores` -- the names of the built-in compute cores;
* :mod:`.env` -- the environment variables that mark processes (shared by the spawner,
  its workers, the gpu-monitor and the client; configuration variables are fabric.config's);
* :mod:`.reader` -- the checked reader every Python frame codec reads through: a short
  read, a count that cannot fit, a bad magic or version, or trailing bytes are
  :class:`~fabric.errors.InvalidFrame` naming the field and its offset;
* :mod:`.jobframes` -- FJB1/FJR1, the job batch frames of ``fabric.core.<node>.map.<core>``;
* :mod:`.clframes` -- the FCLJ/FCLR frame layout of OpenCL jobs (the MessagePack headers
  inside them are :mod:`fabric.opencl`'s);
* :mod:`.wire` -- FBF1 (memory bulk bytes) and worker protocol v1, re-exported from the
  Cython codec :mod:`fabric_ext.wire`, which follows the same rules in C.

Every module imports only the standard library, :mod:`fabric_ext` and :mod:`fabric.errors`
(tests/test_layering.py checks it), so a warm worker process can load what it needs of
the contract without nats, msgspec or numpy.  This ``__init__`` imports nothing, so
importing one module loads only that module.
"""

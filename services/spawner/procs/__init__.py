"""The processes one spawner runs: starting them fast, streaming their output, ending them whole.

One module per job, imports running one way (``table`` at the top, ``model`` at the bottom):

* :mod:`.table` -- :class:`ProcessTable`, what the spawner's endpoints call; it joins the
  parts below and takes its configuration at construction (:class:`TableSettings`);
* :mod:`.launch` -- starting a process: environment, executable lookup, pipes, cgroup,
  the one C call (:func:`fabric_ext.spawn.spawn`);
* :mod:`.output` -- stdout/stderr into tails and onto NATS, with backpressure; stdin;
* :mod:`.reaper` -- signals to the whole tree, reaping the leader, the exit it reports;
* :mod:`.sweeper` -- strays that left the group and adopted orphans (a child subreaper);
* :mod:`.rss` -- peak memory: samples while a process runs, the number its exit reports;
* :mod:`.model` -- the record of one process, its tails, the settings, the shared names.
"""

from __future__ import annotations

from .model import PROC_ENV, ManagedProcess, TableSettings, parse_signal
from .rss import vm_hwm
from .table import ProcessTable

__all__ = ["ManagedProcess", "ProcessTable", "TableSettings", "parse_signal", "PROC_ENV", "vm_hwm"]

"""``fabric down``: stop the fabric of a state directory, or clean up after one whose supervisor died.

The mechanics (the stop request, SIGTERM then SIGKILL, killing leftovers, releasing
the allocator's memory) are :mod:`fabric.control`'s; this module says what happened.
"""

from __future__ import annotations

from typing import Annotated

import typer

from .cli_common import StateDirOption, err, fail, out, state_of
from .state import StateDir

__all__ = ["down"]


def down(
    state_dir: StateDirOption = None,
    grace: Annotated[float, typer.Option("--grace", min=0.0,
                                         help="Seconds services get to drain before SIGKILL.")] = 10.0,
    purge: Annotated[bool, typer.Option("--purge", help="Also release the allocator's shared memory: "
                                        "every block and handle is gone for good.")] = False,
) -> None:
    """Stop the fabric running in --state-dir: services drain, then NATS stops.

    Remote memory stays in shared memory, so the next `fabric up` with this state dir
    finds every block again; --purge releases it.
    """
    from .control import kill_leftovers, stop_supervisor

    state = state_of(state_dir)
    running = state.running()
    if running is None:
        stale = state.read()
        killed = kill_leftovers(stale) if stale is not None else []
        if killed:
            out.print(f"no supervisor was running in {state.path}; killed leftover processes: {', '.join(killed)}")
        else:
            out.print(f"no fabric is running in {state.path}")
        if purge:
            _purge(state)
        raise typer.Exit(0)

    pid = running.supervisor_pid
    if not stop_supervisor(state, running, grace):
        err.print(f"the supervisor (pid {pid}) did not stop in time: killing it")
    final = state.read()
    killed = kill_leftovers(running) + (kill_leftovers(final) if final is not None else [])
    if killed:
        err.print(f"killed leftover processes: {', '.join(sorted(set(killed)))}")
    names = ["nats-server"] if running.embedded_nats else []
    out.print(f"fabric stopped in {state.path} (node {running.node}; supervisor pid {pid}; "
              f"{', '.join(names + list(running.services)) or 'nothing else'})")
    if purge:
        _purge(state)


def _purge(state: StateDir) -> None:
    from .control import release_allocator_memory

    try:
        released = release_allocator_memory(state)
    except RuntimeError as exc:
        fail(f"cannot release the allocator's shared memory: {exc}")
    out.print(f"released the shared memory of {len(released)} allocator arena(s)"
              + (f": {', '.join(released)}" if released else ""))

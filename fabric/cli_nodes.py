"""``fabric nodes [--watch]``, and the node table ``fabric status`` shows too.

The records come from the gpu-monitors' registry (``fabric.nodes.list``, see
docs/protocol.md "Nodes and telemetry"); this module only fetches and renders
them, so the CLI stays a thin layer over the public subjects.
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import datetime
from typing import Annotated, Any

import msgspec
import typer
from rich.console import JustifyMethod
from rich.table import Table

from .cli_common import NatsUrlOption, StateDirOption, connect, console, fail, find_nats_url, state_of
from .protocol.subjects import NODES, Nodes, cluster
from .schema import JSON, NodeListReply, NodeRecord

__all__ = ["fetch_nodes", "nodes_table", "add_columns", "NoMonitor", "nodes"]


class NoMonitor(Exception):
    """No gpu-monitor answered ``fabric.nodes.list``."""


async def fetch_nodes(nc: Any, timeout: float = 2.0) -> list[NodeRecord]:
    """Every node in the registry, through one request on *nc*; :class:`NoMonitor` if none answers."""
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout

    try:
        msg = await nc.request(cluster(NODES, Nodes.LIST), b"{}", timeout=timeout)
    except (NoRespondersError, NatsTimeout):
        raise NoMonitor(f"no gpu-monitor answered {cluster(NODES, Nodes.LIST)}") from None
    return JSON.decode(msg.data, NodeListReply).nodes


def _size(n: int) -> str:
    if n < 0:
        return "?"
    for unit, scale in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n}B"


def _rate(per_s: float) -> str:
    return f"{_size(int(per_s))}/s"


def _gpus(record: NodeRecord) -> str:
    if not record.gpus:
        return "none" if record.nvml.available else f"- ({_short(record.nvml.reason)})"
    parts = []
    for g in record.gpus:
        util = f"{g.utilization_gpu:.0f}%" if g.utilization_gpu >= 0 else "?"
        used = f"{_size(g.memory_used)}/{_size(g.memory_total)}"
        jobs = f" {len(g.processes)} proc" if g.processes else ""
        temp = f" {g.temperature_c:.0f}C" if g.temperature_c >= 0 else ""
        parts.append(f"{g.index}: {g.name} {util} {used}{temp}{jobs}")
    return "\n".join(parts)


def _opencl(record: NodeRecord) -> str:
    if not record.opencl.available:
        return f"- ({_short(record.opencl.reason)})"
    return "\n".join(f"{d.type} {d.name[:28]} ({d.compute_units} CU)" for d in record.opencl.devices)


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def add_columns(table: Table, columns: list[tuple[str, JustifyMethod]]) -> None:
    """Add ``(header, justify)`` columns to a rich table."""
    for col, justify in columns:
        table.add_column(col, justify=justify)


def nodes_table(records: list[NodeRecord], title: str) -> Table:
    """One row per node: status, CPUs, load, memory, disk, network, GPUs, OpenCL devices."""
    table = Table(title=title, title_justify="left")
    add_columns(table, [("node", "left"), ("status", "left"), ("host", "left"), ("cpu", "right"),
                        ("load", "right"), ("memory", "right"), ("disk /", "right"), ("net rx/tx", "right"),
                        ("gpus", "left"), ("opencl", "left")])
    for r in records:
        h = r.host
        status = r.status if r.status == "up" else f"[bold red]{r.status}[/] ({r.age_s:.0f}s)"
        root = next((d for d in r.disks if d.path == "/"), r.disks[0] if r.disks else None)
        table.add_row(
            r.node,
            status,
            f"{h.hostname} {h.architecture}\n{h.cpu_cores} cpu, {_size(h.ram_bytes)}",
            f"{r.cpu.percent:.0f}%",
            f"{r.cpu.load_1:.2f}",
            f"{_size(r.memory.used)}/{_size(r.memory.total)}",
            f"{root.percent:.0f}%" if root else "?",
            f"{_rate(r.net.recv_per_s)}\n{_rate(r.net.sent_per_s)}",
            _gpus(r),
            _opencl(r),
            end_section=True,
        )
    if not records:
        table.caption = "no node in the registry"
    return table


# -- fabric nodes ---------------------------------------------------------------------------


def nodes(
    state_dir: StateDirOption = None,
    nats_url: NatsUrlOption = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh live until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option("--interval", min=0.1, help="Seconds between refreshes.")] = 1.0,
    count: Annotated[int, typer.Option("--count", min=0,
                                       help="With --watch: stop after this many refreshes (0: never).")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the records as JSON (one line per refresh).")] = False,
) -> None:
    """Show every node: CPUs, load, memory, disk, network, GPUs and OpenCL devices (from the gpu-monitors)."""
    state = state_of(state_dir)
    url, _ = find_nats_url(nats_url, state)
    try:
        asyncio.run(_nodes_loop(url, watch, interval, count, as_json))
    except KeyboardInterrupt:
        pass


async def _nodes_loop(url: str, watch: bool, interval: float, count: int, as_json: bool) -> None:
    from rich.live import Live

    nc = await connect(url)
    try:
        async def one() -> list[NodeRecord]:
            try:
                return await fetch_nodes(nc)
            except NoMonitor:
                fail(f"no gpu-monitor answers on {url}", "is the fabric up with its gpu-monitor? (`fabric status`)")

        def title(records: list[NodeRecord]) -> str:
            return f"nodes on {url} ({len(records)}) at {datetime.now().strftime('%H:%M:%S')}"

        records = await one()
        if as_json:
            sys.stdout.write(json.dumps([msgspec.to_builtins(r) for r in records]) + "\n")
        elif not watch:
            console().print(nodes_table(records, title(records)))
        if not watch:
            return
        shown = 1
        live = None if as_json else Live(nodes_table(records, title(records)), console=console(),
                                         auto_refresh=False)
        if live is not None:
            live.start(refresh=True)
        try:
            while count == 0 or shown < count:
                await asyncio.sleep(interval)
                records = await one()
                shown += 1
                if live is not None:
                    live.update(nodes_table(records, title(records)), refresh=True)
                else:
                    sys.stdout.write(json.dumps([msgspec.to_builtins(r) for r in records]) + "\n")
                    sys.stdout.flush()
        finally:
            if live is not None:
                live.stop()
    finally:
        await nc.close()

"""``fabric submit``, ``fabric tasks [--watch]``, ``fabric task ID`` and ``fabric cancel ID``: tasks from a shell.

A thin layer over the public subjects of docs/protocol.md "Tasks": ``submit`` sends
an ``exec`` task (``fabric.task.submit``, MessagePack) and with ``--wait`` follows it
with ``fabric.task.wait`` (a one-shot command has no ``notify`` subscription to keep),
printing the process's standard output and exiting with its exit code; ``tasks`` lists
``fabric.task.list`` as a table or JSON lines, and with ``--watch`` redraws it as
``fabric.task.events`` report changes; ``task`` shows one record (``fabric.task.get``);
``cancel`` asks ``fabric.task.cancel``.

Exit status: 0 done; 1 an expected failure (unknown id 404, cancel of an ended task 409,
no scheduler, a task that failed, died or was cancelled); 2 bad input (a bad flag value,
or the scheduler's 400, 413, or 422 infeasible, whose message names what no node has);
``submit --wait`` of a process that exited nonzero exits with the process's code.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Annotated, Any, Final, NoReturn, TypeVar

import msgspec
import typer
from rich.table import Table
from rich.text import Text

from .cli_common import NatsUrlOption, StateDirOption, connect, console, err, escape, fail, find_nats_url, state_of
from .errors import BadRequest, Conflict, FabricError, Infeasible, NotFound, TooLarge, Unavailable
from .protocol.subjects import TASK, Task, cluster
from .schema import CONTENT_TYPE_HEADER, MSGPACK, MSGPACK_CONTENT_TYPE
from .schema.tasks import (
    CANCELLED,
    DEAD,
    EXEC,
    FAILED,
    PYTHON,
    RUNNING,
    STATES,
    SUCCEEDED,
    TERMINAL,
    ExecSpec,
    ListRequest,
    Resources,
    SubmitReply,
    SubmitRequest,
    TaskEventBatch,
    TaskListReply,
    TaskRecord,
    TaskRequest,
    WaitRequest,
)

__all__ = ["submit", "tasks", "task", "cancel", "SUBMIT_CONTEXT"]

T = TypeVar("T")

#: ``fabric submit`` stops reading options at the first word of the command: ``fabric submit ls -l`` works
#: without ``--`` (typer's own context settings for the command: pass to ``app.command``)
SUBMIT_CONTEXT: Final = {"allow_interspersed_args": False}
#: how long a request is retried while no scheduler answers (a failover takes 1.5 s or so)
NO_SCHEDULER_RETRY_S: Final = 3.0
#: seconds one ``fabric.task.wait`` asks the scheduler to hold (the protocol allows 300)
WAIT_CHUNK_S: Final = 30.0
#: ``tasks --watch``: at most this many redraws a second however busy the events are, and one at
#: least every second (the age column moves)
WATCH_MAX_RATE: Final = 4.0
WATCH_IDLE_S: Final = 1.0
#: bytes of a result ``fabric task`` shows
PREVIEW_BYTES: Final = 240

_STATE_STYLE: Final = {SUCCEEDED: "green", FAILED: "bold red", DEAD: "bold red", CANCELLED: "yellow",
                       RUNNING: "cyan"}


# -- talking to the scheduler ----------------------------------------------------------------


async def _request(nc: Any, verb: str, msg: Any, reply_type: type[T], timeout: float = 5.0) -> T:
    """One MessagePack request to ``fabric.task.<verb>``; its decoded reply, or the error reply raised.

    No responders (no active scheduler: a failover, or none runs) is retried for
    :data:`NO_SCHEDULER_RETRY_S`, then :class:`Unavailable`.  Every request here is safe
    to repeat: the submit carries the id this command minted.
    """
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout

    from .errors import ERROR_CODE_HEADER, ERROR_HEADER, ERROR_KIND_HEADER, error_from_wire

    subject = cluster(TASK, verb)
    data = MSGPACK.encode(msg)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + NO_SCHEDULER_RETRY_S
    while True:
        try:
            reply = await nc.request(subject, data, timeout=timeout,
                                     headers={CONTENT_TYPE_HEADER: MSGPACK_CONTENT_TYPE})
            break
        except NoRespondersError:
            if loop.time() >= deadline:
                raise Unavailable(f"no scheduler answers on {subject}") from None
            await asyncio.sleep(0.2)
        except NatsTimeout:
            raise Unavailable(f"no reply on {subject} within {timeout:g} s") from None
    headers = reply.headers or {}
    if headers.get(ERROR_CODE_HEADER) or headers.get(ERROR_KIND_HEADER):
        raise error_from_wire(headers.get(ERROR_CODE_HEADER), headers.get(ERROR_HEADER, ""),
                              headers.get(ERROR_KIND_HEADER))
    return MSGPACK.decode(reply.data, reply_type)


def _bad_input(message: str, hint: str | None = None) -> NoReturn:
    """:func:`fail`'s line, with exit status 2 (bad input, as a usage error)."""
    try:
        fail(message, hint)
    except typer.Exit:
        raise typer.Exit(2) from None


def _fail_with(exc: FabricError) -> NoReturn:
    """A scheduler's error reply as one line: 400, 413 and 422 are bad input (exit 2), the rest exit 1."""
    if isinstance(exc, Infeasible):
        _bad_input(f"infeasible: {exc.message}", "no registered node has what the task asks for: "
                   "see `fabric nodes`, or ask for less")
    if isinstance(exc, (BadRequest, TooLarge)):
        _bad_input(f"refused ({exc.code} {exc.kind}): {exc.message}")
    if isinstance(exc, NotFound):
        fail(exc.message, "`fabric tasks` lists the tasks")
    if isinstance(exc, Unavailable):
        fail(exc.message, "is a scheduler running? (`fabric status`; `fabric up` runs one)")
    fail(f"{exc.code} {exc.kind}: {exc.message}")


def _run(url: str, body: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
    """Connect, run *body(nc)*, close; a scheduler's error reply becomes :func:`_fail_with`'s line."""
    async def main() -> T:
        nc = await connect(url)
        try:
            return await body(nc)
        finally:
            await nc.close()

    try:
        return asyncio.run(main())
    except FabricError as exc:
        _fail_with(exc)


# -- formatting ------------------------------------------------------------------------------


def _duration(ms: int) -> str:
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    s = ms / 1000
    if s < 60:
        return f"{s:.1f}s" if s < 10 else f"{s:.0f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    if s < 86400:
        return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"
    return f"{int(s // 86400)}d{int(s % 86400 // 3600):02d}h"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if ms else "-"


def _run_time(rec: TaskRecord, now: int) -> str:
    """How long it ran: from its first attempt's start to its end (or now, while it runs)."""
    starts = [a.start_ms for a in rec.attempts if a.start_ms]
    if not starts:
        return "-"
    end = rec.finished_ms or (now if rec.state not in TERMINAL else rec.updated_ms)
    return _duration(end - min(starts))


def _state(state: str) -> Text:
    return Text(state, style=_STATE_STYLE.get(state, ""))


def _node(rec: TaskRecord) -> str:
    return rec.attempts[-1].node if rec.attempts else "-"


def tasks_table(records: list[TaskRecord], title: str) -> Table:
    """One row per task: id, kind, state, priority, node (of the last attempt), attempts, age, run time."""
    now = _now_ms()
    table = Table(title=title, title_justify="left")
    # an id is what a reader copies into `fabric task ID`: never cut, the other columns give way
    table.add_column("id", no_wrap=True, min_width=max((len(r.id) for r in records), default=2))
    table.add_column("kind")
    table.add_column("state", no_wrap=True, min_width=9)
    for header, justify in (("prio", "right"), ("node", "left"), ("attempts", "right"), ("age", "right"),
                            ("ran", "right")):
        table.add_column(header, justify=justify)  # type: ignore[arg-type]
    for r in records:
        table.add_row(r.id, r.kind, _state(r.state), str(r.priority), _node(r), str(len(r.attempts)),
                      _duration(now - r.created_ms) if r.created_ms else "-", _run_time(r, now))
    if not records:
        table.caption = "no task"
    return table


def _json_line(rec: TaskRecord) -> str:
    # bytes (result, a python error's pickled exception) become base64, as in the protocol's JSON
    return msgspec.json.encode(rec).decode()


def _preview(rec: TaskRecord) -> str:
    """A result as a person can read it: the size, and the start of the text (not a pickle's bytes)."""
    data = rec.result
    size = rec.result_size or len(data)
    if not data:
        return f"{size} bytes, stored as {rec.result_ref!r}" if rec.result_ref else "none"
    if rec.kind == PYTHON:
        return f"{size} bytes (a pickled Python value)"
    head = data[:PREVIEW_BYTES]
    # a multi-byte character cut at the end of the preview is dropped, not a reason to show hex
    text = head.decode(errors="ignore") if len(data) > PREVIEW_BYTES else head.decode(errors="replace")
    if text and "\ufffd" not in text and all(c.isprintable() or c in "\n\t\r" for c in text):
        more = "…" if len(data) > PREVIEW_BYTES else ""
        return f"{size} bytes:\n" + "\n".join("  " + line for line in (text + more).splitlines())
    return f"{size} bytes: {head[:32].hex(' ')}{' …' if len(data) > 32 else ''}"


def _show_record(rec: TaskRecord) -> None:
    out = console()
    now = _now_ms()
    lines = [
        ("id", rec.id), ("kind", rec.kind + (f" ({rec.core})" if rec.core else "")),
        ("state", f"[{_STATE_STYLE.get(rec.state, 'default')}]{rec.state}[/]"),
        ("priority", str(rec.priority)),
        ("retries", f"{rec.failures} of {rec.retries} used" + (", also on exceptions" if rec.retry_exceptions else "")),
    ]
    if rec.resources is not None:
        wanted = {k: v for k, v in msgspec.to_builtins(rec.resources).items() if v not in ("", {}, 0)}
        lines.append(("resources", escape(json.dumps(wanted))))
    if rec.timeout_s:
        lines.append(("timeout", f"{rec.timeout_s:g} s an attempt"))
    if rec.key:
        lines.append(("key", escape(rec.key)))
    if rec.deps:
        lines.append(("deps", ", ".join(rec.deps)))
    lines.append(("created", _when(rec.created_ms) + (f" ({_duration(now - rec.created_ms)} ago)"
                                                      if rec.created_ms else "")))
    if rec.finished_ms:
        lines.append(("finished", f"{_when(rec.finished_ms)} (ran {_run_time(rec, now)})"))
    if rec.exit_code is not None and rec.kind != PYTHON:  # a python task's is its worker's protocol, not news
        lines.append(("exit code", str(rec.exit_code)))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        out.print(f"[bold]{key:<{width}}[/]  {value}")
    if rec.attempts:
        table = Table(title="attempts", title_justify="left")
        for header in ("#", "node", "worker", "started", "ran", "outcome", "error"):
            table.add_column(header)
        for a in rec.attempts:
            ran = _duration((a.end_ms or now) - a.start_ms) if a.start_ms else "-"
            table.add_row(str(a.number), a.node, a.worker or "-", _when(a.start_ms), ran,
                          _state(a.outcome or "running"), a.error)
        out.print(table)
    if rec.error is not None:
        e = rec.error
        out.print(f"[bold red]error[/] {e.code} {escape(e.kind)}: {escape(e.message)}")
        if e.type:
            out.print(f"  type: {escape(e.type)}")
        if e.traceback:
            out.print("  remote traceback:")
            for line in e.traceback.rstrip("\n").splitlines():
                out.print("    " + escape(line))
    if rec.state == SUCCEEDED or rec.result:
        out.print(f"[bold]result[/] {escape(_preview(rec))}")


# -- fabric submit ---------------------------------------------------------------------------


def _labels(items: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            _bad_input(f"bad --label {item!r}", "use --label KEY=VALUE")
        labels[key.strip()] = value.strip()
    return labels


def submit(
    argv: Annotated[list[str] | None, typer.Argument(help="The command to run and its arguments (after `--`).",
                                                     metavar="COMMAND [ARGS]", show_default=False)] = None,
    wait: Annotated[bool, typer.Option("--wait", "-w", help="Wait for the end: print the process's standard "
                                       "output and exit with its exit code.")] = False,
    priority: Annotated[int, typer.Option("--priority", "-p", min=1, max=10, help="1..10, 10 first.")] = 5,
    cpus: Annotated[float, typer.Option("--cpus", min=0, help="Logical CPUs it holds while it runs.")] = 1.0,
    mem: Annotated[str | None, typer.Option("--mem", show_default=False,
                                            help="Memory it holds while it runs: bytes, or 512MB, 4GiB...")] = None,
    gpus: Annotated[float, typer.Option("--gpus", min=0, help="A fraction of one GPU (<1), or whole GPUs.")] = 0.0,
    node: Annotated[str | None, typer.Option("--node", show_default=False, help="Run on exactly this node.")] = None,
    label: Annotated[list[str] | None, typer.Option("--label", "-l", show_default=False,
                                                    help="KEY=VALUE the node must carry (repeatable).")] = None,
    retries: Annotated[int, typer.Option("--retries", min=0, max=100,
                                         help="System failures (crash, node lost, timeout) retried.")] = 3,
    timeout: Annotated[float, typer.Option("--timeout", min=0, help="Seconds an attempt may run (0: no limit).")] = 0,
    key: Annotated[str | None, typer.Option("--key", show_default=False,
                                            help="Idempotency key: a later submit with it returns this task.")] = None,
    state_dir: StateDirOption = None,
    nats_url: NatsUrlOption = None,
) -> None:
    """Run a command as a durable task (kind exec) on a node that has what it needs; print its id.

    fabric submit [OPTIONS] -- COMMAND [ARGS]...   With --wait: its output, and its exit code.
    """
    from .client.resources import parse_size

    if not argv:
        _bad_input("no command to run", "fabric submit [OPTIONS] -- COMMAND [ARGS]...")
    try:
        mem_bytes = parse_size(mem, "--mem") if mem is not None else 0
    except BadRequest as exc:
        _bad_input(exc.message)
    resources = Resources(cpus=cpus, mem=mem_bytes, gpus=gpus, node=node or "", labels=_labels(label or []))
    from .client.tasks import new_task_id  # the client's ids (lazily: the CLI starts without cloudpickle)

    req = SubmitRequest(kind=EXEC, id=new_task_id(), exec=ExecSpec(argv=list(argv)), priority=priority,
                        resources=resources, retries=retries, timeout_s=float(timeout), key=key or "")
    url, _ = find_nats_url(nats_url, state_of(state_dir))

    async def send(nc: Any) -> SubmitReply:
        return await _request(nc, Task.SUBMIT, req, SubmitReply)

    try:
        reply = _run(url, send)
    except KeyboardInterrupt:
        # the id was minted here: the user can look it up whether or not the scheduler got it
        fail(f"interrupted: task {req.id} may or may not have been submitted", f"`fabric task {req.id}` tells")
    if not wait:
        sys.stdout.write(reply.id + "\n")
        return
    note = " (an existing task: the key names it)" if reply.existing else ""
    err.print(f"task {reply.id} {reply.state}{note}; waiting for its end (Ctrl-C stops waiting, not the task)")
    try:
        rec = _run(url, lambda nc: _wait_end(nc, reply.id))
    except KeyboardInterrupt:
        fail(f"stopped waiting: task {reply.id} goes on",
             f"`fabric task {reply.id}` shows it, `fabric cancel {reply.id}` stops it")
    _exit_with(rec)


async def _wait_end(nc: Any, task_id: str) -> TaskRecord:
    while True:
        rec = await _request(nc, Task.WAIT, WaitRequest(id=task_id, timeout_s=WAIT_CHUNK_S), TaskRecord,
                             timeout=WAIT_CHUNK_S + 5)
        if rec.state in TERMINAL:
            return rec


def _exit_with(rec: TaskRecord) -> NoReturn:
    """The end of ``submit --wait``: the output on stdout, and the process's exit code (or a clear error)."""
    if rec.result:
        sys.stdout.buffer.write(rec.result)
        sys.stdout.flush()
    if rec.state == SUCCEEDED:
        raise typer.Exit(rec.exit_code or 0)
    why = f": {rec.error.message}" if rec.error is not None and rec.error.message else ""
    if rec.state == FAILED and rec.exit_code is not None and rec.exit_code != 0:
        # the process ran and failed: its exit code, as if it ran here (a signal as a shell shows it: 128+N)
        code = rec.exit_code if 0 < rec.exit_code < 256 else 128 + (-rec.exit_code % 128) if rec.exit_code < 0 else 1
        err.print(f"[bold red]error:[/] task {rec.id} failed{escape(why)}")
        raise typer.Exit(code)
    hint = f"`fabric task {rec.id}` shows its attempts"
    if rec.state == FAILED:
        fail(f"task {rec.id} failed{why}", hint)
    if rec.state == DEAD:
        fail(f"task {rec.id} is dead: system failures used up its retries{why}", hint)
    fail(f"task {rec.id} was cancelled", hint)


# -- fabric tasks ----------------------------------------------------------------------------


def tasks(
    state: Annotated[str | None, typer.Option("--state", "-s", show_default=False,
                                              help=f"Only tasks in this state ({', '.join(STATES[1:])}).")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=10_000, help="At most this many, newest first.")]
    = 50,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Redraw live as tasks change, until Ctrl-C.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON record a line (with --watch: each record "
                                          "again whenever it changes).")] = False,
    state_dir: StateDirOption = None,
    nats_url: NatsUrlOption = None,
) -> None:
    """List the newest tasks: id, kind, state, priority, node, attempts, age, run time."""
    if state is not None and state not in STATES:
        _bad_input(f"unknown state {state!r}", f"one of: {', '.join(STATES)}")
    url, _ = find_nats_url(nats_url, state_of(state_dir))
    request = ListRequest(state=state or "", limit=limit)
    try:
        _run(url, lambda nc: _tasks_loop(nc, url, request, watch, as_json))
    except KeyboardInterrupt:
        pass


async def _tasks_loop(nc: Any, url: str, request: ListRequest, watch: bool, as_json: bool) -> None:
    from rich.live import Live

    def title(records: list[TaskRecord]) -> str:
        which = f"{request.state} " if request.state else ""
        return f"{which}tasks on {url} ({len(records)}) at {datetime.now().strftime('%H:%M:%S')}"

    async def fetch() -> list[TaskRecord]:
        return (await _request(nc, Task.LIST, request, TaskListReply)).tasks

    seen: dict[str, tuple[str, int, int]] = {}

    def emit_json(records: list[TaskRecord]) -> None:
        # oldest first, as a log reads; a record is printed again only when it changed
        for rec in reversed(records):
            mark = (rec.state, rec.updated_ms, len(rec.attempts))
            if seen.get(rec.id) != mark:
                seen[rec.id] = mark
                sys.stdout.write(_json_line(rec) + "\n")
        sys.stdout.flush()

    if not watch:
        records = await fetch()
        if as_json:
            emit_json(records)
        else:
            console().print(tasks_table(records, title(records)))
        return

    changed = asyncio.Event()

    async def on_events(msg: Any) -> None:
        try:
            msgspec.json.decode(msg.data, type=TaskEventBatch)
        except msgspec.MsgspecError:
            return  # not a batch: nothing to redraw for
        changed.set()

    # subscribe before the first list: a change between the two is not missed.  The whole feed carries every
    # user's tasks (an admin's to read); a user follows its own, on its user form
    feed = nc.subject(cluster(TASK, Task.EVENTS))
    sub = await nc.subscribe(feed, cb=on_events)
    live: Live | None = None
    try:
        records = await fetch()
        if as_json:
            emit_json(records)
        else:
            live = Live(tasks_table(records, title(records)), console=console(), auto_refresh=False)
            live.start(refresh=True)
        err.print(f"watching {feed} on {url} (Ctrl-C to stop)")
        while True:
            try:
                await asyncio.wait_for(changed.wait(), WATCH_IDLE_S)
            except asyncio.TimeoutError:
                pass
            changed.clear()
            records = await fetch()
            if live is not None:
                live.update(tasks_table(records, title(records)), refresh=True)
            else:
                emit_json(records)
            await asyncio.sleep(1 / WATCH_MAX_RATE)  # events gathered meanwhile make one redraw
    finally:
        if live is not None:
            live.stop()
        await sub.unsubscribe()


# -- fabric task ID / fabric cancel ID -------------------------------------------------------

TaskIdArgument = Annotated[str, typer.Argument(help="The task's id.", show_default=False)]


def task(
    task_id: TaskIdArgument,
    as_json: Annotated[bool, typer.Option("--json", help="Print the record as JSON.")] = False,
    state_dir: StateDirOption = None,
    nats_url: NatsUrlOption = None,
) -> None:
    """Show one task: state, attempts, error with its traceback, result size and preview."""
    url, _ = find_nats_url(nats_url, state_of(state_dir))
    rec = _run(url, lambda nc: _request(nc, Task.GET, TaskRequest(id=task_id), TaskRecord))
    if as_json:
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(rec), indent=2).decode() + "\n")
    else:
        _show_record(rec)


def cancel(
    task_id: TaskIdArgument,
    state_dir: StateDirOption = None,
    nats_url: NatsUrlOption = None,
) -> None:
    """Cancel a task that has not ended (a running one is stopped on its node)."""
    url, _ = find_nats_url(nats_url, state_of(state_dir))

    async def send(nc: Any) -> TaskRecord:
        try:
            return await _request(nc, Task.CANCEL, TaskRequest(id=task_id), TaskRecord)
        except Conflict as exc:
            fail(f"cannot cancel: {exc.message}", f"`fabric task {task_id}` shows how it ended")

    rec = _run(url, send)
    sys.stdout.write(f"task {rec.id} {rec.state}\n")

"""The scheduler's messages: durable tasks (``fabric.task.*``), their records, results and events.

Part of :mod:`fabric.schema` (its docstring has the rules every message follows).

A task is submitted to the active scheduler (``fabric.task.submit``, or ``map`` for
many calls of one Python function), written to JetStream (a stream for bodies, a KV
bucket for the :class:`TaskRecord`), placed on a node whose registry record satisfies
its :class:`Resources`, and pulled by that node's spawner (``fabric.task.pull``: the
spawner asks for as many tasks as it has free slots, and hands back results on the
same request).  The states and their legal transitions are :data:`TRANSITIONS`;
docs/protocol.md "Tasks" draws them as a table.
"""

from __future__ import annotations

from typing import Annotated, Final

from msgspec import Meta

from .base import Message, UInt
from .processes import Limits, NativeExec, Sandbox

# -- names ---------------------------------------------------------------------

#: a task id: one subject token and one KV key; the client may choose it (idempotent resubmission)
TaskIdStr = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
Priority = Annotated[int, Meta(ge=1, le=10)]
#: fractional counts (cpus, gpus, custom resources): 0 .. one million
Amount = Annotated[float, Meta(ge=0, le=1_000_000)]
TaskSeconds = Annotated[float, Meta(ge=0, le=365 * 24 * 3600)]
Retries = Annotated[int, Meta(ge=0, le=100)]
ShortStr = Annotated[str, Meta(max_length=255)]

#: the kinds of work (docs/protocol.md "Kinds of work")
PYTHON: Final = "python"
CORE: Final = "core"
EXEC: Final = "exec"
OPENCL: Final = "opencl"
KINDS: Final = (PYTHON, CORE, EXEC, OPENCL)

#: UDCS ``type`` values and the kind each is (``POST /api/submit`` bodies arrive unchanged)
UDCS_TYPES: Final = {
    "PYTHON": PYTHON,
    "COMPUTE_CORE": CORE,
    "NATIVE_EXEC": EXEC,
    "OPENCL_KERNEL": OPENCL,
}

# -- states ----------------------------------------------------------------------

SUBMITTED: Final = "submitted"   # accepted by the scheduler, not yet written durably
QUEUED: Final = "queued"         # durable, feasible, waiting for a node with room
WAITING: Final = "waiting"       # durable, waiting for its dependencies to succeed
RUNNING: Final = "running"       # placed on a node (an attempt is open)
SUCCEEDED: Final = "succeeded"
FAILED: Final = "failed"         # the function raised (or exited nonzero), or a dependency did not succeed
CANCELLED: Final = "cancelled"
DEAD: Final = "dead"             # system failures (crash, node loss, timeout) used up its retries

STATES: Final = (SUBMITTED, QUEUED, WAITING, RUNNING, SUCCEEDED, FAILED, CANCELLED, DEAD)
TERMINAL: Final = frozenset({SUCCEEDED, FAILED, CANCELLED, DEAD})

#: every legal transition: state -> the states it may move to.  Anything else is a bug
#: (``fabric.services.scheduler.machine.move`` raises).  ``submitted -> running`` is the
#: fast path: a node was already asking for work when the task arrived.
TRANSITIONS: Final[dict[str, frozenset[str]]] = {
    SUBMITTED: frozenset({QUEUED, WAITING, RUNNING, FAILED, CANCELLED}),
    WAITING: frozenset({QUEUED, RUNNING, FAILED, CANCELLED}),
    QUEUED: frozenset({RUNNING, CANCELLED}),
    RUNNING: frozenset({SUCCEEDED, FAILED, QUEUED, DEAD, CANCELLED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
    DEAD: frozenset(),
}

# -- what a task needs ------------------------------------------------------------


class Resources(Message):
    """What a task needs from its node; matched against the node registry (``fabric.nodes``).

    ``cpus``, ``mem``, ``gpus`` and ``gpu_mem`` (per GPU) are held while the task runs,
    so no node is oversubscribed; ``arch``, ``os``, ``node`` and ``labels`` select
    nodes; ``custom`` names resources a node declared at ``fabric up --resources``.
    """

    cpus: Amount = 1.0
    mem: UInt = 0
    gpus: Annotated[float, Meta(ge=0, le=1024)] = 0.0
    gpu_mem: UInt = 0
    arch: ShortStr = ""
    os: ShortStr = ""
    node: ShortStr = ""
    labels: dict[str, str] = {}
    custom: dict[str, Amount] = {}


class UdcsRequirements(Message):
    """UDCS's ``requirements`` object, taken as it is and read as :class:`Resources`."""

    min_memory_gb: Annotated[float, Meta(ge=0, le=1 << 30)] = 0.0
    gpu_required: bool = False
    architecture: ShortStr = ""


class ExecSpec(Message):
    """Kind ``exec``: a native process, as ``fabric.proc.spawn`` takes it (argv or a stored binary)."""

    argv: Annotated[list[str], Meta(max_length=65536)] = []
    env: dict[str, str] | None = None
    cwd: str | None = None
    stdin: bytes | None = None
    limits: Limits | None = None
    sandbox: Sandbox | None = None
    native: NativeExec | None = None


class SubmitRequest(Message):
    """``fabric.task.submit``: one task.

    ``kind`` says what ``payload`` is: ``python`` an FPY1 frame (docs/protocol.md
    "Python tasks"), ``core`` the input of one job of the compute core named ``core``,
    ``opencl`` an FCLJ job frame, ``exec`` nothing (the process is ``exec``).  A UDCS
    body (``type``, ``requirements``, ``payload``, ``callback_url``, and for
    ``NATIVE_EXEC`` ``binary``/``args``/``environment``/``architecture``/``os``) is
    accepted unchanged.
    """

    kind: ShortStr = ""
    type: ShortStr = ""
    id: Annotated[str, Meta(max_length=64, pattern=r"^[A-Za-z0-9_-]*$")] = ""
    #: what the kind runs (bytes: base64 in JSON); for ``exec`` / UDCS ``NATIVE_EXEC`` it may be the process
    #: itself, an :class:`ExecSpec` object (``{"argv": [...]}``), as ``exec`` takes it
    payload: bytes | ExecSpec = b""
    core: ShortStr = ""
    exec: ExecSpec | None = None
    priority: Priority = 5
    resources: Resources | None = None
    requirements: UdcsRequirements | None = None
    #: system failures (worker crash, node loss, timeout) retried this many times
    retries: Retries = 3
    #: also retry when the function raises (off by default, as in Ray)
    retry_exceptions: bool = False
    #: seconds one attempt may run; 0 = no limit
    timeout_s: TaskSeconds = 0.0
    #: idempotency key: a repeated submit with the same key returns the same task
    key: ShortStr = ""
    callback_url: Annotated[str, Meta(max_length=2048)] = ""
    #: tasks that must succeed first (their results are this task's inputs)
    deps: Annotated[list[TaskIdStr], Meta(max_length=4096)] = []
    #: a subject where the scheduler publishes this task's :class:`TaskDone` when it ends
    notify: ShortStr = ""
    #: where the fabric requires signed code (``sandbox.require_signed``; fabric.signing): a ``python`` task's
    #: ed25519 signature (base64) of its payload, or a UDCS ``binary``'s of the file (as ``fabric sign`` prints)
    signature: Annotated[str, Meta(max_length=128)] = ""
    # UDCS NATIVE_EXEC fields
    binary: bytes | None = None
    args: list[str] | None = None
    environment: dict[str, str] | None = None
    architecture: ShortStr = ""
    os: ShortStr = ""


class MapRequest(Message):
    """``fabric.task.map``: many calls of one Python function, one task each (``fc.map``).

    ``fn`` is ``cloudpickle.dumps(fn)``; each of ``calls`` is ``pickle.dumps((args,
    kwargs))``.  Task ``i`` gets the id ``<prefix>-<i>`` (``prefix`` chosen by the client,
    or minted).  Every other field applies to each task as in :class:`SubmitRequest`.
    """

    fn: bytes
    calls: Annotated[list[bytes], Meta(min_length=1, max_length=65536)]
    prefix: Annotated[str, Meta(max_length=48, pattern=r"^[A-Za-z0-9_]*$")] = ""
    priority: Priority = 5
    resources: Resources | None = None
    retries: Retries = 3
    retry_exceptions: bool = False
    timeout_s: TaskSeconds = 0.0
    deps: Annotated[list[TaskIdStr], Meta(max_length=4096)] = []
    notify: ShortStr = ""
    #: ed25519 signature (base64) of the function and every call by a trusted key, where required (fabric.signing)
    signature: Annotated[str, Meta(max_length=128)] = ""


class MapBody(MapRequest):
    """A map as the scheduler stores it (stream ``FABRIC_TASK_BODIES``, header ``Fabric-Map``).

    The request with its ``prefix`` filled in, when it was accepted, and how its notices
    are encoded: everything needed to rebuild its tasks, which have no KV record until
    their first change (docs/protocol.md "Where tasks live").
    """

    created_ms: UInt = 0
    notify_encoding: str = "json"
    #: the user who submitted it (with auth on: the authenticated caller; "" for a trusted one)
    owner: str = ""


class SubmitReply(Message):
    """The reply of ``submit``: the task's id and state (``existing``: the id or key named a task already)."""

    id: str
    state: str
    existing: bool = False


class MapReply(Message):
    """The reply of ``map``: the ids' prefix and how many; task ``i`` is ``<prefix>-<i>``."""

    prefix: str
    count: int


class TaskRequest(Message):
    """``fabric.task.get`` / ``cancel``: one task by id."""

    id: TaskIdStr


class WaitRequest(Message):
    """``fabric.task.wait``: the record once the task has ended, or as it is after ``timeout_s``."""

    id: TaskIdStr
    timeout_s: Annotated[float, Meta(ge=0, le=300)] = 30.0


class ListRequest(Message):
    """``fabric.task.list``: the newest tasks, optionally of one state."""

    state: ShortStr = ""
    limit: Annotated[int, Meta(ge=1, le=10_000)] = 100


# -- what happened -----------------------------------------------------------------


class TaskError(Message):
    """Why an attempt or a task failed.

    ``code``/``kind``/``message`` as in an error reply; for a Python exception also its
    ``type`` name, the remote ``traceback`` and ``exc`` (the pickled exception, empty when
    it could not be pickled).
    """

    code: int
    kind: str
    message: str
    type: str = ""
    traceback: str = ""
    exc: bytes = b""


class Attempt(Message):
    """One run of a task on a node."""

    number: int
    node: str
    start_ms: int = 0
    end_ms: int = 0
    #: the pool worker or process that ran it ("" until known)
    worker: str = ""
    #: "" while running; succeeded, error (the task's own failure), crashed, timeout, lost, cancelled
    outcome: str = ""
    error: str = ""


class CallbackOutcome(Message):
    """How a task's ``callback_url`` webhook went (the HTTP gateway delivers it: docs/gateway.md "Webhooks")."""

    #: "delivered" (the receiver answered 2xx) or "failed" (every attempt failed, or the URL is refused)
    outcome: str
    attempts: int
    #: the receiver's last HTTP status (0: none, the connection failed)
    status: int = 0
    error: str = ""
    time_ms: int = 0


class TaskRecord(Message):
    """A task as the KV bucket ``fabric_tasks`` keeps it (key: the id); every change is a compare-and-swap."""

    id: str
    kind: str
    state: str
    priority: int = 5
    resources: Resources | None = None
    core: str = ""
    retries: int = 3
    retry_exceptions: bool = False
    timeout_s: float = 0.0
    key: str = ""
    callback_url: str = ""
    deps: list[str] = []
    notify: str = ""
    #: the user who submitted it: with auth on, the authenticated caller, who alone (and admins) may get, wait
    #: for, cancel and list it; "" for a trusted caller (an admin, a service, a fabric without auth)
    owner: str = ""
    #: the encoding of its notices: that of the submit ("json" or "msgpack")
    notify_encoding: str = "json"
    #: where the body is: the last message on ``fabric.task.body.<body>`` in stream
    #: FABRIC_TASK_BODIES (``body`` is the task's id, or a ``map``'s prefix), and the index of
    #: this task's call there for a ``map`` (-1: the message is this task's body alone)
    body: str = ""
    body_index: int = -1
    created_ms: int = 0
    updated_ms: int = 0
    finished_ms: int = 0
    attempts: list[Attempt] = []
    #: system failures so far (the retries used)
    failures: int = 0
    #: the result, inline (``python``: the pickled value; ``core``/``opencl``: the output bytes;
    #: ``exec``: the process's stdout tail); ``result_ref`` names a stored large result instead
    result: bytes = b""
    result_ref: str = ""
    result_size: UInt = 0
    exit_code: int | None = None
    error: TaskError | None = None
    #: its webhook's delivery, once the gateway finished with it (None: no callback_url, or not yet)
    callback: CallbackOutcome | None = None


class TaskDone(Message):
    """A task's end, as the scheduler publishes it on the task's ``notify`` subject."""

    id: str
    state: str
    result: bytes = b""
    result_ref: str = ""
    exit_code: int | None = None
    error: TaskError | None = None


class TaskDoneBatch(Message):
    """What a ``notify`` subject receives: the tasks that ended since the last message to it."""

    done: list[TaskDone]


class TaskEvent(Message):
    """One state change, as published on ``fabric.task.events``."""

    id: str
    state: str
    prev: str
    time_ms: int
    node: str = ""
    attempt: int = 0


class TaskEventBatch(Message):
    events: list[TaskEvent]


class WebhookNotice(Message):
    """A task with a ``callback_url`` ended: what the scheduler stores in stream FABRIC_WEBHOOKS for a gateway
    to deliver (subject ``fabric.webhook.<id>``, deduplicated by the task id)."""

    id: str
    state: str
    kind: str
    owner: str
    callback_url: str
    created_ms: int = 0
    finished_ms: int = 0
    exit_code: int | None = None
    error: TaskError | None = None
    result_size: int = 0
    attempts: int = 0


class TaskStatsReply(Message):
    """``fabric.task.stats``: the active scheduler's figures (services and admins only).

    ``live``: unfinished tasks by state (exact, now); ``waiting_by_priority``: those not yet running, by
    priority; ``ended``: tasks that ended since this scheduler became active (``since_ms``), by state;
    ``latency_*``: their submit-to-end times as a cumulative histogram (``latency_counts[i]`` ended within
    ``latency_bounds_s[i]`` seconds), with their count and sum.
    """

    live: dict[str, int]
    waiting_by_priority: dict[str, int]
    ended: dict[str, int]
    latency_bounds_s: list[float]
    latency_counts: list[int]
    latency_count: int
    latency_sum_s: float
    since_ms: int
    instance: str = ""


class CallbackReport(Message):
    """``fabric.task.callback`` (gateways only): how the task's webhook went, to be kept on its record."""

    id: TaskIdStr
    outcome: Annotated[str, Meta(pattern=r"^(delivered|failed)$")]
    attempts: Annotated[int, Meta(ge=0, le=1_000_000)] = 0
    status: Annotated[int, Meta(ge=0, le=999)] = 0
    error: Annotated[str, Meta(max_length=1024)] = ""


class ResultRequest(Message):
    """``fabric.task.result``: bytes of a task's stored result (its ``result_ref``), from ``offset``.

    ``length`` 0: as many as one reply carries.  Only the task's owner (or a trusted
    caller) may read it; the client has no JetStream rights of its own.
    """

    id: TaskIdStr
    offset: UInt = 0
    length: UInt = 0


class ResultChunk(Message):
    """A piece of a stored result: ``data`` from the request's offset; ``size`` the whole result's."""

    data: bytes
    size: int


class ReleaseReply(Message):
    """``fabric.task.release``: whether a stored result was deleted (False: it was gone already)."""

    released: bool


class TaskListReply(Message):
    tasks: list[TaskRecord] = []


# -- the spawner side: pulling work ---------------------------------------------------


class TaskRun(Message):
    """One task handed to a node's spawner (in a :class:`PullReply`).

    ``payload`` is ready to run: for ``python`` the complete FPY1 frame, dependency
    results included.  ``gpus`` are the device indices the task was given
    (``CUDA_VISIBLE_DEVICES``), ``opencl_device`` the OpenCL device id.
    """

    id: str
    attempt: int
    kind: str
    payload: bytes = b""
    core: str = ""
    exec: ExecSpec | None = None
    timeout_s: float = 0.0
    gpus: list[int] = []
    opencl_device: str = ""
    #: the CPUs it asked for (Resources.cpus): a node runs tasks at once only while their CPUs fit its slots
    cpus: float = 1.0
    #: dependencies whose results are stored objects, not in ``payload``: task id -> object name in
    #: ``fabric_task_results`` (the node fetches them and adds them to the FPY1 frame)
    dep_refs: dict[str, str] = {}
    #: the task's owner (TaskRecord.owner): an ``exec`` task of a user runs as ``sandbox.client_user``
    owner: str = ""


class TaskResult(Message):
    """One attempt's end, as the spawner reports it (in a :class:`PullRequest`).

    ``outcome``: ``ok`` (ran; ``exit_code`` 0 is success), ``error`` (the task failed on
    its own: an exception, a nonzero exit), ``crashed`` (the worker died), ``timeout``,
    ``refused`` (the node could not run it at all: ``error`` says why).
    """

    id: str
    attempt: int
    outcome: str
    exit_code: int = 0
    output: bytes = b""
    error: TaskError | None = None
    worker: str = ""
    start_ms: int = 0
    end_ms: int = 0
    #: a large output is not inline: it is the object ``output_ref`` of the object store
    #: ``fabric_task_results`` (``output`` is then empty), ``output_size`` bytes
    output_ref: str = ""
    output_size: UInt = 0


class PullRequest(Message):
    """``fabric.task.pull``: a spawner asks for up to ``slots`` tasks and reports what it ran.

    The scheduler holds the request up to ``wait_ms`` while it has nothing to give,
    then answers with no tasks.  ``running`` lists ``"<id>/<attempt>"`` of every task
    the node is running (the heartbeat: a running task a node stops listing for a few
    seconds is lost and retried).  A spawner pulls again at least every second.
    """

    node: Annotated[str, Meta(min_length=1, max_length=64)]
    slots: Annotated[int, Meta(ge=0, le=65536)] = 0
    wait_ms: Annotated[int, Meta(ge=0, le=5000)] = 0
    running: list[str] = []
    results: list[TaskResult] = []
    #: the spawner's instance (changes when it restarts: its running tasks are gone)
    instance: ShortStr = ""
    #: how many tasks beyond its logical CPUs the node queues itself (its prefetch): the scheduler
    #: accounts ``cpus`` against the node's CPUs plus this; the node never runs more than its slots at once
    prefetch: Annotated[int, Meta(ge=0, le=1 << 20)] = 0
    #: the names of the compute cores loaded on the node: ``core`` tasks go only where theirs is
    cores: Annotated[list[str], Meta(max_length=4096)] = []


class PullReply(Message):
    """Tasks to run, and the ``"<id>/<attempt>"`` of the results recorded (the spawner forgets those)."""

    tasks: list[TaskRun] = []
    recorded: list[str] = []
    #: attempts the node should stop (their task was cancelled)
    cancel: list[str] = []


#: the largest result kept inline in a TaskRecord; a bigger one is stored in the object store
#: RESULTS_BUCKET by the node that produced it, under ``<id>.<attempt>``
INLINE_RESULT_MAX: Final = 64 << 10

#: how long a stored result is kept when nobody releases it (the bucket's TTL)
RESULTS_TTL_S: Final = 24 * 3600.0

"""Every request and reply of the public contract, as msgspec Structs.

This is the one schema module: services and clients import their messages from
here, and docs/protocol.md documents exactly these fields.  Rules:

* JSON is the default encoding; a request with header ``Content-Type:
  application/msgpack`` is MessagePack, and the reply uses the request's encoding.
  Bulk bytes on the hot path travel in the binary frame of ``fabric_ext.wire``
  (``Content-Type: application/x-fabric-frame``); in JSON, ``bytes`` fields are
  base64 strings (msgspec's standard), in MessagePack they are raw ``bin``.
* New fields are appended with defaults, so old peers keep working
  (msgspec's schema-evolution rules); unknown fields are ignored.
* Encoders and decoders are created once, here, and reused.
"""

from __future__ import annotations

import re
import struct
from typing import Annotated, Any, Final, TypeVar, cast

import msgspec
from msgspec import Meta, Struct

from .errors import BadRequest, FabricError

__all__ = [
    "AllocRequest",
    "AllocReply",
    "HandleRequest",
    "FreeReply",
    "ReallocRequest",
    "WriteRequest",
    "WriteReply",
    "ReadRequest",
    "ReadReply",
    "ReadItem",
    "ReadvRequest",
    "ReadResult",
    "ReadvReply",
    "WriteItem",
    "WritevRequest",
    "WriteResult",
    "WritevReply",
    "ShareReply",
    "RenewRequest",
    "RenewReply",
    "StatReply",
    "AttachReply",
    "MemInfoReply",
    "Limits",
    "Sandbox",
    "NativeExec",
    "SpawnRequest",
    "ExitInfo",
    "SpawnReply",
    "ProcRequest",
    "WaitRequest",
    "KillRequest",
    "StdinRequest",
    "ProcStatus",
    "ProcListRequest",
    "ProcListReply",
    "KillReply",
    "StdinReply",
    "SpawnerInfoReply",
    "ErrorInfo",
    "ErrorReply",
    "LoadCoreRequest",
    "CoreInfo",
    "CoreRequest",
    "CoreListReply",
    "HostInfo",
    "CpuLive",
    "MemoryLive",
    "DiskLive",
    "NetLive",
    "GpuProcess",
    "Gpu",
    "NvmlState",
    "OpenCLDevice",
    "OpenCLState",
    "NodeRecord",
    "NodeRequest",
    "NodeListReply",
    "DeviceGpu",
    "DeviceRecord",
    "DevicesReply",
    "GpuListReply",
    "encode_job_batch",
    "decode_job_batch",
    "encode_job_results",
    "decode_job_results",
    "Codec",
    "JSON",
    "MSGPACK",
    "CONTENT_TYPE_HEADER",
    "MSGPACK_CONTENT_TYPE",
    "FRAME_CONTENT_TYPE",
]

CONTENT_TYPE_HEADER: Final = "Content-Type"
MSGPACK_CONTENT_TYPE: Final = "application/msgpack"
FRAME_CONTENT_TYPE: Final = "application/x-fabric-frame"

#: The largest integer any request field takes: int64's maximum.  msgspec decodes
#: arbitrarily large integers, so every integer field of every request carries explicit
#: bounds (msgspec's bounds must themselves fit an int64); a value past them is 400
#: ``bad_request`` at decode, and whatever passes fits the C ``int64_t``/``long`` it may
#: land in (the arena's positions, setrlimit), where it would otherwise clamp or wrap.
INT_MAX: Final = 2**63 - 1
#: sizes, offsets, lengths and counts of bytes or things: 0 .. 2**63-1
UInt = Annotated[int, Meta(ge=0, le=INT_MAX)]
#: a handle token (see fabric.handles); at most 255 characters so it fits a frame item
HandleStr = Annotated[str, Meta(min_length=1, max_length=255)]
#: owner names are short labels used for quotas and per-owner segments
OwnerStr = Annotated[str, Meta(max_length=64, pattern=r"^[A-Za-z0-9_.@-]*$")]
#: lease time-to-live in seconds; 0 means no lease
TTL = Annotated[float, Meta(ge=0, le=365 * 24 * 3600)]


class Message(Struct, kw_only=True, omit_defaults=False):
    """Base of every wire message."""


# -- memory (allocator) ----------------------------------------------------


class AllocRequest(Message):
    """``fabric.mem.alloc`` / ``fabric.mem.<node>.alloc``: allocate *size* bytes (zeroed)."""

    size: UInt
    owner: OwnerStr = ""
    ttl_s: TTL = 0.0


class AllocReply(Message):
    """A new (or moved) block: its handle, size and lease deadline (0 = no lease)."""

    handle: str
    size: int
    node: str
    lease_deadline_ms: int = 0


class HandleRequest(Message):
    """Requests that name one handle and nothing else: free, stat, share, attach."""

    handle: HandleStr


class FreeReply(Message):
    freed: int


class ReallocRequest(Message):
    handle: HandleStr
    size: UInt


class WriteRequest(Message):
    handle: HandleStr
    data: bytes
    offset: UInt = 0


class WriteReply(Message):
    written: int


class ReadRequest(Message):
    handle: HandleStr
    offset: UInt = 0
    #: bytes to read; ``None`` reads to the end of the block
    length: UInt | None = None


class ReadReply(Message):
    data: bytes


class ReadItem(Message):
    handle: HandleStr
    offset: UInt = 0
    length: UInt | None = None


class ReadvRequest(Message):
    items: Annotated[list[ReadItem], Meta(max_length=65536)]


class ErrorInfo(Message):
    """An error inside a batch reply, or the body of an error reply."""

    code: int
    kind: str
    message: str


class ReadResult(Message):
    data: bytes | None = None
    error: ErrorInfo | None = None


class ReadvReply(Message):
    items: list[ReadResult]


class WriteItem(Message):
    handle: HandleStr
    data: bytes
    offset: UInt = 0


class WritevRequest(Message):
    items: Annotated[list[WriteItem], Meta(max_length=65536)]


class WriteResult(Message):
    written: int = 0
    error: ErrorInfo | None = None


class WritevReply(Message):
    items: list[WriteResult]


class ShareReply(Message):
    """A read-only handle to the same block."""

    handle: str


class RenewRequest(Message):
    handle: HandleStr
    ttl_s: TTL


class RenewReply(Message):
    lease_deadline_ms: int


class StatReply(Message):
    handle: str
    node: str
    size: int
    capacity: int
    owner: str
    generation: int
    writable: bool
    lease_deadline_ms: int = 0


class AttachReply(Message):
    """Where a same-host client maps the block's segment for the local fast path."""

    node: str
    seg: int
    path: str
    size: int
    boot_id: str
    hostname: str


class MemInfoReply(Message):
    """One node's arena statistics (``fabric.mem.info`` / ``fabric.mem.<node>.info``)."""

    node: str
    capacity: int
    mapped: int
    segments: int
    in_use: int
    peak_in_use: int
    blocks: int
    free_bytes: int
    largest_free: int
    fragmentation: float
    alloc_count: int
    free_count: int
    owners: dict[str, dict[str, int]] = {}
    #: the largest block one alloc/realloc may ask for (32 TiB); a larger size is 413 ``too_large``
    largest_block: int = 0


class ErrorReply(Message):
    """Body of an error reply (the ADR-32 headers carry the same code and text)."""

    error: ErrorInfo


def error_info(exc: FabricError) -> ErrorInfo:
    return ErrorInfo(code=exc.code, kind=exc.kind, message=exc.message)


# -- remote processes (spawner: services/spawner/service.py) ------------------

#: a process id: ``<node>:<local>``; the node part routes every request, the local
#: part names the process on that node (and is the last token of its output subject)
ProcIdStr = Annotated[str, Meta(min_length=3, max_length=160, pattern=r"^[A-Za-z0-9_-]{1,64}:[A-Za-z0-9_-]{1,64}$")]
#: seconds; non-negative, at most a year
Seconds = Annotated[float, Meta(ge=0, le=365 * 24 * 3600)]
#: a sha256 digest in lowercase hex
Sha256Hex = Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$")]


class Limits(Message):
    """Resource limits of one remote process; ``None`` leaves a limit unset.

    The spawn reply lists in ``enforced`` exactly the limits the kernel applies.
    """

    #: RLIMIT_CPU: CPU seconds (SIGXCPU, then SIGKILL)
    cpu_s: UInt | None = None
    #: RLIMIT_AS: bytes of address space
    address_space: UInt | None = None
    #: RLIMIT_NOFILE: open file descriptors
    open_files: UInt | None = None
    #: RLIMIT_NPROC: processes of the user (root ignores it unless another user runs the process)
    processes: UInt | None = None
    #: RLIMIT_FSIZE: bytes one file may grow to (SIGXFSZ)
    file_size: UInt | None = None
    #: a cgroup memory limit in bytes, for the whole process tree (needs a writable cgroup controller)
    mem_bytes: UInt | None = None
    #: wall-clock timeout in seconds: the whole process group is killed when it runs out
    wall_s: Seconds | None = None


class Sandbox(Message):
    """Isolation of one remote process; each option is listed in ``enforced`` when applied."""

    #: PR_SET_NO_NEW_PRIVS: setuid binaries and file capabilities grant nothing
    no_new_privs: bool = False
    #: False: a new, empty network namespace (no interfaces up, not even loopback)
    network: bool = True
    #: run as this user (a name or a numeric uid); its primary group and no supplementary groups
    user: str | None = None


class NativeExec(Message):
    """A native executable (UDCS ``NATIVE_EXEC``): stored once per node under its sha256.

    Send ``data`` once; later spawns name only ``sha256`` (404 ``executable_not_found``
    when this node has not stored it yet).
    """

    sha256: Sha256Hex
    architecture: str = ""
    os: str = "linux"
    data: bytes | None = None


class SpawnRequest(Message):
    """``fabric.proc.spawn`` / ``fabric.proc.<node>.spawn``: start one process."""

    argv: Annotated[list[str], Meta(min_length=1, max_length=65536)]
    #: variables added to (or overriding) the spawner's environment; see ``clear_env``
    env: dict[str, str] | None = None
    clear_env: bool = False
    cwd: str | None = None
    #: bytes written to stdin, which is then closed unless ``stdin_open``
    stdin: bytes | None = None
    #: keep stdin open for ``fabric.proc.<node>.stdin`` writes
    stdin_open: bool = False
    limits: Limits | None = None
    sandbox: Sandbox | None = None
    #: True: 422 ``not_enforceable`` unless every requested limit/option is applied
    strict: bool = True
    #: a subject that gets the output and exit messages too, from the very first byte
    stream_to: str | None = None
    #: wait up to this many seconds for the exit and put it in the reply
    wait_s: Seconds = 0.0
    #: bytes of stdout and of stderr kept as the tails returned with the exit
    tail_bytes: Annotated[int, Meta(ge=0, le=8 << 20)] = 64 << 10
    native: NativeExec | None = None
    owner: OwnerStr = ""
    #: publish output and exit on the per-process subject ``fabric.proc.<node>.out.<local>``
    #: (false: only ``stream_to`` and the replies get them -- a run-to-completion call
    #: saves the spawner and nats-server the messages nobody reads)
    announce: bool = True


class ExitInfo(Message):
    """How a process ended, with the tails of its output.

    ``max_rss`` never counts the spawner's own memory: Linux folds the high-water RSS
    of the address space a process leaves at ``execve`` (the spawner's) into the
    child's rusage, so the spawner reports rusage's peak only when it is above its own
    peak (then, or with a memory cgroup, ``max_rss_exact`` is True); otherwise the
    largest peak sampled while the process ran, a lower bound (``max_rss_exact`` False).
    """

    id: str
    #: the exit status when it exited; None when a signal ended it
    exit_code: int | None
    #: the signal number that ended it, else None
    signal: int | None
    #: why it ended: ``exited``, ``signaled``, ``killed`` (a kill request), ``timeout``
    #: (limits.wall_s), ``cpu_limit``, ``memory_limit`` (cgroup OOM), ``spawner_stopped``
    reason: str
    cpu_s: float
    #: peak resident set size in bytes, of the process or its largest descendant (or the
    #: peak charge of its memory cgroup, when it had one); see ``max_rss_exact``
    max_rss: int
    duration_s: float
    stdout: bytes
    stderr: bytes
    stdout_total: int = 0
    stderr_total: int = 0
    #: True: ``max_rss`` is the measured peak (the kernel's rusage, or the cgroup's peak).
    #: False: rusage could not tell the child's peak apart from the spawner's memory it
    #: inherits at exec (a peak below the spawner's own), so ``max_rss`` is the largest
    #: sample taken while it ran -- a lower bound (0 when never sampled)
    max_rss_exact: bool = False


class SpawnReply(Message):
    id: str
    node: str
    pid: int
    #: where the output and exit messages of this process are published
    subject: str
    #: the limits and sandbox options actually applied (``limits.cpu_s``, ``sandbox.network``...)
    enforced: list[str] = []
    #: requested but not applied (only when ``strict`` is false): name -> reason
    unenforced: dict[str, str] = {}
    #: the exit, when ``wait_s`` was given and the process ended in time
    exit: ExitInfo | None = None


class ProcRequest(Message):
    """``fabric.proc.<node>.info``... requests that name one process."""

    id: ProcIdStr


class WaitRequest(Message):
    id: ProcIdStr
    #: seconds to wait; 0 answers at once
    timeout_s: Seconds = 0.0


class KillRequest(Message):
    id: ProcIdStr
    #: a signal number (1..255; the spawner answers 400 for one its node does not know) or name
    #: (``SIGTERM``, ``TERM``, 15)
    signal: Annotated[int, Meta(ge=1, le=255)] | str = "SIGKILL"


class StdinRequest(Message):
    id: ProcIdStr
    data: bytes = b""
    #: close stdin after writing
    eof: bool = False


class ProcStatus(Message):
    """One process: ``state`` is ``running`` or ``exited`` (then ``exit`` is set)."""

    id: str
    node: str
    pid: int
    argv: list[str]
    state: str
    started_at: float
    owner: str = ""
    #: CPU % since the previous look (psutil; the whole process group), RSS bytes of the group
    cpu_percent: float = 0.0
    rss: int = 0
    #: psutil status of the leader (``running``, ``sleeping``, ``zombie``...)
    status: str = ""
    members: int = 0
    enforced: list[str] = []
    exit: ExitInfo | None = None


class ProcListRequest(Message):
    """``fabric.proc.<node>.list`` (an empty body lists the running processes)."""

    #: include the recently finished processes (kept for ``wait``/``status``)
    finished: bool = False
    owner: str | None = None


class ProcListReply(Message):
    node: str
    processes: list[ProcStatus]


class KillReply(Message):
    id: str
    #: False when the process had already ended
    delivered: bool
    state: str


class StdinReply(Message):
    written: int


class SpawnerInfoReply(Message):
    """``fabric.proc.<node>.info``: what this spawner can enforce, and its counts."""

    node: str
    running: int
    finished: int
    spawned: int
    architecture: str
    os: str
    #: every limit/sandbox name this node applies, e.g. ``limits.cpu_s``, ``sandbox.network``
    enforceable: list[str]
    #: the rest, with the reason
    not_enforceable: dict[str, str]
    cgroup: str
    blobs: int


# -- compute cores (spawner: services/spawner/pools.py) ------------------------

#: a core id: one subject token, minted by the spawner that loaded the core
CoreId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
#: a core's name (also sent to its workers in the v1 "new compute core" message)
CoreName = Annotated[str, Meta(min_length=1, max_length=255)]


class LoadCoreRequest(Message):
    """``fabric.core.load`` / ``fabric.core.<node>.load``: start a warm pool for a core.

    ``library`` is the ``.so`` file's bytes (raw ``bin`` in MessagePack, base64 in
    JSON); empty with ``name == "fabric.python"`` selects the built-in Python worker.

    One live pool per name on a node: the same name, library (sha256) and settings
    returns the live pool (``CoreInfo.reused``); another library or other settings is
    409 unless ``replace`` (a new pool; the old one drains).  A pool lives until
    unloaded, its spawner stops, or it has had no job for ``unload_after_s`` seconds.
    """

    name: CoreName
    library: bytes = b""
    min_workers: Annotated[int, Meta(ge=0, le=256)] = 1
    max_workers: Annotated[int, Meta(ge=1, le=256)] = 4
    #: seconds one job may run before its worker is killed (JobTimeout); 0 = no limit
    time_limit_s: Annotated[float, Meta(ge=0, le=7 * 24 * 3600)] = 60.0
    #: an idle worker above min_workers retires after this many seconds
    idle_s: Annotated[float, Meta(ge=0, le=24 * 3600)] = 30.0
    #: also listen for external v1 workers (unix socket, and TCP on ``listen_host``)
    external: bool = False
    listen_host: str = "127.0.0.1"
    #: start a new pool even if one of this name is live; the old one drains (finishes its jobs, then stops)
    replace: bool = False
    #: the spawner unloads the pool after this many seconds without a job; 0 = never
    unload_after_s: Annotated[float, Meta(ge=0, le=365 * 24 * 3600)] = 0.0


class CoreInfo(Message):
    """One loaded core and its pool (reply of load and stats, items of list)."""

    core: str
    node: str
    name: str
    min_workers: int
    max_workers: int
    time_limit_s: float
    workers: int = 0
    idle: int = 0
    external_workers: int = 0
    queued: int = 0
    running: int = 0
    jobs_done: int = 0
    jobs_failed: int = 0
    crashes: int = 0
    timeouts: int = 0
    workers_started: int = 0
    workers_refused: int = 0
    #: where external v1 workers connect (``unix:/path`` and ``tcp:HOST:PORT``), when asked for
    listen_unix: str = ""
    listen_tcp: str = ""
    #: sha256 (hex) of the library, or ``fabric.python`` for the built-in worker
    digest: str = ""
    idle_s: float = 30.0
    unload_after_s: float = 0.0
    #: (load reply) the load found this pool live and returned it; nothing was started or changed
    reused: bool = False
    #: replaced by core ``replaced_by``: takes no new jobs, stops once its queued and running jobs are done
    draining: bool = False
    replaced_by: str = ""


class CoreRequest(Message):
    """``fabric.core.<node>.stats`` / ``unload``: one core by id."""

    core: CoreId


class CoreListReply(Message):
    """``fabric.core.<node>.list``: every core loaded on the node."""

    node: str
    cores: list[CoreInfo] = []


# -- node telemetry (gpu-monitor) ---------------------------------------------
#
# One gpu-monitor per node samples the node and publishes a NodeRecord on
# ``fabric.telemetry.<node>`` every interval; the same record is the node's entry in
# the JetStream KV bucket ``fabric_nodes`` (key: the node name), whose TTL removes a
# node whose heartbeats stop.  Sizes are bytes, rates per second, temperatures in
# degrees Celsius, power in watts, clocks in MHz, percentages 0-100.  A figure the
# node cannot measure is -1 (numbers) or "" (text), never a guess.


class HostInfo(Message):
    """What a node is: measured once at the monitor's start."""

    hostname: str
    node: str
    architecture: str          # platform.machine(): x86_64, aarch64, ...
    os: str                    # "linux", "darwin", "windows"
    os_release: str = ""       # kernel release / OS version
    cpu_model: str = ""
    cpu_cores: int = 0         # logical CPUs
    cpu_physical_cores: int = 0
    ram_bytes: int = 0
    python: str = ""           # implementation and ABI: "cpython-311-x86_64-linux-gnu"
    fabric_version: str = ""
    #: the machine's identity (fabric.hostid): two nodes with the same host_id share memory
    host_id: str = ""
    boot_time_s: float = 0.0   # Unix time of the machine's boot


class CpuLive(Message):
    percent: float = 0.0                 # all CPUs, since the previous sample
    per_core: list[float] = []           # one figure per logical CPU
    load_1: float = 0.0
    load_5: float = 0.0
    load_15: float = 0.0
    freq_mhz: float = -1.0


class MemoryLive(Message):
    total: int = 0
    available: int = 0
    used: int = 0
    percent: float = 0.0
    swap_total: int = 0
    swap_used: int = 0
    swap_percent: float = 0.0


class DiskLive(Message):
    """One mounted filesystem: the root, and the one holding fabric's state dir."""

    path: str
    total: int = 0
    used: int = 0
    free: int = 0
    percent: float = 0.0


class NetLive(Message):
    """Counters since boot, and rates since the previous sample (all interfaces but loopback)."""

    bytes_sent: int = 0
    bytes_recv: int = 0
    packets_sent: int = 0
    packets_recv: int = 0
    sent_per_s: float = 0.0
    recv_per_s: float = 0.0


class GpuProcess(Message):
    """A process holding a GPU: what NVML reports, and what fabric knows of it."""

    pid: int
    used_memory: int = -1                # bytes; -1 when the driver does not say
    kind: str = "compute"                # "compute" or "graphics"
    name: str = ""                       # the process's command name on the node
    #: the fabric process id (``<node>:<local>``) or core id (``core:<id>``) it belongs to; "" when not fabric's
    fabric_id: str = ""


class Gpu(Message):
    """One NVIDIA GPU through NVML."""

    index: int
    id: str                              # "<node>:gpu:<index>"
    uuid: str = ""
    name: str = ""
    memory_total: int = -1
    memory_used: int = -1
    memory_free: int = -1
    utilization_gpu: float = -1.0        # percent of time a kernel ran, over the driver's sample period
    utilization_memory: float = -1.0
    temperature_c: float = -1.0
    power_w: float = -1.0
    power_limit_w: float = -1.0
    clock_sm_mhz: int = -1
    clock_memory_mhz: int = -1
    compute_capability: str = ""         # "8.9"
    processes: list[GpuProcess] = []
    pci_bus_id: str = ""                 # "dddd:bb:dd.f", lowercase hex (fabric.gpupair); "" when NVML cannot say
    #: the node's OpenCL devices that are this GPU, and how they were matched (fabric.gpupair.pair):
    #: "pci_bus_id", "order", "none" (unpaired); "" when the monitor did not pair
    opencl_ids: list[str] = []
    paired_by: str = ""


class NvmlState(Message):
    """Whether NVML answered; ``reason`` says why not (no driver, no library, no GPU)."""

    available: bool = False
    reason: str = ""
    driver_version: str = ""
    nvml_version: str = ""
    cuda_driver_version: str = ""


class OpenCLDevice(Message):
    """One OpenCL device; ``id`` is what ``fc.opencl(device=...)`` takes."""

    id: str                              # "<node>:cl:<platform index>:<device index>"
    platform_index: int
    device_index: int
    platform: str = ""
    name: str = ""
    type: str = ""                       # "GPU", "CPU", "ACCELERATOR", "CUSTOM"
    vendor: str = ""
    version: str = ""
    driver_version: str = ""
    compute_units: int = 0
    global_memory: int = 0
    local_memory: int = 0
    max_work_group_size: int = 0
    max_clock_mhz: int = 0
    pci_bus_id: str = ""                 # "dddd:bb:dd.f"; "" when the driver does not say (CPUs, PoCL)
    gpu_id: str = ""                     # the NVML Gpu.id this device is (fabric.gpupair); "" when none


class OpenCLState(Message):
    available: bool = False
    reason: str = ""
    platforms: list[str] = []
    devices: list[OpenCLDevice] = []


class NodeRecord(Message):
    """A node's heartbeat and registry entry: what it is and how it is now."""

    node: str
    host: HostInfo
    seq: int = 0                          # heartbeat number since the monitor started
    time_ms: int = 0                      # the node's clock when sampled (Unix ms)
    interval_s: float = 1.0               # the node's heartbeat interval
    cpu: CpuLive = msgspec.field(default_factory=CpuLive)
    memory: MemoryLive = msgspec.field(default_factory=MemoryLive)
    disks: list[DiskLive] = []
    net: NetLive = msgspec.field(default_factory=NetLive)
    gpus: list[Gpu] = []
    nvml: NvmlState = msgspec.field(default_factory=NvmlState)
    opencl: OpenCLState = msgspec.field(default_factory=OpenCLState)
    #: set by the registry's reader: "up", or "stale" when the last heartbeat is older than 3 intervals
    status: str = "up"
    #: set by the registry's reader: seconds since the last heartbeat was stored
    age_s: float = 0.0


class NodeRequest(Message):
    """``fabric.nodes.get``: one node by name."""

    node: Annotated[str, Meta(min_length=1, max_length=64)]


class NodeListReply(Message):
    nodes: list[NodeRecord] = []


class DeviceGpu(Message):
    """A GPU in the UDCS ``GET /api/devices`` shape, plus its id and free memory."""

    name: str
    memory_gb: float
    compute_capability: str
    utilization: float
    id: str = ""
    memory_free_gb: float = -1.0


class DeviceRecord(Message):
    """A node in the UDCS ``GET /api/devices`` shape (``id`` is the node name)."""

    id: str
    hostname: str
    architecture: str
    os: str
    gpus: list[DeviceGpu]
    cpu_cores: int
    ram_gb: float
    status: str                           # "available", "busy" (CPU above 90 %) or "offline" (stale)
    opencl: list[OpenCLDevice] = []


class DevicesReply(Message):
    devices: list[DeviceRecord] = []


class GpuListReply(Message):
    """``fabric.nodes.<node>.gpus``: the node's GPUs sampled now (what a scheduler places by)."""

    node: str
    gpus: list[Gpu] = []
    nvml: NvmlState = msgspec.field(default_factory=NvmlState)


# -- the job batch frames (fabric.core.<node>.map.<core>) ---------------------
#
# Little-endian.  A batch request is ``"FJB1" | count u32 | count x length u64 |
# the job inputs back to back``; its reply is ``"FJR1" | count u32 | count x
# (exit_code i32, error u32, length u64) | the outputs back to back``.  ``error`` 0
# means the job ran and ``exit_code`` is the core's; otherwise it is the fabric
# error code and the item's bytes are ``kind`` UTF-8, a newline, then the message.

JOB_BATCH_MAGIC: Final = b"FJB1"
JOB_RESULTS_MAGIC: Final = b"FJR1"
#: the most jobs one batch frame may carry
MAX_JOB_BATCH: Final = 65536
_STRUCT_HEAD = struct.Struct("<4sI")


def encode_job_batch(items: list[Any]) -> bytes:
    """One batch request frame for *items* (bytes-like job inputs)."""
    n = len(items)
    if n > MAX_JOB_BATCH:
        raise BadRequest(f"a job batch holds at most {MAX_JOB_BATCH} jobs, got {n}")
    table = struct.pack(f"<4sI{n}Q", JOB_BATCH_MAGIC, n, *[len(memoryview(x).cast("B")) for x in items])
    return b"".join([table, *items])


def decode_job_batch(data: Any) -> list[memoryview]:
    """The job inputs of a batch request, as views into *data* (no copy); BadRequest if malformed."""
    mv = memoryview(data).cast("B")
    if len(mv) < 8:
        raise BadRequest("job batch frame: truncated header")
    magic, n = _STRUCT_HEAD.unpack_from(mv)
    if magic != JOB_BATCH_MAGIC:
        raise BadRequest(f"job batch frame: bad magic {bytes(magic)!r}")
    if n > MAX_JOB_BATCH:
        raise BadRequest(f"job batch frame: {n} jobs exceeds {MAX_JOB_BATCH}")
    pos = 8 + 8 * n
    if len(mv) < pos:
        raise BadRequest("job batch frame: truncated length table")
    out: list[memoryview] = []
    for length in struct.unpack_from(f"<{n}Q", mv, 8):
        end = pos + length
        if end > len(mv):
            raise BadRequest("job batch frame: a job's length runs past the frame")
        out.append(mv[pos:end])
        pos = end
    if pos != len(mv):
        raise BadRequest(f"job batch frame: {len(mv) - pos} trailing bytes")
    return out


def encode_job_results(results: list[tuple[int, int, Any]]) -> bytes:
    """One batch reply frame from ``(exit_code, error, output)`` triples."""
    n = len(results)
    flat: list[int] = []
    for code, err, out in results:
        flat += (code, err, len(out))
    return b"".join([struct.pack(f"<4sI{'iIQ' * n}", JOB_RESULTS_MAGIC, n, *flat), *[r[2] for r in results]])


def decode_job_results(data: Any) -> list[tuple[int, int, memoryview]]:
    """``(exit_code, error, output view)`` per job of a batch reply; BadRequest if malformed."""
    mv = memoryview(data).cast("B")
    if len(mv) < 8:
        raise BadRequest("job results frame: truncated header")
    magic, n = _STRUCT_HEAD.unpack_from(mv)
    if magic != JOB_RESULTS_MAGIC or n > MAX_JOB_BATCH:
        raise BadRequest("job results frame: bad magic or count")
    pos = 8 + 16 * n
    if len(mv) < pos:
        raise BadRequest("job results frame: truncated table")
    out: list[tuple[int, int, memoryview]] = []
    for code, err, length in struct.iter_unpack("<iIQ", mv[8:pos]):
        end = pos + length
        if end > len(mv):
            raise BadRequest("job results frame: an output runs past the frame")
        out.append((code, err, mv[pos:end]))
        pos = end
    return out


# -- codecs ----------------------------------------------------------------

T = TypeVar("T")


class Codec:
    """One wire encoding (JSON or MessagePack) with cached per-type decoders."""

    __slots__ = ("name", "content_type", "_encoder", "_decoders", "_decoder_factory")

    def __init__(self, name: str, content_type: str, encoder: Any, decoder_factory: Any) -> None:
        self.name = name
        self.content_type = content_type
        self._encoder = encoder
        self._decoder_factory = decoder_factory
        self._decoders: dict[type, Any] = {}

    def encode(self, msg: Any) -> bytes:
        return cast(bytes, self._encoder.encode(msg))

    def decode(self, data: bytes, type_: type[T]) -> T:
        """Decode *data* as *type_*; malformed input raises :class:`BadRequest`."""
        dec = self._decoders.get(type_)
        if dec is None:
            dec = self._decoders[type_] = self._decoder_factory(type_)
        try:
            return cast(T, dec.decode(data))
        except msgspec.ValidationError as exc:
            raise BadRequest(f"invalid {type_.__name__}: {self._explain(data, str(exc))}") from None
        except msgspec.DecodeError as exc:
            raise BadRequest(f"malformed {self.name}: {exc}") from None

    def _explain(self, data: bytes, text: str) -> str:
        """msgspec's ``Expected `int` <= 9223372036854775807 - at `$.size``` as ``size = 18446744073709551616: ...``.

        The offending value is shown as the client sent it (looked up in a schema-less
        decode of the body: this runs only for a rejected request), so a client sees
        which of its numbers was refused rather than only the bound.
        """
        m = _AT_PATH.match(text)
        if m is None:
            return text
        path = m["path"]
        field = path[1:] if path.startswith(".") else path or "the body"
        try:
            value = self._value_at(self.decode_any(data), path)
        except (LookupError, msgspec.MsgspecError):  # not found, or a number even a schema-less decode refuses
            return f"{field}: {m['what']}"
        return f"{field} = {_show(value)}: {m['what']}"

    def decode_any(self, data: bytes) -> Any:
        """The body as plain objects (no schema); DecodeError/ValidationError if malformed."""
        dec = self._decoders.get(Any)
        if dec is None:
            dec = self._decoders[Any] = self._decoder_factory(Any)
        return dec.decode(data)

    def _value_at(self, obj: Any, path: str) -> Any:
        """The value at a msgspec error path (``.items[3].offset``); LookupError if it cannot be found."""
        pos = 0
        while pos < len(path):
            step = _PATH_STEP.match(path, pos)
            if step is None:  # a dict key (msgspec writes ``[...]``) or anything unexpected
                raise LookupError(path)
            key, index = step.groups()
            try:
                obj = obj[key] if key is not None else obj[int(index)]
            except (KeyError, IndexError, TypeError) as exc:
                raise LookupError(path) from exc
            pos = step.end()
        return obj


#: msgspec's validation messages end with where the value was: `` - at `$.items[3].offset` ``
_AT_PATH: Final = re.compile(r"(?P<what>.*) - at `\$(?P<path>[^`]*)`", re.S)
_PATH_STEP: Final = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[([0-9]+)\]")


def _show(value: Any) -> str:
    """A rejected value for an error message: scalars in full (a huge number by its size), others by type."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value) if value.bit_length() <= 256 else f"a {value.bit_length()}-bit integer"
    if isinstance(value, str):
        return repr(value) if len(value) <= 80 else f"{value[:60]!r}... ({len(value)} characters)"
    if isinstance(value, float):
        return repr(value)
    if value is None or isinstance(value, bool):
        return "null" if value is None else str(value).lower()
    return f"a {type(value).__name__}"


JSON: Final = Codec("JSON", "application/json", msgspec.json.Encoder(), msgspec.json.Decoder)
MSGPACK: Final = Codec("MessagePack", MSGPACK_CONTENT_TYPE, msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder)


def codec_for(headers: dict[str, str] | None) -> Codec:
    """The codec a request asked for through its ``Content-Type`` header."""
    if headers and headers.get(CONTENT_TYPE_HEADER) == MSGPACK_CONTENT_TYPE:
        return MSGPACK
    return JSON

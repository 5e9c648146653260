"""The spawner's process messages (``fabric.proc.*``).

Part of :mod:`fabric.schema` (its docstring has the rules every message follows)."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from .base import Message, OwnerStr, UInt

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
    #: ed25519 signature (base64) of the file's digest by a trusted key: required where the node says
    #: ``sandbox.require_signed`` (fabric.signing; ``fabric sign FILE``)
    signature: Annotated[str, Meta(max_length=128)] = ""


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

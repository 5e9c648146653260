"""The gpu-monitor's messages: node records, telemetry, devices (``fabric.nodes.*``).

Part of :mod:`fabric.schema` (its docstring has the rules every message follows)."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from .base import Message

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
    #: labels and custom resources the node declares (``fabric up --labels/--resources``), for task placement
    labels: dict[str, str] = {}
    resources: dict[str, float] = {}


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

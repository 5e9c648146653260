"""Which OpenCL device is which NVML GPU: pairing by PCI bus id, in one pure function.

NVML (``services/gpu_monitor/nvml.py``) and OpenCL (``services/gpu_monitor/opencl_probe.py``)
enumerate a node's GPUs each in its own order, so "the i-th NVIDIA OpenCL GPU is NVML GPU
i" is a guess that breaks on a node with several GPUs, other vendors' GPUs, or a GPU
NVML drops.  Both sides say where a device sits on the PCI bus (NVML's
``pciInfo.busId``; OpenCL's ``cl_khr_pci_bus_info`` or NVIDIA's
``CL_DEVICE_PCI_*_ID_NV``); :func:`canonical_bus_id` writes both as ``dddd:bb:dd.f``
(lowercase hex) and :func:`pair` matches them.  The gpu-monitor records the result in
its node records (``Gpu.opencl_ids``, ``Gpu.paired_by``, ``OpenCLDevice.gpu_id``) and
``fc.opencl(device="gpu")`` (:func:`fabric.opencl.choose_device`) places by the same
pairing (:func:`gpu_by_device`), so the GPU a job lands on is the one whose free memory
was read.

The rule (docs/protocol.md, "Nodes and telemetry"):

* a GPU and an OpenCL device with the same bus id are the same hardware
  (``paired_by: "pci_bus_id"``); several OpenCL devices may be one GPU (two platforms
  driving it);
* only when **neither** side has a bus id -- no NVML GPU and no NVIDIA OpenCL GPU has
  one -- NVML's GPU *i* is the *i*-th GPU of the NVIDIA OpenCL platforms
  (``"order"``), and only when both count the same number of GPUs;
* otherwise a GPU without a match stays unpaired (``"none"``): where one side has
  bus ids and the other does not, any pairing would be invented.

>>> canonical_bus_id("00000000:3B:00.0")
'0000:3b:00.0'
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import msgspec

from .schema import Gpu, OpenCLDevice, OpenCLState

__all__ = [
    "BY_BUS_ID",
    "BY_ORDER",
    "UNPAIRED",
    "bus_id",
    "canonical_bus_id",
    "gpu_by_device",
    "pair",
    "pair_state",
]

#: ``Gpu.paired_by`` values
BY_BUS_ID = "pci_bus_id"
BY_ORDER = "order"
UNPAIRED = "none"

# [domain:]bus:device.function in hex: NVML writes an 8-digit domain ("00000000:3B:00.0"),
# its legacy field and lspci 4 digits, some tools none
_BUS_ID = re.compile(r"^(?:([0-9a-fA-F]{1,8}):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])$")


def bus_id(domain: int, bus: int, device: int, function: int) -> str:
    """The canonical ``dddd:bb:dd.f`` of a PCI address; "" when a part is out of PCI's ranges."""
    if not (0 <= domain <= 0xFFFFFFFF and 0 <= bus <= 0xFF and 0 <= device <= 0x1F and 0 <= function <= 7):
        return ""
    return f"{domain:04x}:{bus:02x}:{device:02x}.{function:x}"


def canonical_bus_id(text: str) -> str:
    """*text* (``00000000:3B:00.0``, ``0000:3b:00.0``, ``3b:00.0``) as ``dddd:bb:dd.f``; "" when not one."""
    m = _BUS_ID.match(text.strip())
    if m is None:
        return ""
    domain, bus, device, function = (int(x, 16) if x else 0 for x in m.groups())
    return bus_id(domain, bus, device, function)


def _is_gpu(dev: OpenCLDevice) -> bool:
    return "GPU" in dev.type.upper().split()


def _is_nvidia_gpu(dev: OpenCLDevice) -> bool:
    return _is_gpu(dev) and "NVIDIA" in (dev.platform + dev.vendor).upper()


def pair(gpus: Sequence[Gpu], devices: Sequence[OpenCLDevice]) -> tuple[list[Gpu], list[OpenCLDevice]]:
    """Copies of *gpus* and *devices* with the pairing filled in (the inputs are left as they are).

    Each GPU gets ``opencl_ids`` and ``paired_by``; each OpenCL device that is a GPU
    gets its ``gpu_id``, every other device ``""``.
    """
    by_bus: dict[str, list[str]] = {}
    for d in devices:
        if d.pci_bus_id:
            by_bus.setdefault(d.pci_bus_id, []).append(d.id)
    nvidia = sorted((d for d in devices if _is_nvidia_gpu(d)), key=lambda d: (d.platform_index, d.device_index))
    # order only when no side can say where its GPUs are; a GPU that fell off NVML's bus
    # keeps its index, so the others still line up -- but a different count on the two
    # sides (a GPU one of them cannot see) makes every position a guess
    by_order = (not any(g.pci_bus_id for g in gpus) and not any(d.pci_bus_id for d in nvidia)
                and len(nvidia) == (max((g.index for g in gpus), default=-1) + 1))
    # two NVML GPUs with one bus id would be a driver's error: neither is trusted with a pairing
    claims = Counter(g.pci_bus_id for g in gpus if g.pci_bus_id)
    out_gpus: list[Gpu] = []
    gpu_of: dict[str, str] = {}
    for g in gpus:
        ids: list[str] = []
        how = UNPAIRED
        if g.pci_bus_id in by_bus and claims[g.pci_bus_id] == 1:
            ids, how = list(by_bus[g.pci_bus_id]), BY_BUS_ID
        elif by_order and 0 <= g.index < len(nvidia):
            ids, how = [nvidia[g.index].id], BY_ORDER
        for i in ids:
            gpu_of[i] = g.id
        out_gpus.append(msgspec.structs.replace(g, opencl_ids=ids, paired_by=how))
    out_devices = [msgspec.structs.replace(d, gpu_id=gpu_of.get(d.id, "")) for d in devices]
    return out_gpus, out_devices


def pair_state(gpus: Sequence[Gpu], opencl: OpenCLState) -> tuple[list[Gpu], OpenCLState]:
    """:func:`pair` for a node record: the GPUs and a copy of the OpenCL state, paired."""
    paired_gpus, paired_devices = pair(gpus, opencl.devices)
    return paired_gpus, msgspec.structs.replace(opencl, devices=paired_devices)


def gpu_by_device(gpus: Sequence[Gpu], devices: Sequence[OpenCLDevice]) -> dict[str, Gpu]:
    """OpenCL device id -> the NVML GPU it is, as the monitor recorded it (or :func:`pair` when it did not).

    A record from a monitor that pairs carries ``paired_by`` on its GPUs: that pairing is
    used as is.  An older monitor's record (no ``paired_by``) is paired here by the same rule.
    """
    if not any(g.paired_by for g in gpus):
        gpus, devices = pair(gpus, devices)
    by_id = {g.id: g for g in gpus}
    return {d.id: by_id[d.gpu_id] for d in devices if d.gpu_id in by_id}

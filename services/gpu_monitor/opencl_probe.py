"""OpenCL platforms and devices on this node (pyopencl), listed once when the monitor starts.

Each device gets the id ``<node>:cl:<platform index>:<device index>`` that
``fc.opencl(device=...)`` takes.  No pyopencl, no ICD (the loader finds no platform:
``PLATFORM_NOT_FOUND_KHR``) and platforms without devices are normal states: the
answer is ``OpenCLState(available=False, reason=...)``, never an exception.  With the
PyPI ``pocl-binary-distribution`` wheel installed, pyopencl's bundled ICD loader also
finds PoCL's CPU device, so every node has at least that one.

A GPU's PCI address (``pci_bus_id``, ``dddd:bb:dd.f``) is what pairs it with its NVML
record (:mod:`fabric.gpupair`): read through ``cl_khr_pci_bus_info`` where the device
has it, else NVIDIA's ``CL_DEVICE_PCI_*_ID_NV`` attributes; "" for a device that has
neither (a CPU, PoCL).

>>> state = probe("node-a")
>>> [d.id for d in state.devices]     # e.g. ['node-a:cl:0:0'] (PoCL on the CPU)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import struct
from collections.abc import Callable
from typing import Any, TypeVar

from fabric.gpupair import bus_id
from fabric.schema import OpenCLDevice, OpenCLState

__all__ = ["probe", "device_info_raw", "CL_DEVICE_PCI_BUS_INFO_KHR"]

T = TypeVar("T")

#: cl_khr_pci_bus_info's query (cl_ext.h), answered as four cl_uint: domain, bus, device,
#: function.  pyopencl has no name for it, and its get_info refuses a param whose type it
#: does not know ("Device.get_info failed: INVALID_VALUE", the driver never asked), so it
#: goes to clGetDeviceInfo directly, with the device's handle (``Device.int_ptr``)
CL_DEVICE_PCI_BUS_INFO_KHR = 0x410F
_PCI_BUS_INFO = struct.Struct("=4I")


def _device_type(cl: Any, bits: int) -> str:
    # a device may carry several bits (DEFAULT alongside GPU): name the kind, in this order
    for name in ("GPU", "CPU", "ACCELERATOR", "CUSTOM"):
        flag = getattr(cl.device_type, name, 0)
        if flag and bits & flag:
            return name
    return ""


def _name(obj: Any) -> str:
    return str(obj.name).strip()


def _info(read: Callable[[], T], default: T) -> T:
    """One device property; a driver that cannot say leaves the schema's default."""
    try:
        return read()
    except Exception:  # pyopencl.Error (INVALID_VALUE for an unsupported query) or a missing attribute
        return default


@functools.lru_cache(maxsize=1)
def _opencl_library() -> Any:
    """The OpenCL library pyopencl loaded (a wheel bundles its own, renamed), else the system's; None if none."""
    paths: list[str] = []
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip().rsplit("/", 1)[-1].startswith("libOpenCL"):
                    paths.append(fields[5].rstrip())
    except OSError:
        pass
    found = ctypes.util.find_library("OpenCL")
    for path in [*dict.fromkeys(paths), *([found] if found else [])]:
        try:
            lib = ctypes.CDLL(path)  # already loaded: dlopen hands back the same library
            fn = lib.clGetDeviceInfo
        except (OSError, AttributeError):
            continue
        fn.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_size_t, ctypes.c_void_p,
                       ctypes.POINTER(ctypes.c_size_t)]
        fn.restype = ctypes.c_int
        return lib
    return None


def device_info_raw(dev: Any, param: int, size: int) -> tuple[int, bytes]:
    """``clGetDeviceInfo(dev, param, size)``: the OpenCL status (0 = success) and the *size* bytes.

    Every ICD loader dispatches a call through the handle's own driver table, so the
    library found here answers for a device of any platform.
    """
    lib = _opencl_library()
    if lib is None:
        return -1, b""  # CL_DEVICE_NOT_FOUND: no library to ask
    buf = ctypes.create_string_buffer(size)
    got = ctypes.c_size_t(0)
    status = int(lib.clGetDeviceInfo(ctypes.c_void_p(int(dev.int_ptr)), param, size, buf, ctypes.byref(got)))
    if status == 0 and got.value != size:
        return -30, b""  # CL_INVALID_VALUE: an answer of another shape than asked
    return status, buf.raw


def _pci_bus_id(dev: Any) -> str:
    """The device's PCI address as ``dddd:bb:dd.f``; "" when its driver does not say."""
    extensions = _info(lambda: str(dev.extensions), "").split()
    if "cl_khr_pci_bus_info" in extensions:
        status, raw = _info(lambda: device_info_raw(dev, CL_DEVICE_PCI_BUS_INFO_KHR, _PCI_BUS_INFO.size),
                            (-1, b""))
        if status == 0:
            return bus_id(*_PCI_BUS_INFO.unpack(raw))
    if "cl_nv_device_attribute_query" in extensions:
        # pyopencl knows these three; the slot is device << 3 | function
        bus = _info(lambda: int(dev.pci_bus_id_nv), -1)
        slot = _info(lambda: int(dev.pci_slot_id_nv), -1)
        if bus >= 0 and slot >= 0:
            # drivers older than the domain query run single-domain machines in practice (hwloc
            # assumes 0 too); a wrong guess leaves the GPU unpaired, it pairs nothing else
            domain = _info(lambda: int(dev.pci_domain_id_nv), 0)
            return bus_id(domain, bus, slot >> 3, slot & 7)
    return ""


def _device(cl: Any, node: str, p: int, d: int, platform: str, dev: Any) -> OpenCLDevice:
    return OpenCLDevice(
        id=f"{node}:cl:{p}:{d}", platform_index=p, device_index=d, platform=platform,
        name=_info(lambda: dev.name.strip(), ""),
        type=_info(lambda: _device_type(cl, int(dev.type)), ""),
        vendor=_info(lambda: dev.vendor.strip(), ""),
        version=_info(lambda: dev.version.strip(), ""),
        driver_version=_info(lambda: dev.driver_version.strip(), ""),
        compute_units=_info(lambda: int(dev.max_compute_units), 0),
        global_memory=_info(lambda: int(dev.global_mem_size), 0),
        local_memory=_info(lambda: int(dev.local_mem_size), 0),
        max_work_group_size=_info(lambda: int(dev.max_work_group_size), 0),
        max_clock_mhz=_info(lambda: int(dev.max_clock_frequency), 0),
        pci_bus_id=_pci_bus_id(dev),
    )


def probe(node: str) -> OpenCLState:
    """Every OpenCL platform and device here; ``available`` is False (with the reason) when none."""
    try:
        import pyopencl as cl
    except ImportError as exc:
        return OpenCLState(available=False, reason=f"pyopencl is not installed ({exc})")
    except OSError as exc:  # pyopencl present, its native loader not loadable
        return OpenCLState(available=False, reason=f"pyopencl cannot load its OpenCL library: {exc}")
    try:
        platforms = cl.get_platforms()
    except cl.Error as exc:
        # the ICD loader found no platform (PLATFORM_NOT_FOUND_KHR) or none that answered
        return OpenCLState(available=False, reason=f"no OpenCL platform: {_error_text(exc)}")
    names: list[str] = []
    devices: list[OpenCLDevice] = []
    problems: list[str] = []
    for p, plat in enumerate(platforms):
        pname = _info(functools.partial(_name, plat), "")
        names.append(pname)
        try:
            # pyopencl answers [] for DEVICE_NOT_FOUND; anything else is this platform's trouble only
            found = plat.get_devices()
        except cl.Error as exc:
            problems.append(f"platform {p} ({pname}): {_error_text(exc)}")
            continue
        devices.extend(_device(cl, node, p, d, pname, dev) for d, dev in enumerate(found))
    if not platforms:
        return OpenCLState(available=False, reason="no OpenCL platform (no ICD installed)")
    if not devices:
        problems.insert(0, f"no OpenCL device on {len(platforms)} platform(s)")
        return OpenCLState(available=False, reason="; ".join(problems), platforms=names)
    return OpenCLState(available=True, reason="; ".join(problems), platforms=names, devices=devices)


def _error_text(exc: Exception) -> str:
    """``clGetPlatformIDs failed: PLATFORM_NOT_FOUND_KHR``: pyopencl's own text names the call and status."""
    text = str(exc).strip()
    if "PLATFORM_NOT_FOUND_KHR" in text:
        text += " (the ICD loader found no OpenCL driver)"
    return text or f"OpenCL error {getattr(exc, 'code', '?')}"

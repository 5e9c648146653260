"""OpenCL platforms and devices on this node (pyopencl), listed once when the monitor starts.

Each device gets the id ``<node>:cl:<platform index>:<device index>`` that
``fc.opencl(device=...)`` takes.  No pyopencl, no ICD (the loader finds no platform:
``PLATFORM_NOT_FOUND_KHR``) and platforms without devices are normal states: the
answer is ``OpenCLState(available=False, reason=...)``, never an exception.  With the
PyPI ``pocl-binary-distribution`` wheel installed, pyopencl's bundled ICD loader also
finds PoCL's CPU device, so every node has at least that one.

>>> state = probe("node-a")
>>> [d.id for d in state.devices]     # e.g. ['node-a:cl:0:0'] (PoCL on the CPU)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from fabric.schema import OpenCLDevice, OpenCLState

__all__ = ["probe"]

T = TypeVar("T")


def _device_type(cl: Any, bits: int) -> str:
    # a device may carry several bits (DEFAULT alongside GPU): name the kind, in this order
    for name in ("GPU", "CPU", "ACCELERATOR", "CUSTOM"):
        flag = getattr(cl.device_type, name, 0)
        if flag and bits & flag:
            return name
    return ""


def _info(read: Callable[[], T], default: T) -> T:
    """One device property; a driver that cannot say leaves the schema's default."""
    try:
        return read()
    except Exception:  # pyopencl.Error (INVALID_VALUE for an unsupported query) or a missing attribute
        return default


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
        pname = _info(lambda: plat.name.strip(), "")
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

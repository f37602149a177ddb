"""What this machine offers: CPU cores, RAM and GPUs. Detected once at cold start, cheaply.

GPUs are found through CuPy when the optional `gpu` extra is installed; without it the node runs the
CPU path and says so. This module must not allocate GPU memory.
"""

from __future__ import annotations

import os

import msgspec


class GpuInfo(msgspec.Struct, frozen=True):
    index: int
    name: str
    memory_bytes: int


class Hardware(msgspec.Struct, frozen=True):
    cpu_count: int
    memory_bytes: int
    gpus: list[GpuInfo]


def meminfo(field: str) -> int | None:
    """A field of /proc/meminfo (``MemTotal``, ``MemAvailable``...) in bytes; None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _meminfo_total() -> int:
    total = meminfo("MemTotal")
    return total if total is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def detect_gpus() -> list[GpuInfo]:
    try:
        import cupy
    except Exception:  # not installed, or a broken CUDA install: both mean the CPU path
        return []
    gpus = []
    try:
        for i in range(cupy.cuda.runtime.getDeviceCount()):
            props = cupy.cuda.runtime.getDeviceProperties(i)
            name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
            gpus.append(GpuInfo(i, name, int(props["totalGlobalMem"])))
    except Exception:
        return []
    return gpus


# The loader uploads a node's whole range to this one device (placing a range across several GPUs is
# not built yet), so it is the only GPU a node advertises and plans by.
SERVING_DEVICE = 0


def usable_gpus(gpus: list[GpuInfo], mode: str) -> list[GpuInfo]:
    """The GPUs this node will use, and so advertises: none with ``gpu = "off"``, else the serving
    device only. Advertising every GPU would let the planner give the node a range that only fits
    across all of them, which the loader would then try to place on one."""
    if mode == "off":
        return []
    return [g for g in gpus if g.index == SERVING_DEVICE]


def detect(gpu_mode: str = "auto") -> Hardware:
    """This machine as the node will use it: ``gpu_mode`` is ``[node] gpu``."""
    gpus = [] if gpu_mode == "off" else detect_gpus()
    return Hardware(
        cpu_count=os.cpu_count() or 1, memory_bytes=_meminfo_total(), gpus=usable_gpus(gpus, gpu_mode)
    )

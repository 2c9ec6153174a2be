"""What a device says about itself: the retained ``{root}/devices/{device}/profile`` payload.

The micro-benchmark is a short float32 matmul whose GFLOP/s, divided by the emulated
slowdown, is the ``bench_gflops`` score the latency predictor uses as a device feature.
Everything here is measured or read from the OS, never typed by hand.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import time
from typing import Any

import torch

from .footprint import MEMORY_FRACTION, RESERVED_MB


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "processor\t: arm")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_clock_mhz() -> float | None:
    """Maximum clock if the OS says it, else None (features treat None as unknown)."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq", encoding="utf-8") as f:
            return int(f.read().strip()) / 1000.0
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("cpu mhz"):
                    return float(line.split(":", 1)[1])
    except (OSError, ValueError):
        pass
    return None


def memory_mb() -> float:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / 2**20


def default_memory_limit_mb() -> float:
    """What a stage may use when the agent is given no ``--memory-limit``: the device's
    memory less a margin for the OS, Python and torch themselves."""
    return max(0.0, memory_mb() * MEMORY_FRACTION - RESERVED_MB)


def pin_allocator(mmap_threshold: int = 32 * 2**20, trim_threshold: int = 2**30) -> bool:
    """Fix glibc malloc's mmap and trim thresholds (no-op elsewhere); True if applied.

    Tensors up to 32 MiB then come from the heap, and freed memory is kept instead of being
    returned to the OS and faulted in again on the next step: layer times stop depending on
    what the process did before (and elementwise backward passes get up to 2-4x faster). The
    agent and the seed profiler both call it, so what an agent times matches the seed.
    """
    name = ctypes.util.find_library("c")
    if not name or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, mmap_threshold)) and bool(
            libc.mallopt(m_trim_threshold, trim_threshold))
    except (OSError, AttributeError):
        return False


def robust_bench(threads: int, slowdown: float = 1.0, tries: int = 5) -> float:
    """The micro-benchmark, best of ``tries`` runs: one run on a busy machine can be off by
    100x (a descheduled OpenMP thread stalls the whole matmul), the best is stable."""
    return round(max(microbench_gflops(threads, slowdown) for _ in range(tries)), 3)


def microbench_gflops(threads: int, slowdown: float = 1.0, size: int = 256, reps: int = 8) -> float:
    """Best-of-3 float32 matmul throughput in GFLOP/s on ``threads`` threads, over slowdown."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, generator=g)
        b = torch.randn(size, size, generator=g)
        torch.mm(a, b)  # warm-up
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
        return 2.0 * size**3 * reps / best / 1e9 / max(slowdown, 1.0)
    finally:
        torch.set_num_threads(old)


def device_profile(
    device_id: str,
    *,
    threads: int,
    slowdown: float = 1.0,
    bandwidth_bps: float | None = None,
    bench: bool = True,
    memory_limit_bytes: int | None = None,
) -> dict[str, Any]:
    """``memory_limit_bytes``: what a stage may use (default ``default_memory_limit_mb``)."""
    limit = (default_memory_limit_mb() if memory_limit_bytes is None
             else memory_limit_bytes / 2**20)
    return {
        "device": device_id,
        "cores": os.cpu_count() or 1,
        "threads": threads,
        "memory_mb": round(memory_mb(), 1),
        "memory_limit_mb": limit,
        "cpu": cpu_model(),
        "clock_mhz": cpu_clock_mhz(),
        "arch": platform.machine(),
        "torch": str(torch.__version__),  # a TorchVersion, not a plain str
        "bench_gflops": robust_bench(threads, slowdown) if bench else None,
        "slowdown": slowdown,
        "bandwidth_bps": bandwidth_bps,
    }

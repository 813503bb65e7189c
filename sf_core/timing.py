"""Measuring: device sync, wall-clock laps, resident memory and peak memory.

The one timing helper of the benchmark, the CLI summary and the Benchmark node. A device sync belongs to
the measurement (taken by the consumer after a chunk), never to the chunk loop.
"""

from __future__ import annotations

import os
import resource
import time

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for queued work on `device` (a no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Laps:
    """Seconds between successive `lap()` calls, each after a device sync.

        laps = Laps(device)
        for chunk in stream:
            laps.lap()
        laps.times          # [seconds of chunk 1, chunk 2, ...]
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.times: list[float] = []
        self.start = self.last = time.perf_counter()

    def lap(self) -> float:
        synchronize(self.device)
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now
        return self.times[-1]

    @property
    def total(self) -> float:
        return self.last - self.start


def median(xs) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def rss_mb() -> float:
    """Current resident memory of this process in MiB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device: torch.device | str) -> None:
    """Start a new peak-VRAM measurement on `device` (CUDA only)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device | str) -> dict:
    """{"peak_rss_mb": ..., and on CUDA "peak_vram_gib": ... since `reset_peak`}."""
    device = torch.device(device)
    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        out["peak_vram_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return out


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    return str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")

"""What a node process measures about itself (and the drill about the chain node): start time, peak
and proportional memory, CPU seconds; read from /proc where Linux has it."""
from __future__ import annotations

import os
import resource
import time
from pathlib import Path


def process_start_epoch() -> float:
    """When this process started (epoch seconds), from /proc; falls back to now."""
    try:
        stat = Path("/proc/self/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def proc_peak_rss_mb(pid: int | None) -> float | None:
    """Peak resident memory (VmHWM) of another process, MB; None where /proc is unavailable."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    except (OSError, ValueError):
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB): VmHWM, which starts afresh at exec. (ru_maxrss
    keeps the high-water mark of the process that forked this one, e.g. a torch-loaded drill.)"""
    return proc_peak_rss_mb(os.getpid()) or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_s() -> float:
    """CPU seconds (user + system) used by this process so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def pss_mb() -> float | None:
    """This process's proportional set size (MB): its private pages plus its share of the pages it
    shares (torch's code with the other nodes), so summing it over processes counts memory once.
    None where /proc/self/smaps_rollup is unavailable."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None

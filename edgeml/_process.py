"""This process's CPU use and resident memory, from the standard library.

(psutil would cost the agent about 0.8 MB of RSS for two numbers.)
"""

from __future__ import annotations

import os
import sys
import time

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident set size now (Linux: /proc/self/statm); elsewhere the peak so far."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        import resource  # POSIX only; /proc above on Linux

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


class CpuMeter:
    """CPU time of the process (all threads) as a percentage of one core, between calls."""

    __slots__ = ("_cpu", "_wall")

    def __init__(self) -> None:
        self._cpu, self._wall = self._now()

    @staticmethod
    def _now() -> tuple[float, float]:
        t = os.times()
        return t.user + t.system, time.monotonic()

    def percent(self) -> float:
        """Since the previous call (or construction); 0.0 when no time has passed."""
        cpu, wall = self._now()
        used, elapsed = cpu - self._cpu, wall - self._wall
        self._cpu, self._wall = cpu, wall
        return round(100.0 * used / elapsed, 1) if elapsed > 0 else 0.0

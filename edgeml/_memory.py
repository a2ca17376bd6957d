"""Keeping the agent's heap small on a long-running device.

A burst of telemetry (a backlog drained after an outage, an application predicting in a
tight loop) leaves freed memory in the C allocator's arenas, one per thread, which glibc
keeps for reuse: the agent's RSS stays at its peak for the rest of its life. ``malloc_trim``
hands those pages back. It costs about 0.1 ms, so the agent calls it only at an idle
moment after enough records went through.

glibc also raises its mmap threshold (128 KiB at start) to the size of the largest block
freed so far, so after one large temporary buffer every later block of that size comes from
the heap, where it fragments what it leaves behind. :func:`tune` fixes the threshold at
its initial value (``MALLOC_MMAP_THRESHOLD_`` in the environment says otherwise). Measured
on the agent benchmark: about 1 MB less RSS after 10,000 predictions.

Elsewhere than glibc (musl) all of this does nothing.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

#: Records handled since the last trim before an idle moment trims again.
TRIM_AFTER_RECORDS = 2000

_trim: Callable[[int], int] | None | bool = False
_lock = threading.Lock()
_tuned = False
#: glibc's initial mmap threshold; fixing it turns off the dynamic increase.
MMAP_THRESHOLD = 128 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)


def tune() -> bool:
    """Fix glibc's mmap threshold (once per process); False where it cannot be done."""
    global _tuned
    with _lock:
        if _tuned:
            return True
        if "MALLOC_MMAP_THRESHOLD_" in os.environ:  # the operator chose: leave it
            _tuned = True
            return True
        try:
            import ctypes

            mallopt = ctypes.CDLL(None).mallopt
            mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            mallopt.restype = ctypes.c_int
        except (OSError, AttributeError):  # not glibc
            return False
        _tuned = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
        return _tuned


def _malloc_trim() -> Callable[[int], int] | None:
    global _trim
    if _trim is False:
        try:
            import ctypes

            fn = ctypes.CDLL(None).malloc_trim
            fn.argtypes = [ctypes.c_size_t]
            fn.restype = ctypes.c_int
            _trim = fn
        except (OSError, AttributeError):  # not glibc
            _trim = None
    return _trim  # type: ignore[return-value]


def release() -> bool:
    """Return free heap pages to the OS now; False where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    with _lock:  # one trim at a time: it locks every arena in turn
        trim(0)
    return True


class Trimmer:
    """Counts records handled; :meth:`idle` trims once ``TRIM_AFTER_RECORDS`` went by."""

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending = 0

    def idle(self) -> bool:
        if self.pending < TRIM_AFTER_RECORDS:
            return False
        self.pending = 0
        return release()

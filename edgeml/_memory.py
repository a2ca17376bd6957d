"""Giving the heap's free memory back to the operating system after a burst.

A burst of telemetry (a backlog drained after an outage, an application predicting in a
tight loop) leaves freed memory in the C allocator's arenas, one per thread, which glibc
keeps for reuse: the agent's RSS stays at its peak for the rest of its life. ``malloc_trim``
hands those pages back. It costs about 0.1 ms, so the agent calls it only at an idle
moment after enough records went through. Elsewhere than glibc (musl) it does nothing.

glibc also gives each new thread its own arena, up to eight per core, and every arena keeps
its own free pages and fragments. The agent runs about seven threads that allocate rarely:
:func:`limit_arenas` caps the process at a few arenas before they start (what
``MALLOC_ARENA_MAX`` does; the environment variable, when set, wins).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable

#: Records handled since the last trim before an idle moment trims again.
TRIM_AFTER_RECORDS = 2000

_trim: Callable[[int], int] | None | bool = False
_lock = threading.Lock()


def _malloc_trim() -> Callable[[int], int] | None:
    global _trim
    if _trim is False:
        try:
            import ctypes

            fn = ctypes.CDLL(None).malloc_trim
            fn.argtypes = [ctypes.c_size_t]
            fn.restype = ctypes.c_int
            _trim = fn
        except (OSError, AttributeError, TypeError):  # not glibc (TypeError: Windows' CDLL(None))
            _trim = None
    return _trim  # type: ignore[return-value]


#: mallopt parameter number of M_ARENA_MAX (glibc's malloc.h)
_M_ARENA_MAX = -8


def limit_arenas(count: int) -> bool:
    """Cap the C allocator at ``count`` arenas for threads that allocate from now on.

    Returns True when the cap was set; False when ``count`` is 0 (keep glibc's default),
    when ``MALLOC_ARENA_MAX`` is set in the environment (the operator's choice wins), or
    where the C library is not glibc. Call it before the agent starts its threads: a thread
    that already has an arena keeps it.
    """
    if count <= 0 or os.environ.get("MALLOC_ARENA_MAX"):
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, count))


def release() -> bool:
    """Return free heap pages to the OS now; False where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    with _lock:  # one trim at a time: it locks every arena in turn
        trim(0)
    return True


class Trimmer:
    """Counts records handled; :meth:`idle` trims once ``TRIM_AFTER_RECORDS`` went by, or,
    with ``burst_s``, at the first idle moment after any record when the last trim is
    less than ``burst_s`` old: the tail of a burst is handed back when the burst ends,
    while a trickle of records is trimmed only every ``TRIM_AFTER_RECORDS``."""

    __slots__ = ("last", "pending")

    def __init__(self) -> None:
        self.pending = 0
        self.last = -math.inf

    def idle(self, burst_s: float = 0.0) -> bool:
        quiet = not self.pending or time.monotonic() - self.last >= burst_s  # nothing new, or no burst
        if self.pending < TRIM_AFTER_RECORDS and quiet:
            return False
        self.pending = 0
        self.last = time.monotonic()
        return release()

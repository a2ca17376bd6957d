"""systemd integration without a dependency: sd_notify over $NOTIFY_SOCKET.

The unit (firmware/) runs the agent as ``Type=notify`` with ``WatchdogSec=``. The agent
sends ``READY=1`` once it serves, ``WATCHDOG=1`` every half watchdog period while its
threads are alive (a hung agent stops pinging and systemd restarts it), and
``STOPPING=1`` when it stops. Without $NOTIFY_SOCKET every call does nothing.
"""

from __future__ import annotations

import os
import socket


def notify(message: str) -> bool:
    """Send ``message`` to systemd; False when not run by systemd (or on failure)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except OSError:
        return False


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half the unit's WatchdogSec), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.05, int(usec) / 2e6)
    except ValueError:
        return None

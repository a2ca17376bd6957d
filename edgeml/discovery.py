"""LAN discovery with zeroconf: find a broker (``_mqtt._tcp``), announce the agent (``_edgeml._tcp``)."""

from __future__ import annotations

import logging
import socket
import threading

from ._config import BrokerURL
from ._exceptions import BrokerNotFound

log = logging.getLogger(__name__)

MQTT_SERVICE = "_mqtt._tcp.local."
AGENT_SERVICE = "_edgeml._tcp.local."


def find_broker(timeout_s: float = 5.0) -> BrokerURL:
    """The first MQTT broker announced on the LAN within ``timeout_s``."""
    from zeroconf import ServiceBrowser, ServiceStateChange, Zeroconf

    found: list[BrokerURL] = []
    done = threading.Event()

    def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is not ServiceStateChange.Added:
            return
        info = zeroconf.get_service_info(service_type, name, timeout=2000)
        if info and info.port and info.parsed_addresses():
            found.append(BrokerURL(scheme="mqtt", host=info.parsed_addresses()[0], port=info.port))
            done.set()

    zc = Zeroconf()
    try:
        ServiceBrowser(zc, MQTT_SERVICE, handlers=[on_change])
        done.wait(timeout_s)
    finally:
        zc.close()
    if not found:
        raise BrokerNotFound(f"no broker URL set and no {MQTT_SERVICE} service announced within {timeout_s:g} s")
    log.info("found broker %s on the LAN", found[0])
    return found[0]


class Announcer:
    """Announces the agent's local API as ``{device}._edgeml._tcp.local.`` until closed."""

    def __init__(self, device_id: str, fleet: str, port: int, version: str) -> None:
        from zeroconf import ServiceInfo, Zeroconf

        self._zc = Zeroconf()
        address = socket.inet_aton(_lan_address())
        self._info = ServiceInfo(
            AGENT_SERVICE,
            f"{device_id}.{AGENT_SERVICE}",
            addresses=[address],
            port=port,
            properties={"device": device_id, "fleet": fleet, "version": version, "api": "/v1"},
        )
        self._zc.register_service(self._info)

    def close(self) -> None:
        try:
            self._zc.unregister_service(self._info)
        finally:
            self._zc.close()


def _lan_address() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the route
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"

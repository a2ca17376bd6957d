"""Device identity against a real Mosquitto with the shipped TLS configuration and ACL:
each device reads and writes its own topics only, the coordinator sees all, and only
certificates of the fleet CA that are not revoked get in."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from cloud import Coordinator
from cloud._config import CloudConfig
from cloud.keys import generate_keys
from edgeml import Agent, load_config
from edgeml._config import TLSFiles
from edgeml.protocol import Topics

from .._stores import cloud_db
from ..conftest import agent_env, free_port, wait_until
from .conftest import Fleet, Identity, TLSBroker, TLSClient, tls_handshake_refused

REFUSED = 0x80  # SUBACK return code: failure
A, B = Topics("plant", "dev-a"), Topics("plant", "dev-b")


@pytest.fixture
def clients(tls_broker: TLSBroker, fleet: Fleet):  # type: ignore[no-untyped-def]
    made: list[TLSClient] = []

    def connect(who: Identity, v5: bool = False) -> TLSClient:
        client = TLSClient(tls_broker, who, v5=v5)
        made.append(client)
        assert client.connected.wait(10), f"{who.name} could not connect: {client.failures}"
        return client

    yield connect
    for c in made:
        c.close()


def test_a_device_reads_and_writes_only_its_own_topics(clients, fleet: Fleet) -> None:  # type: ignore[no-untyped-def]
    coordinator = clients(fleet.coordinator)
    a, b = clients(fleet.enroll("dev-a")), clients(fleet.enroll("dev-b"))
    for leaf in ("telemetry", "status", "state"):
        assert coordinator.subscribe(f"edgeml/v1/+/+/{leaf}") == 1  # the coordinator reads every device
    replica = clients(fleet.coordinator, v5=True)  # a replica's MQTT 5 shared subscription passes the ACL too
    assert replica.subscribe("$share/replicas/edgeml/v1/+/+/telemetry") == 1
    assert a.subscribe(A.desired) == 1 and b.subscribe(B.desired) == 1
    # device A tries to read device B: B's own topic, every device's desired, everything
    spying = [a.subscribe(t) for t in (B.desired, B.telemetry, "edgeml/v1/+/+/desired", "edgeml/#", "#")]
    # Mosquitto may grant such a subscription: its ACL is then applied to every message
    # delivered, so the proof is below, in what A receives
    assert all(code in (REFUSED, 1) for code in spying)

    # the coordinator writes each device's desired state (retained)
    coordinator.publish(B.desired, b'{"for": "dev-b"}', retain=True)
    coordinator.publish(A.desired, b'{"for": "dev-a"}', retain=True)
    wait_until(lambda: a.received(A.desired) and b.received(B.desired), 10, what="own desired states")

    # device A forges B's telemetry, B's state, B's desired state, then publishes its own
    a.publish(B.telemetry, b'{"forged": true}')
    a.publish(B.state, b'{"forged": true}', retain=True)
    a.publish(B.desired, b'{"for": "dev-b", "forged": true}', retain=True)
    a.publish(A.telemetry, b'{"own": true}')
    wait_until(lambda: coordinator.received(A.telemetry), 10, what="A's own telemetry at the coordinator")
    time.sleep(0.5)  # anything forged was sent before it on the same connection

    assert coordinator.received(A.telemetry) == [(A.telemetry, b'{"own": true}')]
    wait_until(lambda: replica.received(), 5, what="telemetry on the shared subscription")
    assert replica.received() == [(A.telemetry, b'{"own": true}')]
    assert not coordinator.received("/dev-b/"), "a forged publish reached the coordinator"
    assert all(t == A.desired for t, _ in a.received()), "device A received another device's messages"
    assert b.received() == [(B.desired, b'{"for": "dev-b"}')], "device B received a forged desired state"
    # the retained desired state of B is still the coordinator's: a new session of B sees it
    late_b = clients(fleet.enroll("dev-b"))
    late_b.subscribe(B.desired)
    wait_until(lambda: late_b.received(B.desired), 10, what="retained desired state")
    assert late_b.received(B.desired) == [(B.desired, b'{"for": "dev-b"}')]


def test_a_revoked_device_cannot_connect(tmp_path: Path, fleet: Fleet) -> None:
    good, gone = fleet.enroll("dev-a"), fleet.enroll("dev-r")
    fleet.ca.revoke("dev-r")
    broker = TLSBroker(tmp_path / "broker", fleet).start()
    try:
        assert tls_handshake_refused(broker, good) is None
        assert tls_handshake_refused(broker, gone) is not None
        # revoked while the broker runs: a new CRL and SIGHUP, and the next connection is refused
        late = fleet.enroll("dev-l")
        assert tls_handshake_refused(broker, late) is None
        fleet.ca.revoke("dev-l")
        broker.reload()
        wait_until(lambda: tls_handshake_refused(broker, late) is not None, 15, what="CRL reload")
        assert tls_handshake_refused(broker, good) is None
    finally:
        broker.stop()


def test_only_client_certificates_of_the_fleet_ca_get_in(tls_broker: TLSBroker, fleet: Fleet, tmp_path: Path) -> None:
    # a certificate with the right name (a real device's id) from another CA
    rogue = Fleet(tmp_path / "rogue")
    impostor = rogue.enroll("dev-a")
    trusting_both = Identity("dev-a", fleet.ca.cert_path, impostor.cert, impostor.key)  # the client trusts our broker
    assert tls_handshake_refused(tls_broker, trusting_both) is not None
    # the broker's own certificate (serverAuth only) as a client certificate
    broker_cert = Identity("edgeml-broker", fleet.ca.cert_path, fleet.broker.cert, fleet.broker.key)
    assert tls_handshake_refused(tls_broker, broker_cert) is not None
    # TLS without a client certificate, and plain MQTT on the TLS port
    assert _without_certificate(tls_broker.port, fleet.ca.cert_path) is not None
    assert _plain_mqtt(tls_broker.port) is not None
    # a client that does not trust the fleet CA does not talk to this broker (no MITM either way)
    refused = tls_handshake_refused(tls_broker, Identity("dev-a", rogue.ca.cert_path, *_files(fleet.enroll("dev-z"))))
    assert refused is not None
    # a genuine device does get in
    assert tls_handshake_refused(tls_broker, fleet.enroll("dev-ok")) is None


def test_devices_check_the_broker_they_talk_to(tmp_path: Path, fleet: Fleet) -> None:
    device = fleet.enroll("dev-a")
    # a stolen device key set up as a broker (its certificate even names this address): the
    # fleet CA signed it, but for clientAuth only
    stolen = fleet.ca.issue("dev-s", "device", tmp_path / "stolen", hosts=["127.0.0.1"])
    # a genuine broker certificate, for another host name
    elsewhere = fleet.ca.issue_broker(tmp_path / "elsewhere", ["mqtt.example.com"])
    for name, server in (("stolen", stolen), ("elsewhere", elsewhere), ("genuine", None)):
        broker = TLSBroker(tmp_path / f"broker-{name}", fleet, server=server).start()
        try:
            refused = tls_handshake_refused(broker, device)
            assert (refused is None) == (name == "genuine"), (name, refused)
        finally:
            broker.stop()


def _without_certificate(port: int, ca: Path) -> str | None:
    """TLS that trusts the broker but shows no certificate: the refusal, or None if it got a CONNACK."""
    ctx = ssl.create_default_context(cafile=str(ca))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(_connect_packet("no-cert"))
            answer = tls.recv(4)
    except (ssl.SSLError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if answer[:1] == b"\x20" else f"closed ({answer!r})"


def _plain_mqtt(port: int) -> str | None:
    """MQTT without TLS: the refusal, or None if it got a CONNACK."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            raw.sendall(_connect_packet("plain"))
            answer = raw.recv(4)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if answer[:1] == b"\x20" else f"closed ({answer!r})"


def _files(who: Identity) -> tuple[Path, Path]:
    return who.cert, who.key


def _connect_packet(client_id: str) -> bytes:
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    return bytes([0x10, len(body)]) + body


def test_a_real_agent_and_coordinator_over_mqtts(
    tls_broker: TLSBroker, fleet: Fleet, models: dict[str, Path], tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    generate_keys(keys)
    tls = TLSFiles(ca_file=fleet.coordinator.ca, cert_file=fleet.coordinator.cert, key_file=fleet.coordinator.key)
    config = CloudConfig(broker_url=tls_broker.url, broker_tls=tls, db=cloud_db(tmp_path),
                         http_addr="127.0.0.1:0", artifact_dir=tmp_path / "artifacts", signing_key=keys / "fleet.key")
    device = fleet.enroll("dev-1")
    coordinator = Coordinator(config).start()
    try:
        assert coordinator.ingestor.subscribed.wait(10), "the coordinator did not subscribe over TLS"
        http = httpx.Client(base_url=coordinator.url, timeout=30)
        for path, version in ((models["onnx_float"], "1.0.0"), (models["onnx_v2"], "2.0.0")):
            http.post("/v1/models", data={"name": "mlp", "version": version},
                      files={"file": (path.name, path.read_bytes())}).raise_for_status()
        env = agent_env(
            EDGEML_DATA_DIR=tmp_path / "agent", EDGEML_API_ADDR=f"127.0.0.1:{free_port()}",
            EDGEML_BROKER_URL=tls_broker.url, EDGEML_MODEL_PATH=models["onnx_float"], EDGEML_DEVICE_ID="dev-1",
            EDGEML_FLEET="plant", EDGEML_FLEET_PUBKEY=keys / "fleet.pub", EDGEML_MQTT__CA_FILE=device.ca,
            EDGEML_MQTT__CERT_FILE=device.cert, EDGEML_MQTT__KEY_FILE=device.key, EDGEML_TELEMETRY__SAMPLE_RATE=1.0,
            EDGEML_UPDATES__PROBATION_S=0.2, EDGEML_UPDATES__PROBATION_MIN_PREDICTIONS=0,
        )
        x = np.random.default_rng(1).standard_normal((1, 4)).astype(np.float32)
        with Agent(load_config(env=env)) as agent:
            for _ in range(20):
                agent.predict({"input": x})
            def stored() -> list[dict[str, Any]] | None:
                resp = http.get("/v1/devices/plant/dev-1/telemetry", params={"kind": "prediction"})
                return resp.json() if resp.status_code == 200 and resp.json() else None  # 404 until it registers

            rows = wait_until(stored, 20, what="telemetry over mqtts")
            assert rows and all(r["body"]["version"] == "1.0.0" for r in rows)
            # the signed desired state goes out over TLS too, and the agent acts on it
            r = http.put("/v1/devices/plant/dev-1/desired", json={"model": "mlp@2.0.0"})
            assert r.status_code == 200, r.text
            wait_until(lambda: agent.status()["update"]["result"] == "success", 30, what="update over mqtts")
            assert agent.model is not None and agent.model.version == "2.0.0"
            sync = agent.status()["sync"]
            assert sync["connected"] and sync["broker"] == tls_broker.url
        http.close()
    finally:
        coordinator.stop()
    log = tls_broker.log.read_text(errors="replace")
    assert "u'dev-1'" in log and "u'edgeml-coordinator'" in log  # identities came from the certificates


def test_ca_commands_issue_revoke_and_refuse_reserved_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from edgeml.cli import main

    ca, dev = tmp_path / "ca", tmp_path / "dev-7"
    assert main(["ca", "init", "--out", str(ca)]) == 0
    assert main(["devices", "enroll", "dev-7", "--ca", str(ca), "--out", str(dev)]) == 0
    assert (dev / "dev-7.key").stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate((dev / "dev-7.crt").read_bytes())
    issuer = x509.load_pem_x509_certificate((ca / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(issuer)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-7"
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    # the coordinator's name cannot be taken by a device; a topic wildcard is not an id
    for bad in ("edgeml-coordinator", "edgeml-broker", "dev/+", "#"):
        assert main(["devices", "enroll", bad, "--ca", str(ca), "--out", str(tmp_path / "x")]) == 2
    assert main(["devices", "enroll", "dev-7", "--ca", str(ca), "--out", str(dev)]) == 1  # no silent overwrite
    assert main(["devices", "revoke", "dev-7", "--ca", str(ca)]) == 0
    crl = x509.load_pem_x509_crl((ca / "crl.pem").read_bytes())
    assert crl.is_signature_valid(issuer.public_key())
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    assert main(["devices", "revoke", "dev-unknown", "--ca", str(ca)]) == 2
    assert main(["devices", "enroll", "dev-8", "--ca", str(tmp_path / "nowhere"), "--out", str(dev)]) == 2
    assert "edgeml ca init" in capsys.readouterr().err


def test_a_missing_tls_file_is_named_at_start(tmp_path: Path, fleet: Fleet) -> None:
    from cloud._config import InvalidSetting, load_cloud_config
    from edgeml._exceptions import ConfigError

    device = fleet.enroll("dev-1")
    ok = load_config(env={"EDGEML_BROKER_URL": "mqtts://127.0.0.1:8883", "EDGEML_MQTT__CA_FILE": str(device.ca),
                          "EDGEML_MQTT__CERT_FILE": str(device.cert), "EDGEML_MQTT__KEY_FILE": str(device.key)})
    assert ok.broker_url is not None and ok.broker_url.tls and ok.mqtt.cert_file == device.cert
    with pytest.raises(ConfigError) as err:
        load_config(env={"EDGEML_MQTT__CA_FILE": str(tmp_path / "nope.crt")})
    assert err.value.key == "mqtt.ca_file" and "nope.crt" in str(err.value) and "EDGEML_MQTT__CA_FILE" in str(err.value)
    with pytest.raises(ConfigError, match="go together"):
        load_config(env={"EDGEML_MQTT__CERT_FILE": str(device.cert)})
    with pytest.raises(InvalidSetting) as bad:
        load_cloud_config(env={"EDGEML_BROKER_TLS__CERT_FILE": str(tmp_path / "gone.crt"),
                               "EDGEML_BROKER_TLS__KEY_FILE": str(device.key)})
    assert bad.value.key == "broker_tls.cert_file"

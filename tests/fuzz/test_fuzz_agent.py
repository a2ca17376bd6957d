"""Fuzzing the agent's side of the protocol: desired-state documents and topics.

A running agent (real Mosquitto, a real ONNX model, a fleet key) is handed fuzzed
messages exactly where paho hands them over (``Agent._on_message``), signed with the
fleet key or not. Property: the callback never raises (bad documents are rejected with a
reason), the update worker stays alive, and the agent still predicts at the end.
Only model URLs that refuse at once are generated: no example reaches the network.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from cloud.keys import generate_keys
from edgeml import Agent, load_config
from edgeml._exceptions import SignatureError
from edgeml.protocol import DesiredState, Topics, parse_topic
from edgeml.protocol.signing import canonical_json, sign_document, verify_document

from ..conftest import Broker, agent_env, free_port, wait_until
from ._fuzz import FUZZ, SLOW, dumps, json_values, mutated_bytes

TOPICS = Topics("plant", "dev-1")
X = np.random.default_rng(0).standard_normal((1, 4)).astype(np.float32)
DEAD_URL = "http://127.0.0.1:9/model"  # the discard port: refused at once
SHA = "a" * 64

urls = st.sampled_from([DEAD_URL, "", "ftp://x", "http://[::1", "file:///etc/passwd"]) | st.none() | st.integers()
refs = st.fixed_dictionaries(
    {"name": st.sampled_from(["mlp", ""]) | st.text(max_size=5), "version": st.text(max_size=5)},
    optional={"url": urls, "sha256": st.sampled_from([SHA, "A" * 64, "", "zz"]) | st.none(),
              "size": st.integers(-5, 2**64) | st.none() | st.floats(allow_nan=False, allow_infinity=False)},
)


@st.composite
def desired_docs(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {"v": 1, "fleet": "plant", "device": "dev-1", "revision": draw(st.integers(-3, 2**64)),
                           "issued_at": time.time(), "model": draw(refs | st.none())}
    if draw(st.booleans()):
        doc["shadow"] = draw(refs)
    for key in draw(st.lists(st.sampled_from(["v", "fleet", "device", "revision", "issued_at", "expires_at",
                                              "model", "shadow", "key_id", "extra"]), max_size=2)):
        doc[key] = draw(json_values)
    return doc


@pytest.fixture(scope="module")
def fleet_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    keys = tmp_path_factory.mktemp("keys")
    generate_keys(keys)
    return keys


@pytest.fixture
def agent(broker: Broker, fleet_keys: Path, models: dict[str, Path], tmp_path: Path) -> Iterator[Agent]:
    env = agent_env(
        EDGEML_DATA_DIR=tmp_path / "agent", EDGEML_API_ADDR=f"127.0.0.1:{free_port()}", EDGEML_BROKER_URL=broker.url,
        EDGEML_MODEL_PATH=models["onnx_float"], EDGEML_DEVICE_ID="dev-1", EDGEML_FLEET="plant",
        EDGEML_FLEET_PUBKEY=fleet_keys / "fleet.pub", EDGEML_UPDATES__DOWNLOAD_RETRIES=0,
        EDGEML_UPDATES__RETRY_BACKOFF_S=0, EDGEML_UPDATES__DOWNLOAD_TIMEOUT_S=2,
    )
    with Agent(load_config(env=env)) as a:
        yield a


def _payload(doc: dict[str, Any], key: Path, sign: bool) -> bytes:
    if sign:
        with contextlib.suppress(SignatureError):  # not canonical JSON: sent unsigned
            doc = sign_document(doc, key)
    return dumps(doc)


def test_the_agent_survives_any_desired_message(agent: Agent, fleet_keys: Path) -> None:
    key = fleet_keys / "fleet.key"
    updates = agent._updates
    assert updates is not None and updates._thread is not None

    @given(data=st.data())
    @SLOW
    def offer(data: Any) -> None:
        kind = data.draw(st.sampled_from(["signed", "unsigned", "bytes", "topic"]))
        topic = TOPICS.desired
        if kind == "bytes":
            payload = data.draw(st.binary(max_size=80) | st.builds(dumps, json_values))
        elif kind == "topic":
            topic = data.draw(st.text(max_size=40) | st.sampled_from(["edgeml/v1/plant/dev-1/x", TOPICS.telemetry]))
            payload = b"{}"
        else:
            payload = _payload(data.draw(desired_docs()), key, kind == "signed")
        agent._on_message(topic, payload)  # must not raise: paho's network thread calls it
        assert updates._thread.is_alive()  # nor may a document it let through kill the worker

    offer()
    # what mattered most, once more: downloads and shadows that fail, absurd revisions and sizes
    for doc in ({"v": 1, "fleet": "plant", "device": "dev-1", "revision": 2**62, "issued_at": time.time(),
                 "model": {"name": "m", "version": "2", "url": DEAD_URL, "sha256": SHA, "size": 10},
                 "shadow": {"name": "s", "version": "1", "url": DEAD_URL, "sha256": "b" * 64}},
                {"v": 1, "fleet": "plant", "device": "dev-1", "revision": 2**63, "issued_at": 0,
                 "shadow": {"name": "s", "version": "1", "sha256": "c" * 64, "size": 2**64}}):
        agent._on_message(TOPICS.desired, _payload(doc, key, True))
    for depth in (300, 1000):  # orjson reads 1024 levels; writers refuse far fewer
        agent._on_message(TOPICS.desired, b'{"v": 1, "a":' + b"[" * depth + b"]" * depth + b"}")
    wait_until(lambda: updates.record.state.value == "idle" and updates._pending is None, timeout=30,
               what="the update worker to settle")
    time.sleep(0.5)  # the worker takes the last document off the queue before it acts on it
    assert updates._thread.is_alive()
    assert agent.predict({"input": X}).outputs


# --------------------------------------------------------------------------- pure parsers


@given(doc=desired_docs())
@FUZZ
def test_desired_state_validation_and_signature_checks_raise_domain_errors(doc: dict[str, Any]) -> None:
    from pydantic import ValidationError

    with contextlib.suppress(ValidationError):
        DesiredState.model_validate(doc)
    try:
        canonical_json(doc)
        verify_document(doc, {})
    except SignatureError as exc:
        assert exc.reason


@given(raw=mutated_bytes(b'{"signature": "AAAA", "key_id": "0123456789abcdef", "revision": 1}'))
@example(raw=b'{"signature": "====", "key_id": null}')
@FUZZ
def test_a_mangled_signature_is_a_signature_error(raw: bytes, fleet_keys: Path) -> None:
    import json

    from edgeml.protocol.signing import load_public_keys

    try:
        doc = json.loads(raw)
    except ValueError:
        return
    with pytest.raises(SignatureError):
        verify_document(doc, load_public_keys(fleet_keys / "fleet.pub"))


@given(topic=st.text(max_size=50))
@FUZZ
def test_parse_topic_splits_or_raises_value_error(topic: str) -> None:
    try:
        fleet, device, leaf = parse_topic(topic)
    except ValueError:
        return
    assert "/" not in fleet + device + leaf


@pytest.mark.parametrize("revision", [2**63, 18364630241760122880])
def test_a_signed_revision_beyond_int64_is_rejected_and_the_worker_lives(
    agent: Agent, fleet_keys: Path, revision: int,
) -> None:
    """Found by the fuzzer: the update log (SQLite) could not store the revision, and the
    OverflowError killed the update worker; every later desired state was then ignored."""
    doc = {"v": 1, "fleet": "plant", "device": "dev-1", "revision": revision, "issued_at": time.time()}
    bad = agent._bad_messages
    agent._on_message(TOPICS.desired, _payload(doc, fleet_keys / "fleet.key", True))
    assert agent._bad_messages == bad + 1  # rejected as malformed, before the worker sees it
    updates = agent._updates
    assert updates is not None and updates._thread is not None
    doc = {"v": 1, "fleet": "plant", "device": "dev-1", "revision": 3, "issued_at": time.time()}
    agent._on_message(TOPICS.desired, _payload(doc, fleet_keys / "fleet.key", True))
    wait_until(lambda: updates.record.applied_revision == 3, timeout=10, what="the next document applied")
    assert updates._thread.is_alive()

"""docs/protocol.md is checked against the pydantic models, and the agent's real output
against both."""

from __future__ import annotations

from pathlib import Path

from edgeml.protocol import Topics, fleet_filter, parse_topic
from edgeml.protocol.doc import current, render

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def test_doc_schemas_are_generated_from_the_models() -> None:
    assert current(DOC.read_text()) == render(), "run: python -m edgeml.protocol.doc docs/protocol.md"


def test_doc_names_every_topic_and_kind() -> None:
    text = DOC.read_text()
    for leaf in ("telemetry", "status", "desired", "state"):
        assert f"edgeml/v1/{{fleet}}/{{device}}/{leaf}" in text
    for kind in ("prediction", "sample", "metrics", "event"):
        assert f"`{kind}`" in text


def test_topics() -> None:
    t = Topics("plant-7", "cam.01")
    assert t.telemetry == "edgeml/v1/plant-7/cam.01/telemetry"
    assert parse_topic(t.desired) == ("plant-7", "cam.01", "desired")
    assert fleet_filter("status") == "edgeml/v1/+/+/status"
    for bad in ("a/b", "+", "#", "", "x" * 65):
        try:
            Topics("f", bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted device id {bad!r}")

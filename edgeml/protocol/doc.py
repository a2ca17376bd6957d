"""Keep docs/protocol.md's schema section generated from the pydantic models.

    python -m edgeml.protocol.doc docs/protocol.md     # rewrite the section in place
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import TypeAdapter

from ._messages import DesiredState, ReportedState, Status, TelemetryBatch, TelemetryRecord

BEGIN = "<!-- BEGIN GENERATED SCHEMAS: python -m edgeml.protocol.doc docs/protocol.md -->"
END = "<!-- END GENERATED SCHEMAS -->"

_SECTIONS = [
    ("TelemetryBatch", "`…/telemetry`", TelemetryBatch.model_json_schema()),
    ("TelemetryRecord", "one element of `records`", TypeAdapter(TelemetryRecord).json_schema()),
    ("Status", "`…/status` and the last will", Status.model_json_schema()),
    ("DesiredState", "`…/desired`", DesiredState.model_json_schema()),
    ("ReportedState", "`…/state`", ReportedState.model_json_schema()),
]


def render() -> str:
    parts = [BEGIN, ""]
    for name, where, schema in _SECTIONS:
        parts += [f"### {name} ({where})", "", "```json", json.dumps(schema, indent=2, sort_keys=True), "```", ""]
    parts.append(END)
    return "\n".join(parts)


def update(text: str) -> str:
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[:start] + render() + text[end:]


def current(text: str) -> str:
    return text[text.index(BEGIN) : text.index(END) + len(END)]


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/protocol.md")
    path.write_text(update(path.read_text()))
    print(f"updated {path}")

"""Shared budget and strategies of the fuzz tests.

The budget is small so the whole set runs in CI in about a minute; raise it locally with
``EDGEML_FUZZ_EXAMPLES=2000 pytest tests/fuzz``. At the default budget (CI) the examples
are derandomized: the same inputs every run, so a red CI is a reproducible bug, not a
dice roll; setting ``EDGEML_FUZZ_EXAMPLES`` draws fresh random inputs each run (explore
that way before a release). Every bug found is kept as an
``@example`` (or a plain test) next to the property that found it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("EDGEML_FUZZ_EXAMPLES", "120"))
#: The default budget replays the same examples; an explicit one explores.
DERANDOMIZE = "EDGEML_FUZZ_EXAMPLES" not in os.environ

#: Settings of every property here: bounded, no deadline (CI machines are slow and shared).
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, database=None, derandomize=DERANDOMIZE,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

#: The properties that commit to a store or drive a process: a third of the budget.
SLOW = settings(FUZZ, max_examples=max(10, EXAMPLES // 3))

def _nest(depth: int) -> Any:
    value: Any = []
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


#: Scalars a hostile or broken peer may send: huge ints, NUL and odd unicode, floats, and
#: deep nesting (orjson reads 1024 levels but writes only 254).
scalars = (st.none() | st.booleans() | st.integers() | st.integers(-(2**70), 2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
           | st.sampled_from(["", "\x00", "a\nb", "\u202e", "../..", "edgeml/v1/+/#", "é" * 3, _nest(300)]))

json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=15,
)


def dumps(value: Any) -> bytes:
    """JSON as any peer may write it: big ints and NaN/Infinity included."""
    return json.dumps(value).encode()


@st.composite
def mutated_bytes(draw: st.DrawFn, base: bytes) -> bytes:
    """``base`` truncated, with some bytes flipped, inserted or deleted."""
    data = bytearray(base)
    for _ in range(draw(st.integers(0, 6))):
        if not data:
            break
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 16))]
        else:
            del data[i:]
    return bytes(data)

"""Hardware-in-the-loop rigs: drive a real agent through a scenario with faults.

    from hil import load_scenario, run_scenario, write_junit, write_html
    result = run_scenario(load_scenario("broker-restart"), target="local")
    write_junit([result], "hil.xml"); write_html([result], "hil.html")

``edgeml hil run SCENARIO --target local|ssh://user@host`` is the same from the shell
(docs/hil.md). Running a scenario needs the cloud extra: the rig runs a real coordinator.
Names are imported on first use, so ``edgeml --help`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._exceptions import HilError, RigError, ScenarioError, TargetError

_LAZY = {
    "Case": "_runner", "RunResult": "_runner", "run_scenario": "_runner",
    "Scenario": "_scenario", "load_scenario": "_scenario", "parse_scenario": "_scenario",
    "shipped_scenarios": "_scenario", "write_html": "_report", "write_junit": "_report",
}

__all__ = ["HilError", "RigError", "ScenarioError", "TargetError", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'hil' has no attribute {name!r}")

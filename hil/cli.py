"""``edgeml hil``: list and run scenarios (wired into ``edgeml/cli.py``, imported lazily).

    edgeml hil list
    edgeml hil run SCENARIO [SCENARIO ...] --target local|ssh://user@host
                   [--junit FILE] [--html FILE] [--report COORDINATOR_URL] [--json]

Exit codes: 0 every scenario passed, 1 a scenario failed (or the report was refused),
2 a bad scenario file or target.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from ._exceptions import HilError, ScenarioError, TargetError


def register(sub: Any) -> None:
    hil = sub.add_parser("hil", help="hardware-in-the-loop: run scenarios with faults against an agent")
    hil_sub = hil.add_subparsers(dest="action", metavar="ACTION", required=True)
    hil_sub.add_parser("list", help="list the shipped scenarios")
    run = hil_sub.add_parser("run", help="run scenarios (names of shipped ones, or YAML files)")
    run.add_argument("scenarios", nargs="+", metavar="SCENARIO")
    run.add_argument("--target", default="local", help="local (default) or ssh://user@host[:port]")
    run.add_argument("--junit", metavar="FILE", help="write JUnit XML here")
    run.add_argument("--html", metavar="FILE", help="write the HTML report here")
    run.add_argument("--report", metavar="URL", help="post each result to this coordinator (the rollout HIL gate)")
    run.add_argument("--json", action="store_true", help="print the results as JSON")


def dispatch(args: argparse.Namespace) -> int:
    try:
        if args.action == "list":
            return _list()
        return _run(args)
    except (ScenarioError, TargetError) as exc:
        print(f"edgeml: error: {exc}", file=sys.stderr)
        return 2
    except HilError as exc:
        print(f"edgeml: error: {exc}", file=sys.stderr)
        return 1


def _list() -> int:
    from ._scenario import load_scenario, shipped_scenarios

    for name in shipped_scenarios():
        s = load_scenario(name)
        print(f"{name:24} {s.hardware_profile:18} {s.description}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from ._report import write_html, write_junit
    from ._runner import run_scenario
    from ._scenario import load_scenario
    from ._targets import make_target

    # the rig's coordinator is private to the run (open API, no tokens): its warnings are noise here
    logging.getLogger("cloud").setLevel(logging.ERROR)
    scenarios = [load_scenario(ref) for ref in args.scenarios]  # every file validated before anything starts
    make_target(args.target)  # a bad target fails before anything starts
    results = []
    for scenario in scenarios:
        print(f"hil: {scenario.name} on {args.target} ...", file=sys.stderr, flush=True)
        result = run_scenario(scenario, make_target(args.target))
        results.append(result)
        counts = result.counts()
        print(f"hil: {scenario.name}: {'PASSED' if result.passed else 'FAILED'} ({counts['tests']} cases, "
              f"{counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} skipped, "
              f"{result.seconds:.1f} s)", file=sys.stderr, flush=True)
        for case in result.cases:
            for why in ([case.error] if case.error else case.failures):
                print(f"  {case.name}: {why}", file=sys.stderr)
    if args.junit:
        write_junit(results, args.junit)
    if args.html:
        write_html(results, args.html)
    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=2, default=str))
    refused = 0
    if args.report:
        from ._gate import post_result

        for result in results:
            refused += not post_result(args.report, result)
    return 0 if all(r.passed for r in results) and not refused else 1

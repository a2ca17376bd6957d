"""Posting a run to the coordinator, where a rollout's HIL gate reads it
(``POST /v1/hil/runs``, see ``cloud/api/_hil.py``)."""

from __future__ import annotations

import sys
from typing import Any

import httpx

from ._report import junit_summary
from ._runner import RunResult


def run_document(result: RunResult) -> dict[str, Any]:
    """What the coordinator stores: model, scenario, profile, verdict, counts, JUnit summary."""
    return {
        "model": result.model,
        "scenario": result.scenario,
        "hardware_profile": result.hardware_profile,
        "target": result.target,
        "passed": result.passed,
        "counts": result.counts(),
        "junit": junit_summary([result]),
        "summary": {"seconds": round(result.seconds, 3), "budgets": result.budgets, "notes": result.notes,
                    "failed_cases": [{"name": c.name, "why": c.error or c.failures} for c in result.cases
                                     if not c.passed]},
    }


def post_result(url: str, result: RunResult, token: str | None = None) -> bool:
    """True when the coordinator stored the run; a refusal is printed, not raised."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = httpx.post(f"{url.rstrip('/')}/v1/hil/runs", json=run_document(result), headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        print(f"hil: could not report to {url}: {exc}", file=sys.stderr)
        return False
    if r.status_code not in (200, 201):
        print(f"hil: {url} refused the report: {r.status_code} {r.text[:300]}", file=sys.stderr)
        return False
    print(f"hil: reported {result.scenario} for {result.model} to {url} (run {r.json().get('id')})", file=sys.stderr)
    return True

"""Outputs of a run: JUnit XML (one testsuite per scenario) and a self-contained HTML
report with latency plots drawn as inline SVG (no script, no network)."""

from __future__ import annotations

import html
import json
import math
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._runner import RunResult

_COLORS = {"replay": "#2b6cb0", "fault": "#c05621"}


# --------------------------------------------------------------------------- JUnit
def junit_tree(results: Sequence[RunResult]) -> ET.Element:
    root = ET.Element("testsuites", name="edgeml hil")
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for r in results:
        counts = r.counts()
        for k in totals:
            totals[k] += counts[k]
        suite = ET.SubElement(root, "testsuite", name=f"hil.{r.scenario}", timestamp=_iso(r.started_at),
                              time=f"{r.seconds:.3f}", **{k: str(v) for k, v in counts.items()})
        props = ET.SubElement(suite, "properties")
        for key, value in (("model", r.model), ("hardware_profile", r.hardware_profile), ("target", r.target),
                           ("budgets", json.dumps(r.budgets)), *(("note", n) for n in r.notes)):
            ET.SubElement(props, "property", name=key, value=str(value))
        for c in r.cases:
            case = ET.SubElement(suite, "testcase", name=c.name, classname=c.classname, time=f"{c.seconds:.3f}")
            if c.error is not None:
                ET.SubElement(case, "error", message=c.error[:500]).text = c.error
            elif c.failures:
                ET.SubElement(case, "failure", message=c.failures[0][:500]).text = "\n".join(c.failures)
            if c.skipped:
                ET.SubElement(case, "skipped", message=c.skipped)
            if c.details:
                ET.SubElement(case, "system-out").text = json.dumps(c.details, indent=1, default=str)
    root.attrib.update({k: str(v) for k, v in totals.items()})
    return root


def write_junit(results: Sequence[RunResult], path: str | Path) -> Path:
    path = Path(path)
    tree = ET.ElementTree(junit_tree(results))
    ET.indent(tree)
    tree.write(path, encoding="utf-8", xml_declaration=True)
    return path


def junit_summary(results: Sequence[RunResult]) -> dict[str, int]:
    root = junit_tree(results)
    return {k: int(root.attrib[k]) for k in ("tests", "failures", "errors", "skipped")}


# --------------------------------------------------------------------------- HTML
def write_html(results: Sequence[RunResult], path: str | Path) -> Path:
    path = Path(path)
    path.write_text(render_html(results), encoding="utf-8")
    return path


def render_html(results: Sequence[RunResult]) -> str:
    passed = sum(r.passed for r in results)
    body = [f"<h1>edgeml HIL report</h1><p>{passed} of {len(results)} scenario(s) passed · {_iso(time.time())}</p>"]
    for r in results:
        body.append(_scenario_html(r))
    return ("<!doctype html><html lang=en><head><meta charset=utf-8><title>edgeml HIL report</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>")


def _scenario_html(r: RunResult) -> str:
    e = html.escape
    verdict = '<span class="pass">PASSED</span>' if r.passed else '<span class="fail">FAILED</span>'
    rows = []
    for c in r.cases:
        state = "error" if c.error else "fail" if c.failures else "skip" if c.skipped else "pass"
        why = c.error or "; ".join(c.failures) or c.skipped or ""
        details = {k: v for k, v in c.details.items() if k != "agent_log"}
        rows.append(f'<tr class="{state}"><td>{e(c.name)}</td><td>{state}</td><td>{c.seconds:.2f}</td>'
                    f"<td>{e(why)}</td><td><code>{e(json.dumps(details, default=str))[:1200]}</code></td></tr>")
    phases = "".join(
        f"<tr><td>{e(str(p['label']))}</td><td>{p['kind']}</td><td>{p['requests']}</td><td>{p['answered']}</td>"
        f"<td>{_num(p['p50_ms'])}</td><td>{_num(p['p95_ms'])}</td><td>{_num(p['round_trip_p95_ms'])}</td>"
        f"<td>{_num(p['accuracy'])}</td><td>{_num(p['error_rate'])}</td></tr>"
        for p in (ph.summary() for ph in r.phases))
    notes = "".join(f"<p class=note>{e(n)}</p>" for n in r.notes)
    return (
        f'<section><h2>{e(r.scenario)} {verdict}</h2><p>{e(r.description)}</p>'
        f"<p>model <b>{e(r.model)}</b> · hardware profile <b>{e(r.hardware_profile)}</b> · target <b>{e(r.target)}</b>"
        f" · {r.seconds:.1f} s · budgets <code>{e(json.dumps(r.budgets))}</code></p>{notes}"
        f"{latency_svg(r)}{histogram_svg(r)}"
        "<table><tr><th>phase</th><th>kind</th><th>requests</th><th>answered</th><th>p50 ms</th><th>p95 ms</th>"
        f"<th>round trip p95 ms</th><th>accuracy</th><th>error rate</th></tr>{phases}</table>"
        "<table><tr><th>case</th><th>verdict</th><th>s</th><th>why</th><th>details</th></tr>"
        f"{''.join(rows)}</table></section>"
    )


def latency_svg(r: RunResult, width: int = 760, height: int = 220) -> str:
    """Inference latency of every answered call over time; fault windows shaded; the budget as a line."""
    pad_l, pad_b, pad_t, pad_r = 50, 30, 10, 10
    samples = [(s.t, s.inference_ms, p.kind) for p in r.phases for s in p.answered]
    failed = [s.t for p in r.phases for s in p.samples if not s.ok]
    budget = r.budgets.get("latency_p95_ms")
    if not samples:
        return "<p>(no answered predictions to plot)</p>"
    t_max = max([t for t, _, _ in samples] + [p.end for p in r.phases]) or 1.0
    top = max(ms for _, ms, _ in samples)
    on_chart = bool(budget) and budget <= top * 2  # a budget far above the points would flatten them
    y_max = max(top, budget if on_chart and budget else 0.0) * 1.1 or 1.0
    w, h = width - pad_l - pad_r, height - pad_t - pad_b

    def x(t: float) -> float:
        return pad_l + w * t / t_max

    def y(ms: float) -> float:
        return pad_t + h * (1 - ms / y_max)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="inference latency over time">']
    for p in r.phases:
        if p.kind == "fault":
            parts.append(f'<rect x="{x(p.start):.1f}" y="{pad_t}" width="{max(x(p.end) - x(p.start), 1):.1f}" '
                         f'height="{h}" fill="#feebc8"><title>{html.escape(p.label)}</title></rect>')
    parts.append(f'<line x1="{pad_l}" y1="{pad_t + h}" x2="{pad_l + w}" y2="{pad_t + h}" stroke="#444"/>')
    parts.append(f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{pad_t + h}" stroke="#444"/>')
    for frac in (0, 0.5, 1):
        ms = y_max * frac
        parts.append(f'<text x="{pad_l - 4}" y="{y(ms) + 4:.1f}" text-anchor="end" font-size="10">{ms:.2f}</text>')
    parts.append(f'<text x="{pad_l + w}" y="{height - 8}" text-anchor="end" font-size="10">{t_max:.1f} s</text>')
    parts.append(f'<text x="{pad_l}" y="{height - 8}" font-size="10">inference latency (ms) over the run</text>')
    if budget and not on_chart:
        parts.append(f'<text x="{pad_l + w}" y="{pad_t + 10}" text-anchor="end" font-size="10" fill="#c53030">'
                     f'p95 budget {budget} ms (above the chart)</text>')
    elif budget:
        parts.append(f'<line x1="{pad_l}" y1="{y(budget):.1f}" x2="{pad_l + w}" y2="{y(budget):.1f}" stroke="#c53030" '
                     f'stroke-dasharray="4 3"><title>p95 budget {budget} ms</title></line>')
    for t, ms, kind in samples:
        parts.append(f'<circle cx="{x(t):.1f}" cy="{y(ms):.1f}" r="1.6" fill="{_COLORS[kind]}"/>')
    for t in failed:
        parts.append(f'<line x1="{x(t):.1f}" y1="{pad_t + h}" x2="{x(t):.1f}" y2="{pad_t + h - 6}" stroke="#c53030"/>')
    parts.append("</svg>")
    return "".join(parts)


def histogram_svg(r: RunResult, width: int = 760, height: int = 140, bins: int = 30) -> str:
    """Distribution of the round trip (what the application waits) across the run."""
    ms = [s.ms for p in r.phases for s in p.answered if not math.isnan(s.ms)]
    if not ms:
        return ""
    hi = max(ms) or 1.0
    counts = [0] * bins
    for v in ms:
        counts[min(int(v / hi * bins), bins - 1)] += 1
    top = max(counts)
    bw = (width - 60) / bins
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="round-trip histogram">']
    for i, c in enumerate(counts):
        bh = (height - 30) * c / top
        parts.append(f'<rect x="{50 + i * bw:.1f}" y="{height - 20 - bh:.1f}" width="{bw - 1:.1f}" height="{bh:.1f}" '
                     f'fill="#4a5568"><title>{hi * i / bins:.2f}-{hi * (i + 1) / bins:.2f} ms: {c}</title></rect>')
    parts.append(f'<text x="50" y="{height - 5}" font-size="10">round trip (ms), 0 to {hi:.1f}; '
                 f'{len(ms)} calls</text></svg>')
    return "".join(parts)


def _num(v: Any) -> str:
    return "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts))


_CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#1a202c}table{border-collapse:collapse;margin:.6em 0}
td,th{border:1px solid #cbd5e0;padding:3px 6px;vertical-align:top;text-align:left}code{font-size:11px}
tr.fail td,tr.error td{background:#fed7d7}tr.skip td{background:#fefcbf}.pass{color:#276749}.fail{color:#c53030}
section{border-top:2px solid #2d3748;margin-top:2em}.note{color:#975a16}"""

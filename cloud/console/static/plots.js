/* edgeml console: small plots drawn as inline SVG strings (no library).
 *
 * Plots.line({series: [{name, color, points: [[x, y], ...]}], ...})  y null = a gap; yMin, yMax
 *   (at least), yTop (at most: 1 for shares), refLines [{y, label}], vLines [{x, label}]
 * Plots.bars({rows: [{label, value, color, note}], ...})             horizontal bars
 * Plots.grouped({categories, series: [{name, color, values}], ...})  vertical grouped bars
 * Plots.lineage({nodes: [{id, title, lines, cls}], edges: [[from, to]]})
 * Every label is escaped; every function returns a string of SVG (or HTML for legend).
 */
"use strict";

(function () {
  const esc = (value) => String(value ?? "").replace(/[&<>"']/g, (c) => (
    { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

  function ticks(min, max, count = 4) {
    if (!(max > min)) max = min + 1;
    const raw = (max - min) / count;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
    const out = [], top = Math.ceil(max / step - 1e-9) * step; // the last tick covers max
    for (let v = Math.floor(min / step + 1e-9) * step; v <= top + step * 1e-9; v += step) out.push(+v.toFixed(10));
    return out;
  }

  const clock = (t) => new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
  const plain = (v) => (Math.abs(v) >= 1000 ? (v / 1000).toFixed(v % 1000 ? 1 : 0) + "k" : +v.toFixed(3) + "");

  function legend(series) {
    return '<div class="legend">' + series.map((s) => `<span><i style="background:${esc(s.color)}"></i>${esc(s.name)}</span>`).join("") + "</div>";
  }

  function line(o) {
    const W = o.width || 640, H = o.height || 220, L = 56, R = 14, T = 12, B = 28;
    const pts = o.series.flatMap((s) => s.points.filter((p) => p[1] !== null && p[1] !== undefined));
    if (!pts.length) return `<div class="empty">${esc(o.empty || "no data in this window")}</div>`;
    const xs = o.series.flatMap((s) => s.points.map((p) => p[0]));
    const x0 = Math.min(...xs), x1 = Math.max(...xs);
    const refs = o.refLines || [];
    let y0 = o.yMin ?? Math.min(...pts.map((p) => p[1]));
    let y1 = Math.max(...pts.map((p) => p[1]), ...refs.map((r) => r.y * 1.1));
    if (o.yMax !== undefined) y1 = Math.max(y1, o.yMax);
    const yt = ticks(y0, o.yTop !== undefined ? Math.min(o.yTop, y1 + (y1 - y0) * 0.05) : y1 + (y1 - y0) * 0.05);
    y0 = Math.min(y0, yt[0]); y1 = yt[yt.length - 1];
    const fy = o.yFormat || plain, fx = o.xFormat || clock;
    const X = (x) => L + (x1 > x0 ? (x - x0) / (x1 - x0) : 0.5) * (W - L - R);
    const Y = (y) => T + (1 - (y - y0) / (y1 - y0 || 1)) * (H - T - B);
    let svg = `<svg class="plot" viewBox="0 0 ${W} ${H}" role="img" aria-label="${esc(o.title || "line plot")}"><g class="grid">`;
    for (const v of yt) svg += `<line x1="${L}" x2="${W - R}" y1="${Y(v)}" y2="${Y(v)}"/><text x="${L - 6}" y="${Y(v) + 4}" text-anchor="end">${esc(fy(v))}</text>`;
    svg += "</g>";
    for (const v of ticks(x0, x1, 5).filter((v) => v >= x0 && v <= x1)) {
      svg += `<text x="${X(v)}" y="${H - 8}" text-anchor="middle">${esc(fx(v))}</text>`;
    }
    svg += `<line class="axis" x1="${L}" x2="${W - R}" y1="${H - B}" y2="${H - B}"/>`;
    for (const r of refs) {
      svg += `<line x1="${L}" x2="${W - R}" y1="${Y(r.y)}" y2="${Y(r.y)}" stroke="${esc(r.color || "#d64545")}" stroke-dasharray="5 4"/>`;
      svg += `<text x="${W - R - 2}" y="${Y(r.y) - 4}" text-anchor="end" style="fill:${esc(r.color || "#d64545")}">${esc(r.label || "")}</text>`;
    }
    for (const v of o.vLines || []) {
      if (v.x < x0 || v.x > x1) continue;
      svg += `<line x1="${X(v.x)}" x2="${X(v.x)}" y1="${T}" y2="${H - B}" stroke="#8a94a6" stroke-dasharray="3 3"/>`;
      svg += `<text x="${X(v.x) + 4}" y="${T + 10}">${esc(v.label || "")}</text>`;
    }
    for (const s of o.series) {
      let d = "", pen = false;
      for (const [x, y] of s.points) {
        if (y === null || y === undefined) { pen = false; continue; }
        d += (pen ? "L" : "M") + X(x).toFixed(1) + " " + Y(y).toFixed(1) + " ";
        pen = true;
      }
      svg += `<path d="${d}" fill="none" stroke="${esc(s.color)}" stroke-width="2" stroke-linejoin="round"${s.dash ? ' stroke-dasharray="6 4"' : ""}/>`;
      for (const [x, y] of s.points) {
        if (y !== null && y !== undefined) svg += `<circle cx="${X(x).toFixed(1)}" cy="${Y(y).toFixed(1)}" r="2.2" fill="${esc(s.color)}"><title>${esc(s.name)} ${esc(fx(x))}: ${esc(fy(y))}</title></circle>`;
      }
    }
    return svg + "</svg>" + legend(o.series);
  }

  function bars(o) {
    const rows = o.rows || [];
    if (!rows.length) return `<div class="empty">${esc(o.empty || "nothing to show")}</div>`;
    const W = o.width || 560, LW = o.labelWidth || 150, row = 26, H = rows.length * row + 8;
    const max = Math.max(...rows.map((r) => r.value), o.max || 0) || 1;
    const f = o.format || plain;
    const text = (r) => f(r.value) + (r.note ? " " + r.note : "");
    const room = Math.max(60, ...rows.map((r) => text(r).length * 6.6 + 10)); // for the value after the bar
    let svg = `<svg class="plot" viewBox="0 0 ${W} ${H}" style="max-width:${W}px" role="img" aria-label="${esc(o.title || "bars")}">`;
    rows.forEach((r, i) => {
      const y = 4 + i * row, w = Math.max(1, (r.value / max) * (W - LW - room));
      svg += `<text x="${LW - 8}" y="${y + 16}" text-anchor="end">${esc(r.label)}</text>`;
      svg += `<rect x="${LW}" y="${y + 3}" width="${w}" height="${row - 8}" rx="3" fill="${esc(r.color || "#2f6fde")}"><title>${esc(r.label)}: ${esc(f(r.value))}</title></rect>`;
      svg += `<text x="${LW + w + 6}" y="${y + 16}">${esc(f(r.value))}${r.note ? " " + esc(r.note) : ""}</text>`;
    });
    for (const ref of o.refLines || []) {
      const x = LW + (ref.value / max) * (W - LW - room);
      svg += `<line x1="${x}" x2="${x}" y1="0" y2="${H}" stroke="${esc(ref.color || "#d64545")}" stroke-dasharray="4 3"><title>${esc(ref.label || "")}</title></line>`;
    }
    return svg + "</svg>";
  }

  function grouped(o) {
    const cats = o.categories || [];
    if (!cats.length) return `<div class="empty">${esc(o.empty || "nothing to show")}</div>`;
    const W = o.width || 560, H = o.height || 200, L = 60, R = 10, T = 16, B = 26;
    const all = o.series.flatMap((s) => s.values.filter((v) => v !== null && v !== undefined));
    const high = Math.max(...all, ...(o.refLines || []).map((r) => r.y), 1e-9) * 1.08;
    const yt = ticks(0, o.top !== undefined ? Math.min(o.top, high) : high);
    const y1 = yt[yt.length - 1] || 1, f = o.format || plain;
    const Y = (v) => T + (1 - v / y1) * (H - T - B);
    const slot = (W - L - R) / cats.length, bw = Math.min(28, (slot * 0.8) / o.series.length);
    let svg = `<svg class="plot" viewBox="0 0 ${W} ${H}" role="img" aria-label="${esc(o.title || "grouped bars")}"><g class="grid">`;
    for (const v of yt) svg += `<line x1="${L}" x2="${W - R}" y1="${Y(v)}" y2="${Y(v)}"/><text x="${L - 6}" y="${Y(v) + 4}" text-anchor="end">${esc(f(v))}</text>`;
    svg += `</g><line class="axis" x1="${L}" x2="${W - R}" y1="${H - B}" y2="${H - B}"/>`;
    cats.forEach((c, i) => {
      const cx = L + slot * (i + 0.5), start = cx - (bw * o.series.length) / 2;
      o.series.forEach((s, j) => {
        const v = s.values[i];
        if (v === null || v === undefined) return;
        svg += `<rect x="${start + j * bw + 1}" y="${Y(v)}" width="${bw - 2}" height="${Math.max(0, H - B - Y(v))}" rx="2" fill="${esc(s.color)}"><title>${esc(s.name)} ${esc(c)}: ${esc(f(v))}</title></rect>`;
      });
      svg += `<text x="${cx}" y="${H - 8}" text-anchor="middle">${esc(c)}</text>`;
    });
    for (const r of o.refLines || []) {
      svg += `<line x1="${L}" x2="${W - R}" y1="${Y(r.y)}" y2="${Y(r.y)}" stroke="${esc(r.color || "#d64545")}" stroke-dasharray="5 4"/><text x="${W - R}" y="${Y(r.y) - 4}" text-anchor="end" style="fill:${esc(r.color || "#d64545")}">${esc(r.label || "")}</text>`;
    }
    return svg + "</svg>" + legend(o.series);
  }

  /** Lineage: columns by generation (a node's depth along its parents), arrows parent -> child. */
  function lineage(o) {
    const nodes = o.nodes || [];
    if (!nodes.length) return '<div class="empty">no model registered</div>';
    const parent = new Map(o.edges.map(([p, c]) => [c, p]));
    const depth = new Map();
    const depthOf = (id, seen = new Set()) => {
      if (depth.has(id)) return depth.get(id);
      const p = parent.get(id);
      const d = p && !seen.has(p) ? depthOf(p, seen.add(id)) + 1 : 0;
      depth.set(id, d);
      return d;
    };
    nodes.forEach((n) => depthOf(n.id));
    const cols = [];
    nodes.forEach((n) => (cols[depth.get(n.id)] = cols[depth.get(n.id)] || []).push(n));
    const NW = 190, NH = 64, GX = 70, GY = 18, P = 10;
    const rows = Math.max(...cols.map((c) => c.length));
    const W = Math.max(cols.length * (NW + GX) - GX + 2 * P, 400), H = rows * (NH + GY) - GY + 2 * P;
    const pos = new Map();
    cols.forEach((col, i) => col.forEach((n, j) => pos.set(n.id, { x: P + i * (NW + GX), y: P + j * (NH + GY) })));
    let svg = `<svg class="plot" viewBox="0 0 ${W} ${H}" style="max-width:${W}px" role="img" aria-label="model lineage">`;
    svg += '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto"><path d="M0 0 L10 5 L0 10 z" fill="#8a94a6"/></marker></defs>';
    for (const [p, c] of o.edges) {
      const a = pos.get(p), b = pos.get(c);
      if (!a || !b) continue;
      const x1 = a.x + NW, y1 = a.y + NH / 2, x2 = b.x - 2, y2 = b.y + NH / 2, mx = (x1 + x2) / 2;
      svg += `<path d="M${x1} ${y1} C${mx} ${y1} ${mx} ${y2} ${x2} ${y2}" fill="none" stroke="#8a94a6" stroke-width="1.6" marker-end="url(#arrow)"/>`;
    }
    for (const n of nodes) {
      const { x, y } = pos.get(n.id);
      const color = { live: "#1f9d55", idle: "#c3cad6" }[n.cls] || "#2f6fde";
      svg += `<g class="node" data-ref="${esc(n.id)}"><rect x="${x}" y="${y}" width="${NW}" height="${NH}" rx="8" fill="#fff" stroke="${color}" stroke-width="2"/>`;
      svg += `<rect x="${x}" y="${y}" width="6" height="${NH}" rx="3" fill="${color}"/>`;
      svg += `<text x="${x + 16}" y="${y + 20}" style="font-weight:700;fill:#1c2430;font-size:13px">${esc(n.title)}</text>`;
      (n.lines || []).slice(0, 2).forEach((l, i) => (svg += `<text x="${x + 16}" y="${y + 38 + i * 15}">${esc(l)}</text>`));
      svg += "</g>";
    }
    return svg + "</svg>";
  }

  window.Plots = { esc, line, bars, grouped, lineage, legend, ticks };
})();

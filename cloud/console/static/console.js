/* edgeml console: the views. The path names the view; each view loads its JSON through
 * EdgeML.api (the one door, which adds the token), draws itself, and redraws when the
 * live stream says one of its topics changed.
 */
"use strict";

(function () {
  const { api, live } = window.EdgeML;
  const P = window.Plots;
  const esc = P.esc;
  const view = document.getElementById("view");
  const COLORS = ["#2f6fde", "#e4572e", "#1f9d55", "#9b5de5", "#f0a202", "#00a6a6", "#d64590", "#6b7687"];

  // ------------------------------------------------------------------ formatting
  const fmtTime = (t) => (t ? new Date(t * 1000).toLocaleString([], { hour12: false }) : "–");
  const fmtClock = (t) => new Date(t * 1000).toLocaleTimeString([], { hour12: false });
  function ago(t) {
    if (!t) return "never";
    const s = Math.max(0, Date.now() / 1000 - t);
    if (s < 60) return Math.round(s) + " s ago";
    if (s < 3600) return Math.round(s / 60) + " min ago";
    if (s < 86400) return Math.round(s / 3600) + " h ago";
    return Math.round(s / 86400) + " d ago";
  }
  const ms = (us) => (us === null || us === undefined ? "–" : (us / 1000).toFixed(us < 10000 ? 2 : 1) + " ms");
  const pct = (v) => (v === null || v === undefined ? "–" : (100 * v).toFixed(1) + " %");
  const num = (v, d = 4) => (v === null || v === undefined ? "–" : typeof v === "number" ? +v.toPrecision(d) + "" : esc(v));
  const devicesText = (n) => n + (n === 1 ? " device" : " devices");
  const bytes = (n) => (n >= 1 << 20 ? (n / (1 << 20)).toFixed(1) + " MiB" : n >= 1024 ? (n / 1024).toFixed(1) + " KiB" : n + " B");
  const badge = (text, cls) => `<span class="badge ${esc(cls ?? String(text).replace(/ /g, "-"))}">${esc(text)}</span>`;
  const card = (label, value, cls = "", testid = "") =>
    `<div class="card ${cls}"${testid ? ` data-testid="${testid}"` : ""}><div class="label">${esc(label)}</div><div class="value${String(value).length > 12 ? " small" : ""}">${esc(value)}</div></div>`;
  const panel = (title, body, attrs = "") => `<section class="panel"${attrs}><h2>${esc(title)}</h2>${body}</section>`;
  const deviceLink = (fleet, id) => `<a href="/console/devices/${encodeURIComponent(fleet)}/${encodeURIComponent(id)}">${esc(id)}</a>`;
  const rolloutLink = (id) => `<a href="/console/rollouts/${encodeURIComponent(id)}">${esc(id)}</a>`;

  function toast(message, error = false) {
    const el = document.getElementById("toast");
    el.textContent = message;
    el.className = "show" + (error ? " error" : "");
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => (el.className = ""), 4000);
  }

  function table(headers, rows, attrs = "") {
    if (!rows.length) return '<div class="empty">nothing yet</div>';
    const head = headers.map((h) => `<th${h.endsWith("#") ? ' class="num"' : ""}>${esc(h.replace(/#$/, ""))}</th>`).join("");
    return `<table${attrs}><thead><tr>${head}</tr></thead><tbody>${rows.join("")}</tbody></table>`;
  }

  // ------------------------------------------------------------------ fleet overview
  const fleet = {
    title: "Fleet",
    topics: ["devices", "telemetry", "rollouts"],
    minRefreshMs: 3000,
    filter: "",
    async load() {
      return api("/v1/console/overview");
    },
    render(o) {
      const healthColors = { ok: "#1f9d55", offline: "#8a94a6", "update failed": "#d64545", gaps: "#d98a00", silent: "#f0b429" };
      const versions = P.bars({
        title: "model versions across the fleet",
        rows: o.versions.map((v, i) => ({ label: v.model, value: v.devices, color: COLORS[i % COLORS.length], note: `(${v.online} online)` })),
        format: devicesText, labelWidth: 130, empty: "no device has reported a model yet",
      });
      const health = P.bars({
        title: "device health",
        rows: Object.entries(o.health).map(([k, n]) => ({ label: k, value: n, color: healthColors[k] || "#6b7687" })),
        format: devicesText, labelWidth: 110, empty: "no device registered",
      });
      const active = o.active_rollouts.map((r) => `<tr>
        <td>${rolloutLink(r.id)}</td><td>${esc(r.model)}</td><td>${esc(r.strategy)}</td><td>${badge(r.state)}</td>
        <td>step ${r.step + 1}/${r.steps.length} (${r.percent} %)</td></tr>`);
      const f = this.filter.toLowerCase();
      const shown = o.device_list.filter((d) => !f || (d.device_id + " " + (d.model || "") + " " + d.health).toLowerCase().includes(f));
      const rows = shown.slice(0, 300).map((d) => `<tr data-device="${esc(d.device_id)}">
        <td>${deviceLink(d.fleet, d.device_id)}</td><td>${esc(d.fleet)}</td>
        <td>${badge(d.online ? "online" : "offline")}</td><td>${esc(d.model || "–")}</td><td>${badge(d.health)}</td>
        <td class="num">${d.records}</td><td class="num">${d.gaps}</td><td>${ago(d.last_seen)}</td></tr>`);
      return `<h1>Fleet <small>${o.devices} devices, updated ${fmtClock(o.now)}</small></h1>
        <div class="grid cards">
          ${card("Devices", o.devices, "", "devices")}${card("Online", o.online, "ok", "online")}
          ${card("Offline", o.offline, o.offline ? "bad" : "", "offline")}${card("Records ingested", o.records, "", "records")}
          ${card("Active rollouts", o.active_rollouts.length, "", "active-rollouts")}
        </div>
        <div class="grid cols-2">${panel("Model versions", versions, ' data-testid="versions"')}${panel("Health", health)}</div>
        ${o.active_rollouts.length ? `<div class="grid">${panel("Rollouts in progress", table(["Rollout", "Model", "Strategy", "State", "Progress"], active))}</div>` : ""}
        <section class="panel"><div class="toolbar"><h2 style="margin:0;flex:1">Devices</h2>
          <input id="filter" placeholder="filter: id, model, health" value="${esc(this.filter)}"></div>
          <div class="scroll">${table(["Device", "Fleet", "Status", "Model", "Health", "Records#", "Gaps#", "Last seen"], rows, ' id="devices"')}</div>
          ${shown.length > 300 ? `<p class="muted">${shown.length - 300} more: narrow the filter</p>` : ""}</section>`;
    },
    bind() {
      const input = document.getElementById("filter");
      input.addEventListener("input", () => {
        this.filter = input.value;
        redraw(true);
      });
    },
  };

  // ------------------------------------------------------------------ device page
  const device = {
    title: "Device",
    topics: ["devices", "telemetry"],
    minRefreshMs: 3000,
    window: 600,
    async load(fleetId, deviceId) {
      const base = `/v1/console/devices/${encodeURIComponent(fleetId)}/${encodeURIComponent(deviceId)}`;
      const [s, drift] = await Promise.all([api(`${base}/series?window_s=${this.window}&buckets=40`),
        driftMeasurements(`?fleet=${encodeURIComponent(fleetId)}`)]);
      const active = (s.device.reported_state || {}).active || {};
      s.training_drift = (drift || []).find((d) => d.cohort === "*" && d.model === active.name && d.version === active.version) || null;
      return s;
    },
    render(s) {
      const d = s.device, state = d.reported_state || {}, active = state.active || {};
      const lat = P.line({
        title: "latency", yMin: 0, yFormat: (v) => (v / 1000).toFixed(v < 10000 ? 2 : 1) + " ms",
        series: [
          { name: "p50", color: "#2f6fde", points: s.latency_us.map((b) => [b.t, b.p50]) },
          { name: "p95", color: "#e4572e", points: s.latency_us.map((b) => [b.t, b.p95]) },
        ],
      });
      const classes = [...new Set([...Object.keys(s.top1), ...Object.keys(s.reference_top1)])].sort((a, b) => a - b);
      const share = (counts) => {
        const total = Object.values(counts).reduce((a, b) => a + b, 0) || 1;
        return classes.map((k) => (counts[k] || 0) / total);
      };
      const dist = P.grouped({
        title: "predictions distribution", top: 1, categories: classes.map((k) => "class " + k), format: (v) => (100 * v).toFixed(0) + " %",
        series: [{ name: "this device", color: "#2f6fde", values: share(s.top1) }, { name: "fleet", color: "#c3cad6", values: share(s.reference_top1) }],
        empty: "no predictions in this window",
      });
      const drift = P.line({
        title: "drift", yMin: 0, yMax: 0.25, yFormat: (v) => v.toFixed(2),
        refLines: [{ y: 0.1, label: "0.1 watch", color: "#d98a00" }, { y: 0.2, label: "0.2 drift", color: "#d64545" }],
        series: [{ name: "PSI of top1 vs the fleet", color: "#9b5de5", points: s.drift.map((b) => [b.t, b.psi]) }],
        empty: "not enough predictions to measure drift",
      });
      const events = s.events.map((e) => `<tr><td>${fmtTime(e.ts)}</td><td>${esc(e.name || "")}</td><td>${badge(e.level || "info", e.level === "error" ? "bad" : "")}</td>
        <td><code>${esc(JSON.stringify(e.data || {}))}</code></td></tr>`);
      const update = state.update || {};
      const accuracy = s.feedback.labeled ? pct(s.feedback.correct / s.feedback.labeled) : "–";
      const windows = [[300, "5 min"], [600, "10 min"], [1800, "30 min"], [3600, "1 h"]]
        .map(([v, l]) => `<option value="${v}"${v === this.window ? " selected" : ""}>${l}</option>`).join("");
      return `<h1>${esc(d.device_id)} ${badge(d.online ? "online" : "offline")} <small>fleet ${esc(d.fleet)} · last seen ${ago(d.last_seen)}</small>
          <span style="flex:1"></span><select id="window" title="time window">${windows}</select></h1>
        <div class="grid cards">
          ${card("Model", active.name ? `${active.name}@${active.version}` : "–", "", "model")}
          ${card("Applied revision", state.applied_revision ?? "–")}
          ${card("Predictions (window)", s.predictions, "", "predictions")}
          ${card(`Accuracy (${s.feedback.labeled} labels)`, accuracy)}
          ${card("Drift PSI (window)", s.drift_psi === null ? "–" : s.drift_psi.toFixed(3), s.drift_psi > 0.2 ? "bad" : "")}
          ${card("Records / gaps", `${d.records} / ${d.gaps}`)}
          ${s.training_drift ? card("Model drift (training ref.)", s.training_drift.psi === null ? s.training_drift.status.replace(/_/g, " ") : s.training_drift.psi.toFixed(3), s.training_drift.status === "drift" ? "bad" : "", "training-drift") : ""}
        </div>
        <div class="grid cols-2">
          ${panel("Latency per " + (s.bucket_s < 10 ? s.bucket_s.toFixed(1) : Math.round(s.bucket_s)) + " s", lat, ' data-testid="latency"')}
          ${panel("Predictions distribution (top1)", dist, ' data-testid="distribution"')}
        </div>
        <div class="grid cols-2">
          ${panel("Drift", drift + '<p class="muted">Population stability index of this device\'s predicted classes against the whole fleet\'s over the same window.</p>')}
          ${panel("Update", `<dl class="kv"><dt>state</dt><dd>${esc(update.state || "–")}</dd><dt>result</dt><dd>${esc(update.result || "–")}</dd>
              <dt>revision</dt><dd>${esc(update.revision ?? "–")}</dd><dt>active</dt><dd class="mono">${esc(active.sha256 ? active.sha256.slice(0, 16) + "…" : "–")}</dd>
              <dt>shadow</dt><dd>${esc(state.shadow ? state.shadow.name + "@" + state.shadow.version : "–")}</dd>
              <dt>hardware</dt><dd>${esc(state.hardware_profile || d.hardware_profile || "–")}</dd></dl>
              <details open><summary>reported state</summary><pre>${esc(JSON.stringify(state, null, 2))}</pre></details>`)}
        </div>
        ${panel("Update history and events", `<div class="scroll">${table(["Time", "Event", "Level", "Data"], events, ' id="events"')}</div>`)}`;
    },
    bind() {
      document.getElementById("window").addEventListener("change", (e) => {
        this.window = +e.target.value;
        redraw();
      });
    },
  };

  // ------------------------------------------------------------------ models
  /** Drift measurements against the training reference, where the coordinator makes them
   * (GET /v1/drift); null when it does not. */
  const driftMeasurements = (query = "") => api("/v1/drift" + query).catch(() => null);

  function driftPanel(measured) {
    if (!measured) return "";
    if (!measured.length) return panel("Drift against the training reference", '<div class="empty">no measurement yet</div>', ' data-testid="drift"');
    const all = measured.filter((d) => d.cohort === "*");
    const threshold = measured[0].threshold;
    const chart = P.bars({
      rows: all.filter((d) => d.psi !== null).map((d) => ({ label: `${d.model}@${d.version}`, value: d.psi, color: d.status === "drift" ? "#d64545" : "#1f9d55" })),
      format: (v) => v.toFixed(3), labelWidth: 130, max: threshold * 1.5, refLines: [{ value: threshold, label: "threshold" }],
      empty: "no version has enough telemetry or a training reference",
    });
    const rows = measured.map((d) => `<tr data-drift="${esc(d.model + "@" + d.version)}" data-cohort="${esc(d.cohort)}">
      <td><b>${esc(d.model)}@${esc(d.version)}</b></td><td>${esc(d.fleet)}</td><td>${esc(d.cohort)}</td><td>${badge(d.status.replace(/_/g, " "), d.status === "drift" ? "bad" : d.status === "ok" ? "ok" : "warn")}</td>
      <td class="num">${num(d.psi)}</td><td class="num">${num(d.prediction_psi)}</td><td class="num">${num(d.input_psi)}</td>
      <td class="num">${d.predictions}</td><td>${fmtTime(d.ts)}</td><td>${esc(d.reason || "")}</td></tr>`);
    return `<div class="grid">${panel("Drift against the training reference", chart +
      table(["Version", "Fleet", "Cohort", "Status", "PSI#", "Predictions PSI#", "Inputs PSI#", "Predictions#", "Measured", "Why"], rows, ' id="drift"'), ' data-testid="drift"')}</div>`;
  }

  const models = {
    title: "Models",
    topics: ["models", "devices"],
    async load() {
      const [m, drift] = await Promise.all([api("/v1/console/models"), driftMeasurements()]);
      return { ...m, drift };
    },
    render(m) {
      const graph = P.lineage({
        nodes: m.models.map((x) => ({
          id: x.ref, title: x.ref, cls: x.devices ? "live" : "idle",
          lines: [`${x.format} · ${x.quantization} · ${bytes(x.size)}`,
            `${x.devices} devices${x.aliases.length ? " · " + x.aliases.join(", ") : ""}`],
        })),
        edges: m.edges,
      });
      const keys = [...new Set(m.models.flatMap((x) => Object.keys(x.metrics).filter((k) => typeof x.metrics[k] === "number")))];
      const metricPlots = keys.map((k) => panel("Metric: " + k, P.bars({
        rows: m.models.filter((x) => typeof x.metrics[k] === "number").map((x, i) => ({ label: x.ref, value: x.metrics[k], color: COLORS[i % COLORS.length] })),
        format: (v) => +v.toPrecision(4) + "", labelWidth: 120,
      }))).join("");
      const rows = m.models.map((x) => `<tr data-ref="${esc(x.ref)}">
        <td><b>${esc(x.ref)}</b></td><td>${esc(x.format)} / ${esc(x.runtime)}</td><td>${esc(x.quantization)}</td>
        <td class="num">${bytes(x.size)}</td><td class="mono" title="${esc(x.sha256)}">${esc(x.sha256.slice(0, 12))}…</td>
        <td>${x.signed ? badge("signed", "ok") : badge("unsigned", "bad")}</td><td>${x.aliases.map((a) => badge(a, "")).join(" ") || "–"}</td>
        <td>${esc(x.parent || "–")}</td>
        <td>${Object.entries(x.metrics).map(([k, v]) => `${esc(k)}=${num(v)}`).join(", ") || "–"}</td>
        <td class="num">${x.devices} <span class="muted">(${x.devices_online} online)</span></td><td>${fmtTime(x.created_at)}</td></tr>`);
      return `<h1>Models <small>${m.models.length} versions</small></h1>
        ${panel("Lineage", graph + '<p class="muted">Arrows go from the model a version was derived from to the version. Green: running on devices.</p>', ' data-testid="lineage"')}
        <div class="grid" style="margin-top:16px">${panel("Versions", `<div class="scroll">${table(["Version", "Format", "Quantization", "Size#", "sha256", "Signature", "Aliases", "Parent", "Metrics", "Devices#", "Registered"], rows, ' id="models"')}</div>`)}</div>
        ${keys.length ? `<div class="grid cols-3">${metricPlots}</div>` : ""}
        ${driftPanel(m.drift)}`;
    },
  };

  // ------------------------------------------------------------------ rollouts
  const rollouts = {
    title: "Rollouts",
    topics: ["rollouts"],
    async load() {
      return api("/v1/rollouts");
    },
    render(list) {
      const rows = list.slice().reverse().map((r) => `<tr data-rollout="${esc(r.id)}">
        <td>${rolloutLink(r.id)}</td><td><b>${esc(r.model)}</b></td><td>${esc(r.baseline || "–")}</td><td>${esc(r.strategy)}</td>
        <td>${badge(r.state)}</td><td>step ${r.step + 1}/${r.steps.length} (${r.percent} %)</td><td>${esc(r.selector)}</td>
        <td>${esc(r.created_by)}</td><td>${fmtTime(r.created_at)}</td><td>${esc(r.reason || "")}</td></tr>`);
      return `<h1>Rollouts <small>${list.length}</small></h1>
        ${panel("All rollouts, newest first", table(["Rollout", "Model", "Baseline", "Strategy", "State", "Step", "Targets", "By", "Started", "Why"], rows, ' id="rollouts"'))}`;
    },
  };

  const ACTIONS = [
    ["pause", ["running", "promoting"], ""], ["resume", ["paused"], ""], ["promote", ["running", "paused"], "primary"],
    ["approve", ["pending_approval"], "primary"], ["abort", ["pending_approval", "running", "promoting", "paused"], "danger"],
    ["rollback", ["pending_approval", "running", "paused", "completed"], "danger"],
  ];

  function evidencePlot(v) {
    const e = v.evidence || {}, sides = ["canary", "baseline"];
    const pair = (label, obj, f, refs, top) => P.grouped({
      categories: [label], width: 360, height: 170, format: f, refLines: refs, top,
      series: [{ name: "canary", color: "#e4572e", values: [obj.canary] }, { name: "baseline", color: "#2f6fde", values: [obj.baseline] }],
    });
    if (v.gate === "latency_p95" && e.p95_us) {
      return P.grouped({
        categories: ["p95", "median"], width: 360, height: 170, format: (x) => (x / 1000).toFixed(2) + " ms",
        series: [{ name: "canary", color: "#e4572e", values: [e.p95_us.canary, e.median_us.canary] },
          { name: "baseline", color: "#2f6fde", values: [e.p95_us.baseline, e.median_us.baseline] }],
        refLines: [{ y: e.p95_us.baseline * (1 + e.threshold), label: `baseline p95 +${Math.round(e.threshold * 100)} %` }],
      });
    }
    if (v.gate === "accuracy" && e.accuracy) {
      return pair("accuracy", e.accuracy, (x) => (100 * x).toFixed(0) + " %", [{ y: e.accuracy.baseline - e.threshold, label: `baseline −${Math.round(e.threshold * 100)} pts` }], 1);
    }
    if (v.gate === "error_rate" && e.rates) return pair("error rate", e.rates, (x) => (100 * x).toFixed(2) + " %");
    if (v.gate === "psi" && e.top1) {
      const classes = [...new Set([...Object.keys(e.top1.canary), ...Object.keys(e.top1.baseline)])].sort((a, b) => a - b);
      return P.grouped({
        categories: classes, width: 360, height: 170, format: (x) => (100 * x).toFixed(0) + " %",
        series: [{ name: "canary", color: "#e4572e", values: classes.map((k) => e.top1.canary[k] || 0) },
          { name: "baseline", color: "#2f6fde", values: classes.map((k) => e.top1.baseline[k] || 0) }],
      });
    }
    if (v.gate === "shadow_agreement" && e.agreement !== undefined) {
      return P.bars({ rows: [{ label: "agreement", value: e.agreement, color: "#2f6fde" }], max: 1, width: 360, labelWidth: 80,
        format: (x) => (100 * x).toFixed(1) + " %", refLines: [{ value: e.threshold, label: "threshold" }] });
    }
    return "";
  }

  function evidenceFacts(e) {
    const facts = [];
    if (e.samples) facts.push(["samples", Object.entries(e.samples).map(([k, n]) => `${k} ${n}`).join(", ")]);
    for (const k of ["p_value", "z", "psi", "p95_growth", "drop", "difference", "agreement", "threshold", "alpha", "min_samples"]) {
      if (e[k] !== undefined) facts.push([k.replace(/_/g, " "), num(e[k])]);
    }
    if (e.unhealthy) facts.push(["unhealthy", e.unhealthy.length ? e.unhealthy.join(", ") : "none"]);
    if (e.devices !== undefined) facts.push(["devices", e.devices]);
    if (e.why) facts.push(["why", e.why]);
    if (e.test) facts.push(["test", e.test]);
    return '<dl class="kv">' + facts.map(([k, v]) => `<dt>${esc(k)}</dt><dd>${esc(v)}</dd>`).join("") + "</dl>";
  }

  function verdictCard(v) {
    return `<article class="verdict ${esc(v.verdict)}" data-gate="${esc(v.gate)}">
      <header><b>${esc(v.gate)}</b>${badge(v.verdict)}</header>
      ${evidencePlot(v)}${evidenceFacts(v.evidence || {})}
      <details><summary>evidence (JSON)</summary><pre>${esc(JSON.stringify(v.evidence, null, 2))}</pre></details></article>`;
  }

  const rollout = {
    title: "Rollout",
    why: "", // what the operator typed survives the redraws of live updates
    topics: ["rollouts", "telemetry"],
    minRefreshMs: 2000,
    async load(id) {
      const [r, series] = await Promise.all([api(`/v1/rollouts/${encodeURIComponent(id)}`),
        api(`/v1/console/rollouts/${encodeURIComponent(id)}/series?buckets=24`).catch(() => null)]);
      return { r, series };
    },
    render({ r, series }) {
      const steps = r.steps.map((s, i) => `<span class="step ${i < r.step || r.state === "completed" ? "done" : i === r.step ? "current" : ""}">${s} %</span>`).join('<span class="muted">→</span>');
      const buttons = ACTIONS.map(([a, states, cls]) => `<button class="${cls}" data-action="${a}" ${states.includes(r.state) ? "" : "disabled"}>${a[0].toUpperCase() + a.slice(1)}</button>`).join("");
      const cohorts = Object.entries(r.cohorts).map(([c, x]) => `<tr data-cohort="${esc(c)}"><td>${badge(c, c === "canary" ? "warn" : "")}</td><td class="num">${x.devices}</td><td class="num">${x.applied}</td><td class="num">${x.reverted}</td></tr>`);
      const bySteps = new Map();
      r.verdicts.forEach((v) => (bySteps.get(v.step) || bySteps.set(v.step, []).get(v.step)).push(v));
      let verdicts = [...bySteps.entries()].reverse().map(([step, vs]) =>
        `<h2 style="margin-top:8px">Step ${step + 1} (${r.steps[step]} %) · ${fmtTime(vs[0].ts)}</h2><div class="verdicts">${vs.map(verdictCard).join("")}</div>`).join("");
      const last = (r.result || {}).last_evaluation;
      if (!verdicts && last) {
        verdicts = `<p class="muted">No decision yet; the last evaluation (${fmtTime(last.ts)}) was ${esc(last.decision)}:</p><div class="verdicts">${last.verdicts.map(verdictCard).join("")}</div>`;
      }
      if (!verdicts) {
        const due = r.step_started_at + (r.policy.min_dwell_s || 0);
        verdicts = `<div class="empty">No gate verdict yet: step ${r.step + 1} started ${ago(r.step_started_at)}; the gates judge it from ${fmtTime(due)} (min dwell ${r.policy.min_dwell_s} s).</div>`;
      }
      let live = '<div class="empty">no telemetry series</div>';
      if (series) {
        const line = (side, key, color, dash) => ({ name: `${side} ${key}`, color, dash, points: series.latency_us[side].map((b) => [b.t, b[key]]) });
        live = `<div class="grid cols-2"><div><h2>Latency p95 and p50 by cohort</h2>${P.line({
          yMin: 0, yFormat: (v) => (v / 1000).toFixed(2) + " ms", vLines: [{ x: series.step_started_at, label: "step " + (r.step + 1) }],
          series: [line("canary", "p95", "#e4572e"), line("baseline", "p95", "#2f6fde"), line("canary", "p50", "#e4572e", true), line("baseline", "p50", "#2f6fde", true)],
        })}</div><div><h2>Accuracy from feedback by cohort</h2>${P.line({
          yFormat: (v) => (100 * v).toFixed(0) + " %", yMax: 1, yTop: 1,
          series: ["canary", "baseline"].map((side) => ({ name: side, color: side === "canary" ? "#e4572e" : "#2f6fde", points: series.accuracy[side].map((b) => [b.t, b.accuracy]) })),
          empty: "no feedback labels yet",
        })}</div></div>`;
      }
      const gates = (r.policy.gates || []).map((g) => `<tr><td>${esc(g.metric)}</td><td class="num">${num(g.threshold)}</td><td class="num">${g.min_samples ?? r.policy.min_samples}</td></tr>`);
      const audit = r.audit.slice().reverse().map((a) => `<tr><td>${fmtTime(a.ts)}</td><td>${esc(a.actor)}</td><td>${badge(a.action, "")}</td><td>${esc(a.reason)}</td></tr>`);
      return `<h1>Rollout ${esc(r.id)} ${badge(r.state)} <small>${esc(r.strategy)} of <b>${esc(r.model)}</b> over ${esc(r.baseline || "–")} · targets ${esc(r.selector)} · fleet ${esc(r.fleet)}</small></h1>
        <p class="reason" data-testid="reason">${esc(r.reason || "")}</p>
        <div class="toolbar" id="actions">${buttons}<span style="flex:1"></span>
          <label class="muted">acting as <input id="actor" size="10" value="${esc(localStorage.getItem("edgeml.actor") || "console")}"></label>
          <input id="why" size="28" placeholder="reason (optional)" value="${esc(this.why)}"></div>
        <div class="grid cols-3">
          ${panel("Steps", `<div class="steps" data-testid="steps">${steps}</div><p class="muted">Step ${r.step + 1} of ${r.steps.length} started ${ago(r.step_started_at)}.</p>`)}
          ${panel("Cohorts", table(["Cohort", "Devices#", "Applied#", "Reverted#"], cohorts, ' id="cohorts"'))}
          ${panel("Policy", table(["Gate", "Threshold#", "Min samples#"], gates) + `<p class="muted">confidence ${r.policy.confidence}, min dwell ${r.policy.min_dwell_s} s, on fail: ${esc(r.policy.on_fail)}</p>`)}
        </div>
        <div class="grid">${panel("Cohorts live", live, ' data-testid="cohort-plots"')}</div>
        <div class="grid">${panel("Gate verdicts and evidence", verdicts, ' id="verdicts"')}</div>
        ${panel("Audit", `<div class="scroll">${table(["Time", "Actor", "Action", "Why"], audit)}</div>`)}`;
    },
    bind(id) {
      const actorInput = document.getElementById("actor"), whyInput = document.getElementById("why");
      actorInput.addEventListener("input", () => localStorage.setItem("edgeml.actor", actorInput.value.trim()));
      whyInput.addEventListener("input", () => (this.why = whyInput.value));
      document.querySelectorAll("#actions button[data-action]").forEach((b) => b.addEventListener("click", async () => {
        const action = b.dataset.action;
        if ((action === "abort" || action === "rollback") && !window.confirm(`${action} rollout ${id}?`)) return;
        const actor = actorInput.value.trim() || "console";
        b.disabled = true;
        try {
          const r = await api(`/v1/rollouts/${encodeURIComponent(id)}/${action}`, {
            method: "POST", body: { actor, reason: whyInput.value },
          });
          this.why = "";
          toast(`${action}: rollout ${id} is ${r.state}`);
        } catch (err) {
          toast(`${action} failed: ${err.message}`, true);
        }
        redraw(true);
      }));
    },
  };

  // ------------------------------------------------------------------ audit log
  const audit = {
    title: "Audit log",
    topics: ["audit"],
    filter: "",
    async load() {
      return api("/v1/audit?limit=500");
    },
    render(entries) {
      const f = this.filter.toLowerCase();
      const shown = entries.filter((a) => !f || [a.actor, a.role, a.action, a.rollout_id, a.reason].join(" ").toLowerCase().includes(f));
      const request = (e) => (e && e.method && e.path ? ` <span class="muted mono">${esc(e.method)} ${esc(e.path)}</span>` : "");
      const rows = shown.map((a) => `<tr data-action="${esc(a.action)}"><td>${fmtTime(a.ts)}</td><td>${esc(a.actor)}${a.role ? ` <span class="muted">(${esc(a.role)})</span>` : ""}</td>
        <td>${badge(a.action, "")}</td><td>${a.rollout_id ? rolloutLink(a.rollout_id) : "–"}</td><td>${esc(a.reason)}${request(a.evidence)}</td>
        <td><details><summary>${esc(Object.keys(a.evidence || {}).join(", ") || "–")}</summary><pre>${esc(JSON.stringify(a.evidence, null, 2))}</pre></details></td></tr>`);
      return `<h1>Audit log <small>${entries.length} entries, newest first</small></h1>
        <section class="panel"><div class="toolbar"><h2 style="margin:0;flex:1">Who did what, when, and why</h2>
          <input id="filter" placeholder="filter: actor, action, rollout" value="${esc(this.filter)}"></div>
          ${table(["Time", "Actor", "Action", "Rollout", "Why", "Evidence"], rows, ' id="audit"')}</section>`;
    },
    bind() {
      fleet.bind.call(this);
    },
  };

  // ------------------------------------------------------------------ routing and refresh
  function route() {
    const parts = location.pathname.replace(/^\/console\/?/, "").split("/").filter(Boolean).map(decodeURIComponent);
    if (!parts.length) return [fleet, [], "fleet"];
    if (parts[0] === "devices" && parts.length === 3) return [device, parts.slice(1), "fleet"];
    if (parts[0] === "models") return [models, [], "models"];
    if (parts[0] === "rollouts" && parts.length === 2) return [rollout, [parts[1]], "rollouts"];
    if (parts[0] === "rollouts") return [rollouts, [], "rollouts"];
    if (parts[0] === "audit") return [audit, [], "audit"];
    return [null, [], ""];
  }

  const [current, args, nav] = route();
  let data = null, busy = false, again = false, lastLoad = 0;
  document.querySelectorAll("header nav a").forEach((a) => a.classList.toggle("active", a.dataset.nav === nav));

  async function redraw(keepData = false) {
    if (busy) return void (again = true);
    busy = true;
    try {
      if (!keepData || data === null) data = await current.load(...args);
      lastLoad = Date.now();
      const focused = document.activeElement && document.activeElement.id;
      const caret = focused && document.activeElement.selectionStart;
      const scroll = [...document.querySelectorAll(".scroll")].map((el) => el.scrollTop);
      view.innerHTML = current.render(data, ...args);
      document.querySelectorAll(".scroll").forEach((el, i) => (el.scrollTop = scroll[i] || 0));
      if (current.bind) current.bind(...args);
      if (focused && document.getElementById(focused)) {
        const el = document.getElementById(focused);
        el.focus();
        if (caret !== null && caret !== undefined && el.setSelectionRange) el.setSelectionRange(caret, caret);
      }
      document.title = `${current.title}${args.length ? " " + args[args.length - 1] : ""} · edgeml console`;
      document.body.dataset.loaded = String(lastLoad);
    } catch (err) {
      if (data === null) view.innerHTML = `<h1>${esc(current.title)}</h1><div class="panel empty">Could not load: ${esc(err.message)}${err.status === 401 ? " (open the console with ?token=…)" : ""}</div>`;
      else toast("refresh failed: " + err.message, true);
    } finally {
      busy = false;
      if (again) {
        again = false;
        setTimeout(redraw, 50);
      }
    }
  }

  if (!current) {
    view.innerHTML = '<h1>Not found</h1><p><a href="/console/">Back to the fleet</a></p>';
    return;
  }
  redraw();
  let pending = null;
  live((topics) => {
    if (!topics.includes("*") && !topics.some((t) => current.topics.includes(t))) return;
    const wait = Math.max(0, (current.minRefreshMs || 1000) - (Date.now() - lastLoad));
    const urgent = topics.includes("rollouts") || topics.includes("audit") || topics.includes("models");
    clearTimeout(pending);
    pending = setTimeout(redraw, urgent ? 0 : wait);
  }, document.getElementById("live"));
})();

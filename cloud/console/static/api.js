/* edgeml console: the one door to the coordinator's API, and live updates.
 *
 * Every request of the console goes through api(): it adds "Authorization: Bearer <token>"
 * when a token is in sessionStorage (stored from a ?token= query parameter on first load,
 * then removed from the address bar). The server-sent event stream cannot send headers,
 * so its URL carries ?access_token=<token>. When the stream fails the page polls.
 */
"use strict";

(function () {
  const KEY = "edgeml.token";
  const params = new URLSearchParams(location.search);
  if (params.has("token")) {
    sessionStorage.setItem(KEY, params.get("token"));
    params.delete("token");
    const rest = params.toString();
    history.replaceState(null, "", location.pathname + (rest ? "?" + rest : "") + location.hash);
  }

  function token() {
    return sessionStorage.getItem(KEY);
  }

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  /** GET (or options.method) path; JSON bodies are encoded; the JSON answer is returned. */
  async function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    headers.set("Accept", "application/json");
    const t = token();
    if (t) headers.set("Authorization", "Bearer " + t);
    let body = options.body;
    if (body !== undefined && typeof body !== "string") {
      body = JSON.stringify(body);
      headers.set("Content-Type", "application/json");
    }
    const response = await fetch(path, { method: options.method || "GET", headers, body, cache: "no-store" });
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (e) {
      data = text;
    }
    if (!response.ok) {
      const detail = data && data.detail !== undefined ? data.detail : text || response.statusText;
      throw new ApiError(response.status, typeof detail === "string" ? detail : JSON.stringify(detail));
    }
    return data;
  }

  function streamUrl() {
    const t = token();
    return "/v1/stream" + (t ? "?access_token=" + encodeURIComponent(t) : "");
  }

  /**
   * Call onChange(topics) when the coordinator says something changed ("*": anything may
   * have). Server-sent events first; polling every pollMs when they are not available.
   * indicator: an element that shows "live" or "polling".
   */
  function live(onChange, indicator, pollMs = 5000) {
    let timer = null;
    let opened = false;
    const show = (mode, title) => {
      if (!indicator) return;
      indicator.textContent = mode;
      indicator.className = "live " + mode;
      indicator.title = title;
    };
    const poll = () => {
      if (timer) return;
      show("polling", "the live stream is unavailable: refreshing every " + pollMs / 1000 + " s");
      timer = setInterval(() => onChange(["*"]), pollMs);
    };
    if (!window.EventSource) return poll();
    const source = new EventSource(streamUrl());
    source.addEventListener("ready", () => {
      if (timer) {
        clearInterval(timer);
        timer = null;
      }
      if (opened) onChange(["*"]); // a reconnect: something may have changed in between
      opened = true;
      show("live", "server-sent events from the coordinator");
    });
    source.addEventListener("change", (event) => onChange(JSON.parse(event.data).topics));
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED || !opened) return poll(); // refused, or never there
      show("reconnecting", "the live stream dropped; reconnecting");
      setTimeout(() => {
        if (source.readyState !== EventSource.OPEN) poll(); // still down: poll meanwhile
      }, pollMs);
    };
    return source;
  }

  window.EdgeML = { api, live, token, ApiError };
})();

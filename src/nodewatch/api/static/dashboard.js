// nodewatch dashboard: plain JS, no dependencies, no network beyond this coordinator.
// Reads /v1/nodes (poll), /v1/nodes/{id}/history (incremental), /v1/events/stream (SSE);
// drain/undrain/approve ask for the admin token on a 401 and keep it in sessionStorage.
"use strict";

const TOKEN_KEY = "nodewatch.adminToken";
const HOUR = 3600;
const NODES_EVERY_MS = 1000;
const HISTORY_EVERY_MS = 5000;
const MAX_EVENTS = 200;
const history = new Map(); // node_id -> {samples: [], lastTs: number}
let nodes = [];

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}

function num(value, digits = 1) {
  return typeof value === "number" ? value.toFixed(digits).replace(/\.0+$/, "") : "-";
}

function ago(ts) {
  if (!ts) return "never";
  const s = Math.max(0, Date.now() / 1000 - ts);
  if (s < 60) return `${s.toFixed(0)}s ago`;
  if (s < 3600) return `${(s / 60).toFixed(0)}m ago`;
  return `${(s / 3600).toFixed(1)}h ago`;
}

function clock(ts) {
  return new Date(ts * 1000).toLocaleTimeString([], { hour12: false });
}

function say(text) {
  document.getElementById("message").textContent = text;
}

async function getJSON(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

// /healthz answers 503 when failing, with the same body: show it rather than "unreachable".
async function getHealth() {
  const response = await fetch("/healthz", { cache: "no-store" });
  if (!response.ok && response.status !== 503) throw new Error(`/healthz: HTTP ${response.status}`);
  return response.json();
}

// ------------------------------------------------------------------ operator commands

async function send(method, path, body, token) {
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  return fetch(path, { method, headers, body: body ? JSON.stringify(body) : undefined });
}

async function command(name, nodeId) {
  const path = `/v1/nodes/${encodeURIComponent(nodeId)}/${name}`;
  const body = name === "drain" ? { reason: "from the dashboard" } : null;
  let token = sessionStorage.getItem(TOKEN_KEY) || "";
  let response = await send("POST", path, body, token);
  if (response.status === 401) {
    token = window.prompt("Admin token (NODEWATCH_ADMIN_TOKEN):") || "";
    if (!token) { say(`${name} ${nodeId}: needs the admin token`); return; }
    response = await send("POST", path, body, token);
    if (response.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      say(`${name} ${nodeId}: wrong admin token`);
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
  }
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
    say(`${name} ${nodeId}: ${message}`);
    return;
  }
  say("");
  const result = await response.json();
  if (result.node) {
    nodes = nodes.map((n) => (n.node_id === nodeId ? { ...n, ...result.node } : n));
    renderNodes();
  }
}

// ------------------------------------------------------------------ nodes and summary

function renderSummary(status) {
  const counts = {};
  for (const n of nodes) counts[n.health] = (counts[n.health] || 0) + 1;
  const schedulable = nodes.filter((n) => n.schedulable).length;
  const summary = document.getElementById("summary");
  summary.replaceChildren(
    el("b", {}, `${nodes.length} nodes`), " · ",
    Object.entries(counts).sort().map(([h, c]) => `${c} ${h}`).join(", ") || "none",
    " · ", el("b", {}, `${schedulable} schedulable`));
  if (!status) return;
  const coordinator = document.getElementById("coordinator");
  const parts = [`coordinator up ${ago(Date.now() / 1000 - status.uptime).replace(" ago", "")}`,
    `loop lag ${(status.loop_lag * 1000).toFixed(0)} ms`];
  coordinator.replaceChildren(parts.join(" · "));
  if (status.guard) coordinator.append(" · ", el("span", { class: "warn" }, "guard ON"));
  if (status.in_grace) coordinator.append(" · ", el("span", { class: "warn" }, "startup grace"));
  if (status.dry_run) coordinator.append(" · ", el("span", { class: "warn" }, "dry run"));
  if (status.status && status.status !== "ok") {
    coordinator.append(" · ", el("span", { class: "warn", title: (status.reasons || []).join("\n") },
      `${status.status}: ${(status.reasons || []).join("; ")}`));
  }
}

function actionButtons(node) {
  const cell = el("td", { class: "actions" });
  const add = (name, enabled) => cell.append(el("button", {
    type: "button", "data-action": name, ...(enabled ? {} : { disabled: "" }),
    onclick: () => command(name, node.node_id).catch((e) => say(String(e))),
  }, name));
  add("drain", node.admin === "active");
  add("undrain", node.admin === "drained");
  add("approve", node.admin === "review");
  return cell;
}

function renderNodes() {
  const body = document.querySelector("#nodes tbody");
  const rows = nodes.map((n) => {
    const load = n.load || {};
    const system = n.system || {};
    return el("tr", { "data-node": n.node_id },
      el("td", { class: "node" }, n.node_id),
      el("td", { class: "address" }, n.address),
      el("td", { class: "health" }, el("span", { class: `badge h-${n.health}` }, n.health)),
      el("td", { class: `status s-${n.node_status}` }, n.node_status),
      el("td", { class: `admin a-${n.admin}` }, n.admin),
      el("td", { class: `schedulable ${n.schedulable ? "yes" : "no"}` },
        n.schedulable ? "yes" : "no",
        // A gray failure: healthy, but ejected as an outlier (the figures are in the title).
        n.outlier ? el("span", { class: "outlier", title: n.outlier.reason },
          n.outlier.dry_run ? " outlier (dry run)" : " outlier") : ""),
      el("td", { class: "num" }, num(system.cpu_percent)),
      el("td", { class: "num" }, num(system.mem_percent)),
      el("td", { class: "num" }, num(load.qps)),
      el("td", { class: "num" }, num(load.pending_tasks, 0)),
      el("td", { class: "last-seen" }, ago(n.last_seen)),
      el("td", { class: "reasons" }, (n.reasons || []).join("; ")),
      actionButtons(n));
  });
  body.replaceChildren(...rows);
}

async function refreshNodes() {
  try {
    const [list, status] = await Promise.all([getJSON("/v1/nodes"), getHealth()]);
    nodes = list.nodes;
    renderNodes();
    renderSummary(status);
  } catch (error) {
    document.getElementById("summary").textContent = `coordinator unreachable (${error.message})`;
  }
}

// ------------------------------------------------------------------ charts

async function refreshHistory() {
  const now = Date.now() / 1000;
  for (const n of nodes) {
    const entry = history.get(n.node_id) || { samples: [], lastTs: 0 };
    const since = entry.lastTs ? entry.lastTs + 1e-6 : now - HOUR;
    try {
      const data = await getJSON(
        `/v1/nodes/${encodeURIComponent(n.node_id)}/history?since=${since.toFixed(6)}`);
      entry.samples.push(...data.samples);
    } catch (_) { continue; }
    entry.samples = entry.samples.filter((s) => s.ts >= now - HOUR);
    if (entry.samples.length) entry.lastTs = entry.samples[entry.samples.length - 1].ts;
    history.set(n.node_id, entry);
  }
  for (const id of [...history.keys()]) {
    if (!nodes.some((n) => n.node_id === id)) history.delete(id);
  }
  renderCharts(now);
}

function line(samples, pick, scale, start, width, cls) {
  const points = samples.map((s) => {
    const x = ((s.ts - start) / width) * 600;
    const y = 100 - Math.min(100, (pick(s) / scale) * 100);
    return `${x.toFixed(1)},${y.toFixed(1)}`;
  });
  return svg("polyline", { class: cls, points: points.join(" ") });
}

function spanText(seconds) {
  if (seconds >= HOUR - 1) return "(1 h)";
  return seconds >= 120 ? `(${(seconds / 60).toFixed(0)} min so far)` :
    `(${seconds.toFixed(0)} s so far)`;
}

function renderCharts(now) {
  // The x axis is the last hour, or the time since the first sample when that is shorter,
  // so a fresh cluster does not draw its first minute as a sliver at the right edge.
  let first = now;
  for (const entry of history.values()) {
    if (entry.samples.length) first = Math.min(first, entry.samples[0].ts);
  }
  const start = Math.max(now - HOUR, first);
  const width = Math.max(10, now - start);
  document.getElementById("span").textContent = spanText(width);
  const cards = nodes.map((n) => {
    const samples = (history.get(n.node_id) || { samples: [] }).samples;
    const qps = (s) => (s.load && s.load.qps) || 0;
    const qpsMax = Math.max(1, ...samples.map(qps));
    const chart = svg("svg", { viewBox: "0 0 600 100", preserveAspectRatio: "none",
      role: "img", "aria-label": `${n.node_id} cpu, memory and qps over the last hour` });
    for (const y of [25, 50, 75]) {
      chart.append(svg("line", { class: "grid", x1: 0, x2: 600, y1: y, y2: y }));
    }
    // Shade the time a node was not healthy, so an outage reads at a glance.
    for (let i = 0; i < samples.length; i += 1) {
      if (samples[i].health === "healthy") continue;
      const next = samples[i + 1] ? samples[i + 1].ts : now;
      const x = ((samples[i].ts - start) / width) * 600;
      const w = Math.max(0.5, ((next - samples[i].ts) / width) * 600);
      chart.append(svg("rect", { class: "outage", x, y: 0, width: w, height: 100 }));
    }
    // A hung or dead node sends no samples: shade from its last sample to now as well.
    if (n.health !== "healthy" && samples.length) {
      const x = ((samples[samples.length - 1].ts - start) / width) * 600;
      chart.append(svg("rect", { class: "outage", x, y: 0, width: Math.max(0.5, 600 - x),
        height: 100 }));
    }
    chart.append(line(samples, (s) => (s.system && s.system.cpu_percent) || 0, 100, start,
      width, "cpu"));
    chart.append(line(samples, (s) => (s.system && s.system.mem_percent) || 0, 100, start,
      width, "mem"));
    chart.append(line(samples, qps, qpsMax, start, width, "qps"));
    const last = samples[samples.length - 1];
    const label = last
      ? `cpu ${num(last.system.cpu_percent)} · mem ${num(last.system.mem_percent)} · ` +
        `qps ${num(qps(last))} (max ${num(qpsMax)})`
      : "no samples yet";
    return el("div", { class: "chart", "data-node": n.node_id },
      el("h3", {}, n.node_id, el("span", {}, label)), chart);
  });
  document.getElementById("charts").replaceChildren(...cards);
}

let historyTimer = null;
function soonHistory() {
  // An event means a chart is about to change colour: redraw within a second, at most once.
  if (historyTimer === null) {
    historyTimer = setTimeout(() => { historyTimer = null; refreshHistory(); }, 1000);
  }
}

// ------------------------------------------------------------------ events

function addEvent(event, prepend = true) {
  const list = document.getElementById("events");
  const change = event.from || event.to ? ` ${event.from || "-"} → ${event.to || "-"}` : "";
  const item = el("li", { "data-kind": event.kind },
    el("span", { class: "when" }, clock(event.ts)),
    el("span", { class: "node" }, event.node_id || "(cluster)"),
    el("span", { class: `kind k-${event.kind}` }, event.kind), change,
    event.reason ? el("span", { class: "reason" }, event.reason) : "");
  if (prepend) list.prepend(item); else list.append(item);
  while (list.children.length > MAX_EVENTS) list.lastElementChild.remove();
}

async function startEvents() {
  // Backlog first (newest on top), then the stream from the last id we saw.
  let after = "";
  let backlog = [];
  for (let page = 0; page < 50; page += 1) {
    const data = await getJSON(`/v1/events?limit=1000${after ? `&after=${after}` : ""}`);
    if (!data.events.length) { after = data.last_id || after; break; }
    backlog = backlog.concat(data.events).slice(-MAX_EVENTS);
    after = data.events[data.events.length - 1].id;
  }
  for (const event of backlog) addEvent(event);
  followStream(after);
}

// The stream names each SSE event by its kind, and kinds grow over time; reading the stream
// with fetch sees every one (EventSource would need a listener per known kind).
async function followStream(after) {
  const state = document.getElementById("stream-state");
  for (;;) {
    try {
      const response = await fetch(`/v1/events/stream${after ? `?after=${after}` : ""}`,
        { cache: "no-store" });
      if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
      state.textContent = "live"; state.classList.add("live");
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const data = block.split("\n").filter((l) => l.startsWith("data:"))
            .map((l) => l.slice(5).trimStart()).join("\n");
          if (!data) continue;
          let event;
          try { event = JSON.parse(data); } catch (_) { continue; }
          after = event.id;
          addEvent(event);
          refreshNodes();
          soonHistory();
        }
      }
    } catch (_) { /* the coordinator restarted or the network blinked: retry below */ }
    state.textContent = "reconnecting"; state.classList.remove("live");
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

refreshNodes().then(refreshHistory);
setInterval(refreshNodes, NODES_EVERY_MS);
setInterval(refreshHistory, HISTORY_EVERY_MS);
startEvents().catch((error) => say(`events: ${error.message}`));

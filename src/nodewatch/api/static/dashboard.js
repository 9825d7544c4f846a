// nodewatch dashboard for fleets: plain JS, no dependencies, no network beyond this coordinator.
// Reads /v1/summary (counts now and over the hour, attention), /v1/nodes?format=rows (the
// table's compact rows) in pages and then only ?changed_since= the last revision (on each
// event of /v1/events/stream, and every few seconds for routine load); for a node's page its
// full view /v1/nodes/{id}, /v1/nodes/{id}/history and /v1/events?node_id=. The first
// summary and rows are asked for by index.html before this script has loaded.
// The table is a virtual list: filters and sorts run on the cached rows, only the visible rows
// are drawn. drain/undrain/approve ask for the admin token on a 401 (kept in sessionStorage).
"use strict";

const TOKEN_KEY = "nodewatch.adminToken";
const HOUR = 3600;
// ?page=N (for tests) pages by N everywhere.
const PAGE_PARAM = Number(new URLSearchParams(location.search).get("page")) || 0;
const FIRST_PAGE = PAGE_PARAM || 500; // the first rows come fast; the rest in bigger pages
const PAGE = PAGE_PARAM || 2000; // pages keep each request short for the coordinator's loop
const CHANGES_PAGE = PAGE_PARAM || 1000;
const REORDER_EVERY_MS = 3000; // live changes re-sort a sorted or filtered table this often
const CHANGES_EVERY_MS = 2000;
const SUMMARY_EVERY_MS = 5000;
const NODE_HISTORY_EVERY_MS = 5000;
const CHANGES_AFTER_EVENT_MS = 250;
const MAX_EVENTS = 200;
const ROW_H = 30;
const HEALTHS = ["healthy", "suspect", "unhealthy", "dead", "unknown"];
const STACKS = {
  health: HEALTHS,
  node_status: ["ok", "degraded", "draining"],
  admin: ["active", "drained", "review"],
};
const COLUMNS = [
  { key: "node_id", label: "node", cls: "node" },
  { key: "address", label: "address", cls: "address" },
  { key: "health", label: "health", cls: "health" },
  { key: "node_status", label: "status", cls: "status" },
  { key: "admin", label: "admin", cls: "admin" },
  { key: "schedulable", label: "sched.", cls: "schedulable" },
  { key: "cpu", label: "cpu %", cls: "num cpu", num: true },
  { key: "mem", label: "mem %", cls: "num mem", num: true },
  { key: "load1", label: "load1", cls: "num load1", num: true },
  { key: "qps", label: "qps", cls: "num qps", num: true },
  { key: "err", label: "err %", cls: "num err", num: true },
  { key: "last_seen", label: "last seen", cls: "last-seen", num: true },
  { key: "labels", label: "labels", cls: "labels" },
  { key: "reasons", label: "reasons", cls: "reasons" },
];
const HEALTH_RANK = { unhealthy: 0, dead: 1, suspect: 2, unknown: 3, healthy: 4 };

const state = {
  rows: new Map(), // node_id -> the table's row of a node (rowFrom, viewRow)
  changedIds: new Set(), // changed since the heatmap last drew them
  membersChanged: false,
  orderedAt: 0,
  revision: "",
  loaded: false,
  summary: null,
  visible: [], // the filtered, sorted rows
  sortKey: "node_id",
  sortDir: 1,
  selected: -1,
  dirty: true,
  route: { name: "fleet" },
};
window.nodewatch = { state, timings: {} }; // for the tests and the bench

// ------------------------------------------------------------------ small helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined || child === "") continue;
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

function say(text, where = "message") {
  document.getElementById(where).textContent = text;
}

// index.html asked for the first answers while this script loaded: take each once.
function booted(path) {
  const boot = window.nodewatchBoot || {};
  for (const [key, asked] of Object.entries(boot)) {
    if (asked && asked.url === path) { boot[key] = null; return asked.answer; }
  }
  return null;
}

async function getJSON(path) {
  const response = await (booted(path) || fetch(path, { cache: "no-store" }));
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

function nodeLink(nodeId, text = nodeId) {
  return el("a", { href: `#/node/${encodeURIComponent(nodeId)}`, class: "node-link" }, text);
}

function labelText(labels) {
  return Object.entries(labels || {}).map(([k, v]) => `${k}=${v}`).join(" ");
}

// A changed node updates its row object in place, so the filtered, sorted list keeps showing
// fresh values without being rebuilt; a new node is added (and the list is rebuilt soon).
function merge(fresh) {
  const old = state.rows.get(fresh.node_id);
  if (old === undefined) {
    state.rows.set(fresh.node_id, fresh);
    state.membersChanged = true;
    return;
  }
  Object.assign(old, fresh);
  state.changedIds.add(fresh.node_id);
}

// Where each column is in the rows of one /v1/nodes?format=rows answer.
function columnsOf(data) {
  const at = {};
  data.columns.forEach((name, i) => { at[name] = i; });
  return at;
}

// A table row from a compact row; the numbers it is sorted and drawn by computed once per
// change of its node.
function rowFrom(r, at) {
  const err = r[at.error_rate];
  return prepare({
    node_id: r[at.node_id], address: r[at.address], health: r[at.health],
    node_status: r[at.node_status], admin: r[at.admin], schedulable: r[at.schedulable],
    last_seen: r[at.last_seen], labels: r[at.labels] || {}, reasons: r[at.reasons] || [],
    attention: r[at.attention] || [],
    _cpu: r[at.cpu_percent] ?? undefined, _mem: r[at.mem_percent] ?? undefined,
    _load1: r[at.load1] ?? undefined, _qps: r[at.qps] ?? undefined,
    _err: typeof err === "number" ? err * 100 : undefined,
  });
}

// The same row from a node's full view (a command's answer, a node's page): the attention
// reasons as the coordinator gives them (api/fleet.py attention_reasons).
function viewRow(v) {
  const system = v.system || {};
  const load = v.load || {};
  const attention = [];
  if (v.health === "suspect" || v.health === "unhealthy") attention.push(v.health);
  if (v.outlier) attention.push("outlier");
  if (v.admin === "review") attention.push("review");
  if (v.drain && !v.drain.complete) attention.push("drain waiting");
  return prepare({
    node_id: v.node_id, address: v.address, health: v.health, node_status: v.node_status,
    admin: v.admin, schedulable: v.schedulable, last_seen: v.last_seen, labels: v.labels || {},
    reasons: v.reasons || [], attention,
    _cpu: system.cpu_percent, _mem: system.mem_percent, _load1: system.load1, _qps: load.qps,
    _err: typeof load.error_rate === "number" ? load.error_rate * 100 : undefined,
  });
}

function prepare(n) {
  n.outlier = n.attention.includes("outlier");
  n._attention = n.attention.length > 0;
  n._labels = labelText(n.labels);
  n._reasons = n.reasons.join("; ");
  n._text = `${n.node_id} ${n.address} ${n._labels} ${n._reasons} ${n.health} ${n.node_status} ` +
    `${n.admin}`.toLowerCase();
  return n;
}

// ------------------------------------------------------------------ operator commands

async function send(method, path, body, token) {
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  return fetch(path, { method, headers, body: body ? JSON.stringify(body) : undefined });
}

async function command(name, nodeId, where = "message") {
  const path = `/v1/nodes/${encodeURIComponent(nodeId)}/${name}`;
  const body = name === "drain" ? { reason: "from the dashboard" } : null;
  let token = sessionStorage.getItem(TOKEN_KEY) || "";
  let response = await send("POST", path, body, token);
  if (response.status === 401) {
    token = window.prompt("Admin token (NODEWATCH_ADMIN_TOKEN):") || "";
    if (!token) { say(`${name} ${nodeId}: needs the admin token`, where); return; }
    response = await send("POST", path, body, token);
    if (response.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      say(`${name} ${nodeId}: wrong admin token`, where);
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
  }
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
    say(`${name} ${nodeId}: ${message}`, where);
    return;
  }
  say("", where);
  const result = await response.json();
  if (result.node) {
    merge(viewRow(result.node));
    state.dirty = true;
    scheduleRender();
    if (state.route.name === "node" && state.route.id === nodeId) {
      Object.assign(nodeDetail, { id: nodeId, view: result.node });
      renderNodeFacts();
    }
  }
}

function actionButtons(node, where) {
  const buttons = [];
  const add = (name, enabled) => buttons.push(el("button", {
    type: "button", "data-action": name, ...(enabled ? {} : { disabled: "" }),
    onclick: () => command(name, node.node_id, where).catch((e) => say(String(e), where)),
  }, name));
  add("drain", node.admin === "active");
  add("undrain", node.admin === "drained");
  add("approve", node.admin === "review");
  return buttons;
}

// ------------------------------------------------------------------ loading nodes

async function loadAllNodes() {
  // Page through the list in node_id order; the first page's revision is where the changes
  // start from (anything that changes while we page is in the next changes).
  const rows = new Map();
  let cursor = "";
  let revision = "";
  let size = FIRST_PAGE;
  for (;;) {
    const data = await getJSON(`/v1/nodes?format=rows&limit=${size}${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`);
    if (!revision) revision = data.revision;
    const at = columnsOf(data);
    for (const r of data.rows) { const n = rowFrom(r, at); rows.set(n.node_id, n); }
    if (!state.loaded) {
      // The first page is on screen at once; the rest is appended as it arrives.
      for (const [id, n] of rows) state.rows.set(id, n);
      state.dirty = true;
      renderNow();
      firstView("rows");
    }
    if (!data.next_cursor) break;
    cursor = data.next_cursor;
    size = PAGE;
  }
  state.rows = rows;
  state.revision = revision;
  state.loaded = true;
  state.dirty = true;
  renderNow();
  window.nodewatch.timings.allRows = performance.now();
}

let changesBusy = false;
let changesAgain = false;
async function fetchChanges() {
  if (!state.loaded) return;
  if (changesBusy) { changesAgain = true; return; }
  changesBusy = true;
  try {
    let cursor = "";
    const since = state.revision;
    let next = "";
    let changed = 0;
    for (;;) {
      const data = await getJSON(`/v1/nodes?format=rows&changed_since=${encodeURIComponent(since)}` +
        `&limit=${CHANGES_PAGE}${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`);
      if (data.reset) { await loadAllNodes(); return; }
      if (!next) next = data.revision;
      const at = columnsOf(data);
      for (const r of data.rows) {
        const n = rowFrom(r, at);
        merge(n);
        if (state.route.name === "node" && n.node_id === state.route.id) soonNodeDetail();
      }
      for (const id of data.removed) {
        if (state.rows.delete(id)) state.membersChanged = true;
        if (state.route.name === "node" && id === state.route.id) soonNodeDetail();
      }
      changed += data.rows.length + data.removed.length;
      if (!data.next_cursor) break;
      cursor = data.next_cursor;
    }
    state.revision = next;
    if (changed) {
      // The row objects changed in place; the list itself is rebuilt when nodes came or went,
      // or (a sorted or filtered list) at most every REORDER_EVERY_MS.
      if (state.membersChanged || !unordered()) state.stale = true;
      scheduleRender();
    }
    document.getElementById("summary").classList.remove("stale");
  } catch (error) {
    document.getElementById("summary").classList.add("stale");
    say(`coordinator unreachable (${error.message})`);
  } finally {
    changesBusy = false;
    if (changesAgain) { changesAgain = false; setTimeout(fetchChanges, CHANGES_AFTER_EVENT_MS); }
  }
}

let changesTimer = null;
function soonChanges() {
  if (changesTimer === null) {
    changesTimer = setTimeout(() => { changesTimer = null; fetchChanges(); },
      CHANGES_AFTER_EVENT_MS);
  }
}

// ------------------------------------------------------------------ fleet summary

let historyTs = 0;
const fleetHistory = [];
async function refreshSummary() {
  try {
    const summary = await getJSON(`/v1/summary${historyTs ? `?history_since=${historyTs}` : ""}`);
    for (const sample of summary.history) fleetHistory.push(sample);
    if (fleetHistory.length) historyTs = fleetHistory[fleetHistory.length - 1].ts;
    const cut = Date.now() / 1000 - HOUR;
    while (fleetHistory.length && fleetHistory[0].ts < cut) fleetHistory.shift();
    state.summary = summary;
    renderSummary(summary, summary.coordinator);
    renderTiles(summary);
    renderStack();
    renderAttention(summary);
    fillLabelChoices(summary);
    firstView("summary");
  } catch (error) {
    document.getElementById("summary").textContent = `coordinator unreachable (${error.message})`;
  }
}

function renderSummary(summary, status) {
  const counts = Object.entries(summary.health).filter(([, c]) => c > 0)
    .map(([h, c]) => `${c} ${h}`).join(", ") || "none";
  document.getElementById("summary").replaceChildren(
    el("b", {}, `${summary.total} nodes`), " · ", counts, " · ",
    el("b", {}, `${summary.schedulable} schedulable`));
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

function renderTiles(summary) {
  const tile = (group, key, count, filter) => el("button", {
    type: "button", class: `tile t-${key}${count ? "" : " zero"}`, "data-count": key,
    title: filter ? `show ${key} nodes in the table` : key,
    onclick: () => { if (filter) setHealthFilter(filter); },
  }, el("span", { class: "count" }, count), el("span", { class: "what" }, `${key}`),
  el("span", { class: "group" }, group));
  const tiles = [
    tile("nodes", "total", summary.total, ""),
    tile("nodes", "schedulable", summary.schedulable, ""),
    tile("nodes", "attention", summary.attention, "attention"),
    ...HEALTHS.map((h) => tile("health", h, summary.health[h] || 0, h)),
    ...STACKS.node_status.slice(1).map((s) => tile("status", s, summary.node_status[s] || 0, "")),
    ...STACKS.admin.slice(1).map((a) => tile("admin", a, summary.admin[a] || 0, "")),
  ];
  document.getElementById("tiles").replaceChildren(...tiles);
}

function renderStack() {
  const by = document.getElementById("stack-by").value;
  const keys = STACKS[by];
  const now = Date.now() / 1000;
  const points = fleetHistory.slice();
  if (state.summary) points.push({ ts: now, ...state.summary });
  const host = document.getElementById("stack");
  if (!points.length) { host.replaceChildren(); return; }
  const start = Math.max(now - HOUR, points[0].ts);
  const width = Math.max(10, now - start);
  document.getElementById("stack-span").textContent = spanText(width);
  const top = Math.max(1, ...points.map((p) => p.total));
  const chart = svg("svg", { viewBox: "0 0 600 120", preserveAspectRatio: "none" });
  const x = (ts) => (((ts - start) / width) * 600).toFixed(1);
  const y = (v) => (120 - (v / top) * 118).toFixed(1);
  let below = points.map(() => 0);
  for (const key of keys) {
    const above = points.map((p, i) => below[i] + ((p[by] || {})[key] || 0));
    if (above.some((v, i) => v !== below[i])) {
      const upper = points.map((p, i) => `${x(p.ts)},${y(above[i])}`);
      const lower = points.map((p, i) => `${x(p.ts)},${y(below[i])}`).reverse();
      chart.append(svg("polygon", { class: `area k-${key}`, "data-key": key,
        points: upper.concat(lower).join(" ") }));
    }
    below = above;
  }
  host.replaceChildren(chart);
  document.getElementById("stack-legend").replaceChildren(...keys.map((key) => el("span", {},
    el("i", { class: `k-${key}` }), `${key} ${((state.summary || {})[by] || {})[key] || 0}`)));
}

function spanText(seconds) {
  if (seconds >= HOUR - 1) return "(1 h)";
  return seconds >= 120 ? `(${(seconds / 60).toFixed(0)} min so far)` :
    `(${seconds.toFixed(0)} s so far)`;
}

let attentionKey = "";
function renderAttention(summary) {
  document.getElementById("attention-count").textContent =
    summary.attention ? `(${summary.attention})` : "(none)";
  // Redrawn only when it changed (ages aside): the list can hold 200 nodes.
  const key = JSON.stringify([summary.attention, summary.attention_nodes.map((a) => [a.node_id, a.why, a.reasons])]);
  if (key === attentionKey) return;
  attentionKey = key;
  const items = summary.attention_nodes.map((a) => el("li", { "data-node": a.node_id },
    nodeLink(a.node_id), " ",
    ...a.why.map((w) => el("span", { class: `badge w-${w.replace(" ", "-")}` }, w)), " ",
    el("span", { class: "dim" }, `${ago(a.since)}${a.reasons.length ? " · " : ""}${a.reasons.join("; ")}`)));
  if (summary.attention > summary.attention_nodes.length) {
    items.push(el("li", { class: "dim" }, el("button", { type: "button",
      onclick: () => setHealthFilter("attention") },
    `… ${summary.attention - summary.attention_nodes.length} more: show them in the table`)));
  }
  document.getElementById("attention").replaceChildren(...items);
}

function fillLabelChoices(summary) {
  const group = document.getElementById("heat-group");
  const filter = document.getElementById("filter-label");
  const keys = Object.keys(summary.labels);
  const haveKeys = [...group.options].map((o) => o.value).slice(1).join("\n");
  if (haveKeys !== keys.join("\n")) {
    const chosen = group.value;
    group.replaceChildren(el("option", { value: "" }, "(no label)"),
      ...keys.map((k) => el("option", { value: k }, k)));
    // By default the label with the fewest values (zone rather than rack or host).
    const fewest = keys.slice().sort((a, b) =>
      Object.keys(summary.labels[a]).length - Object.keys(summary.labels[b]).length)[0];
    group.value = keys.includes(chosen) ? chosen : (fewest || "");
    state.heatDirty = true;
  }
  const pairs = keys.flatMap((k) => Object.keys(summary.labels[k]).map((v) => `${k}=${v}`));
  const havePairs = [...filter.options].map((o) => o.value).slice(1).join("\n");
  if (havePairs !== pairs.join("\n")) {
    const chosen = filter.value;
    filter.replaceChildren(el("option", { value: "" }, "any"),
      ...pairs.map((p) => el("option", { value: p }, p)));
    if (chosen && !pairs.includes(chosen)) filter.append(el("option", { value: chosen }, chosen));
    filter.value = chosen;
  }
}

// ------------------------------------------------------------------ heatmap

const HEAT = {
  cpu_percent: { pick: (n) => n._cpu, max: () => 100, fmt: (v) => `${num(v)} %` },
  mem_percent: { pick: (n) => n._mem, max: () => 100, fmt: (v) => `${num(v)} %` },
  error_rate: { pick: (n) => n._err, max: () => 5, fmt: (v) => `${num(v, 2)} % errors` },
  load1: { pick: (n) => n._load1, max: (rows) => fleetMax(rows, (n) => n._load1), fmt: (v) => num(v, 2) },
  qps: { pick: (n) => n._qps, max: (rows) => fleetMax(rows, (n) => n._qps), fmt: (v) => `${num(v)} qps` },
};

function fleetMax(rows, pick) {
  let top = 0;
  for (const n of rows) { const v = pick(n); if (typeof v === "number" && v > top) top = v; }
  return top || 1;
}

function heatColour(fraction) {
  // green (0) -> yellow (0.5) -> red (1)
  const f = Math.max(0, Math.min(1, fraction));
  const hue = 120 - 120 * f;
  return `hsl(${hue.toFixed(0)}, 70%, ${(38 + 10 * (1 - Math.abs(f - 0.5) * 2)).toFixed(0)}%)`;
}

const CELL = 9;
const GAP = 1;
const heat = { layout: null }; // node_id -> {ctx, x, y}, the metric, its top

function drawCell(ctx, n, x, y, metric, top) {
  const v = metric.pick(n);
  if (n.health === "unhealthy" || n.health === "dead") ctx.fillStyle = "#6e1b1b";
  else if (typeof v !== "number") ctx.fillStyle = "#333c47";
  else ctx.fillStyle = heatColour(v / top);
  ctx.clearRect(x, y, CELL, CELL);
  ctx.fillRect(x, y, CELL, CELL);
  if (n._attention) {
    ctx.strokeStyle = "#e3b341"; ctx.lineWidth = 1.5;
    ctx.strokeRect(x + 0.75, y + 0.75, CELL - 1.5, CELL - 1.5);
  }
}

function scaleMoved() {
  const top = heat.layout.metric.max([...state.rows.values()]);
  return Math.abs(top - heat.layout.top) > 0.2 * heat.layout.top;
}

function drawChangedCells() {
  const { cells, metric, top } = heat.layout;
  for (const id of state.changedIds) {
    const cell = cells.get(id);
    const n = state.rows.get(id);
    if (cell && n) drawCell(cell.ctx, n, cell.x, cell.y, metric, top);
  }
  state.changedIds.clear();
}

function renderHeatmap() {
  const metricName = document.getElementById("heat-metric").value;
  const metric = HEAT[metricName];
  const key = document.getElementById("heat-group").value;
  const rows = [...state.rows.values()];
  const top = metric.max(rows);
  document.getElementById("heat-scale").textContent =
    `green 0 → red ${metric.fmt(top)}; dark red: unhealthy or dead; outlined: needs attention`;
  const groups = new Map();
  for (const n of rows) {
    const value = key ? ((n.labels || {})[key] ?? "(none)") : "all nodes";
    if (!groups.has(value)) groups.set(value, []);
    groups.get(value).push(n);
  }
  const host = document.getElementById("heatmap");
  const width = Math.max(200, host.clientWidth - 10);
  const perRow = Math.max(1, Math.floor(width / (CELL + GAP)));
  const cells = new Map();
  const blocks = [];
  for (const [value, members] of [...groups.entries()].sort((a, b) => String(a[0]).localeCompare(String(b[0])))) {
    members.sort((a, b) => (a.node_id < b.node_id ? -1 : 1));
    const lines = Math.ceil(members.length / perRow);
    const canvas = el("canvas", { width: perRow * (CELL + GAP), height: lines * (CELL + GAP),
      "data-group": value, role: "img",
      "aria-label": `${metricName} of ${members.length} nodes with ${key ? `${key}=${value}` : "any label"}` });
    const ctx = canvas.getContext("2d");
    members.forEach((n, i) => {
      const x = (i % perRow) * (CELL + GAP);
      const y = Math.floor(i / perRow) * (CELL + GAP);
      cells.set(n.node_id, { ctx, x, y });
      drawCell(ctx, n, x, y, metric, top);
    });
    const pick = (event) => {
      const box = canvas.getBoundingClientRect();
      const col = Math.floor((event.clientX - box.left) / (CELL + GAP));
      const line = Math.floor((event.clientY - box.top) / (CELL + GAP));
      return col < perRow ? members[line * perRow + col] : undefined;
    };
    canvas.addEventListener("mousemove", (event) => {
      const n = pick(event);
      canvas.title = n ? `${n.node_id} · ${n.health} · ${metric.fmt(metric.pick(n))}` : "";
    });
    canvas.addEventListener("click", (event) => {
      const n = pick(event);
      if (n) location.hash = `#/node/${encodeURIComponent(n.node_id)}`;
    });
    const bad = members.filter((n) => n.health !== "healthy").length;
    const heading = key
      ? el("button", { type: "button", class: "group-filter", title: `filter the table by ${key}=${value}`,
        onclick: () => setLabelFilter(`${key}=${value}`) }, `${key}=${value}`)
      : el("span", {}, value);
    blocks.push(el("div", { class: "heat-group", "data-group": value },
      el("div", { class: "heat-head" }, heading,
        el("span", { class: "dim" }, ` ${members.length} nodes${bad ? ` · ${bad} not healthy` : ""}`)),
      canvas));
  }
  host.replaceChildren(...blocks);
  heat.layout = { cells, metric, top };
}

// ------------------------------------------------------------------ filter, sort, table

function filters() {
  return {
    text: document.getElementById("search").value.trim().toLowerCase(),
    health: document.getElementById("filter-health").value,
    label: document.getElementById("filter-label").value,
  };
}

function matches(n, f) {
  if (f.health) {
    if (f.health === "attention") { if (!n._attention) return false; }
    else if (f.health === "unschedulable") { if (n.schedulable) return false; }
    else if (n.health !== f.health) return false;
  }
  if (f.label) {
    const cut = f.label.indexOf("=");
    if ((n.labels || {})[f.label.slice(0, cut)] !== f.label.slice(cut + 1)) return false;
  }
  if (f.text) {
    for (const word of f.text.split(/\s+/)) if (!n._text.includes(word)) return false;
  }
  return true;
}

function sortValue(n, key) {
  switch (key) {
    case "health": return HEALTH_RANK[n.health] ?? 9;
    case "schedulable": return n.schedulable ? 1 : 0;
    case "cpu": return n._cpu ?? -1;
    case "mem": return n._mem ?? -1;
    case "load1": return n._load1 ?? -1;
    case "qps": return n._qps ?? -1;
    case "err": return n._err ?? -1;
    case "last_seen": return n.last_seen || 0;
    case "labels": return n._labels;
    case "reasons": return n._reasons;
    default: return n[key] ?? "";
  }
}

let byId = { size: -1, rows: null, list: [] };
function rowsById() {
  // The rows in node_id order, sorted again only when nodes came or went.
  if (byId.rows !== state.rows || byId.size !== state.rows.size || state.membersChanged) {
    const list = [...state.rows.values()];
    list.sort((a, b) => (a.node_id < b.node_id ? -1 : a.node_id > b.node_id ? 1 : 0));
    byId = { size: state.rows.size, rows: state.rows, list };
  }
  return byId.list;
}

function refilter() {
  const t0 = performance.now();
  const f = filters();
  const all = rowsById();
  const out = f.text || f.health || f.label ? all.filter((n) => matches(n, f)) : all.slice();
  const key = state.sortKey;
  const dir = state.sortDir;
  if (key !== "node_id") {
    // Decorated once, so that the comparison reads no fields; node_id order breaks ties.
    const keyed = out.map((n, i) => [sortValue(n, key), i, n]);
    keyed.sort((a, b) => (a[0] < b[0] ? -dir : a[0] > b[0] ? dir : a[1] - b[1]));
    state.visible = keyed.map((k) => k[2]);
  } else {
    state.visible = dir > 0 ? out : out.reverse();
  }
  state.dirty = false;
  state.stale = false;
  state.membersChanged = false;
  state.orderedAt = performance.now();
  window.nodewatch.timings.filterMs = performance.now() - t0;
  const total = state.rows.size;
  document.getElementById("table-count").textContent = out.length === total
    ? `(${total}${state.loaded ? "" : " loading…"})` : `(${out.length} of ${total} shown)`;
}

function renderHead() {
  const head = document.getElementById("sort-head");
  head.replaceChildren(...COLUMNS.map((c) => {
    const active = c.key === state.sortKey;
    return el("th", { class: c.num ? "num" : "", scope: "col",
      "aria-sort": active ? (state.sortDir > 0 ? "ascending" : "descending") : "none" },
    el("button", { type: "button", class: "sort", "data-sort": c.key,
      title: `sort by ${c.label}`, onclick: () => sortBy(c.key) },
    c.label, active ? (state.sortDir > 0 ? " ▲" : " ▼") : ""));
  }), el("th", { scope: "col" }, "actions"));
}

function sortBy(key) {
  if (state.sortKey === key) state.sortDir = -state.sortDir;
  else { state.sortKey = key; state.sortDir = COLUMNS.find((c) => c.key === key).num ? -1 : 1; }
  renderHead();
  state.dirty = true;
  renderNow();
}

function row(n, index) {
  return el("tr", { "data-node": n.node_id, class: `row${index === state.selected ? " selected" : ""}`,
    "data-index": index },
  el("td", { class: "node" }, nodeLink(n.node_id)),
  el("td", { class: "address", title: n.address }, n.address),
  el("td", { class: "health" }, el("span", { class: `badge h-${n.health}` }, n.health),
    n.outlier ? el("span", { class: "badge w-outlier" }, "outlier") : ""),
  el("td", { class: `status s-${n.node_status}` }, n.node_status),
  el("td", { class: `admin a-${n.admin}` }, n.admin),
  el("td", { class: `schedulable ${n.schedulable ? "yes" : "no"}` }, n.schedulable ? "yes" : "no"),
  el("td", { class: "num cpu" }, num(n._cpu)),
  el("td", { class: "num mem" }, num(n._mem)),
  el("td", { class: "num load1" }, num(n._load1, 2)),
  el("td", { class: "num qps" }, num(n._qps)),
  el("td", { class: "num err" }, num(n._err, 2)),
  el("td", { class: "last-seen" }, ago(n.last_seen)),
  el("td", { class: "labels", title: n._labels }, n._labels),
  el("td", { class: "reasons", title: n._reasons }, n._reasons),
  el("td", { class: "actions" }, ...actionButtons(n, "message")));
}

// The rows of state.visible on screen (and a few around): [first, last).
function rowWindow() {
  const scroller = document.getElementById("table-scroll");
  const headH = document.querySelector("#nodes thead").offsetHeight || ROW_H;
  const first = Math.max(0, Math.floor((scroller.scrollTop - headH) / ROW_H) - 5);
  const count = Math.ceil(scroller.clientHeight / ROW_H) + 10;
  return [first, Math.min(state.visible.length, first + count)];
}

// What the table shows now, so that live changes replace only the drawn rows that changed
// (a screenful is redrawn when the list or the scroll window moved).
const drawnRows = { visible: null, window: "", ids: new Set() };

function sameRowsDrawn() {
  const [first, last] = rowWindow();
  return drawnRows.visible === state.visible && drawnRows.window === `${first}-${last}`;
}

function patchRows() {
  const body = document.querySelector("#nodes tbody");
  for (const id of state.changedIds) {
    if (!drawnRows.ids.has(id)) continue;
    const tr = body.querySelector(`tr[data-node="${CSS.escape(id)}"]`);
    const n = state.rows.get(id);
    if (!tr || !n) { renderRows(); return; }
    tr.replaceWith(row(n, Number(tr.dataset.index)));
  }
}

// "last seen" ages in the drawn rows, without drawing them again.
function refreshAges() {
  for (const tr of document.querySelectorAll("#nodes tbody tr.row")) {
    const n = state.rows.get(tr.dataset.node);
    const cell = tr.querySelector("td.last-seen");
    if (n && cell) cell.textContent = ago(n.last_seen);
  }
}

function renderRows() {
  const body = document.querySelector("#nodes tbody");
  const rows = state.visible;
  const [first, last] = rowWindow();
  Object.assign(drawnRows, { visible: rows, window: `${first}-${last}`,
    ids: new Set(rows.slice(first, last).map((n) => n.node_id)) });
  const drawn = [];
  if (first > 0) drawn.push(el("tr", { class: "spacer", style: `height:${first * ROW_H}px` }));
  for (let i = first; i < last; i += 1) drawn.push(row(rows[i], i));
  if (last < rows.length) {
    drawn.push(el("tr", { class: "spacer", style: `height:${(rows.length - last) * ROW_H}px` }));
  }
  if (!rows.length) {
    drawn.push(el("tr", { class: "empty" }, el("td", { colspan: COLUMNS.length + 1 },
      state.rows.size ? "no node matches the filters" : "no nodes yet")));
  }
  body.replaceChildren(...drawn);
}

let renderQueued = false;
function scheduleRender() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => { renderQueued = false; renderNow(); });
}

// Sorted by node id with no filter, live changes never move or hide a row.
function unordered() {
  const f = filters();
  return state.sortKey === "node_id" && !f.text && !f.health && !f.label;
}

let heatAt = 0;
function renderNow() {
  if (state.route.name !== "fleet") return;
  const now = performance.now();
  if (state.dirty || (state.stale && (state.membersChanged || now - state.orderedAt > REORDER_EVERY_MS))) {
    refilter();
  } else if (state.stale) {
    setTimeout(scheduleRender, REORDER_EVERY_MS);
  }
  if (sameRowsDrawn()) patchRows(); else renderRows();
  // The heatmap is laid out again when nodes came or went, its choices changed, or (a scale
  // relative to the fleet: load1, qps) its top moved by a fifth; otherwise only the cells of
  // changed nodes are drawn.
  if (state.heatDirty || !heat.layout || state.heatMembers !== state.rows.size ||
      (state.changedIds.size && now - heatAt > 5000 && scaleMoved())) {
    state.heatMembers = state.rows.size;
    state.heatDirty = false;
    heatAt = now;
    renderHeatmap();
    state.changedIds.clear();
  } else if (state.changedIds.size) {
    drawChangedCells();
  }
}

function applyFilters() {
  const t0 = performance.now();
  state.dirty = true;
  state.selected = -1;
  document.getElementById("table-scroll").scrollTop = 0;
  renderNow();
  window.nodewatch.timings.applyMs = performance.now() - t0;
  const f = filters();
  const params = new URLSearchParams();
  if (f.text) params.set("q", f.text);
  if (f.health) params.set("health", f.health);
  if (f.label) params.set("label", f.label);
  const query = params.toString();
  history.replaceState(null, "", `#/${query ? `?${query}` : ""}`);
}

function setHealthFilter(value) {
  document.getElementById("filter-health").value = value;
  applyFilters();
  document.getElementById("nodes-title").scrollIntoView({ block: "start" });
}

function setLabelFilter(value) {
  const select = document.getElementById("filter-label");
  if (![...select.options].some((o) => o.value === value)) {
    select.append(el("option", { value }, value));
  }
  select.value = value;
  applyFilters();
  document.getElementById("nodes-title").scrollIntoView({ block: "start" });
}

function select(index) {
  const rows = state.visible;
  if (!rows.length) return;
  state.selected = Math.max(0, Math.min(rows.length - 1, index));
  const scroller = document.getElementById("table-scroll");
  const headH = document.querySelector("#nodes thead").offsetHeight || ROW_H;
  const y = headH + state.selected * ROW_H;
  if (y < scroller.scrollTop + headH) scroller.scrollTop = y - headH;
  else if (y + ROW_H > scroller.scrollTop + scroller.clientHeight) {
    scroller.scrollTop = y + ROW_H - scroller.clientHeight;
  }
  renderRows();
}

// ------------------------------------------------------------------ one node's page

let nodeTimer = null;
const nodeHistory = { id: "", samples: [], lastTs: 0 };
// The open node's full view (GET /v1/nodes/{id}): the table's rows hold only what it shows.
const nodeDetail = { id: "", view: null, missing: false };

async function loadNodeDetail() {
  const id = state.route.id;
  try {
    const response = await fetch(`/v1/nodes/${encodeURIComponent(id)}`, { cache: "no-store" });
    if (state.route.name !== "node" || state.route.id !== id) return;
    if (response.status === 404) {
      Object.assign(nodeDetail, { id, view: null, missing: true });
    } else if (!response.ok) {
      throw new Error(`HTTP ${response.status}`);
    } else {
      Object.assign(nodeDetail, { id, view: await response.json(), missing: false });
    }
    renderNodeFacts();
  } catch (error) { say(`${id}: ${error.message}`, "node-message"); }
}

let detailTimer = null;
function soonNodeDetail() {
  if (detailTimer === null) {
    detailTimer = setTimeout(() => { detailTimer = null; loadNodeDetail(); }, CHANGES_AFTER_EVENT_MS);
  }
}

function renderNodeFacts() {
  const id = state.route.id;
  document.getElementById("node-title").textContent = id;
  const facts = document.getElementById("node-facts");
  const view = nodeDetail.id === id ? nodeDetail.view : null;
  if (!view) {
    facts.replaceChildren(el("p", {}, nodeDetail.id === id && nodeDetail.missing
      ? "unknown node" : "loading…"));
    document.getElementById("node-actions").replaceChildren();
    return;
  }
  const n = { ...view, ...viewRow(view), outlier: view.outlier };
  const drain = n.drain
    ? `${n.drain.complete ? "complete" : "waiting"} · ${n.drain.reason || "no reason"}` +
      (n.drain.waiting_for ? ` · waits for ${Object.entries(n.drain.waiting_for)
        .map(([k, v]) => `${k} = ${v ?? "?"}`).join(", ")}` : "") +
      ` · deadline ${clock(n.drain.deadline)}`
    : "";
  const identity = n.identity
    ? [n.identity.enrolled ? "enrolled" : "not enrolled",
      n.identity.pending_claim ? `pending claim from ${n.identity.pending_claim}` : "",
      n.identity.revoked ? "revoked" : ""].filter(Boolean).join(" · ")
    : "";
  const pairs = [
    ["health", el("span", { class: `badge h-${n.health}` }, n.health), `since ${ago(n.since)}`],
    ["status", el("span", { class: `s-${n.node_status}` }, n.node_status)],
    ["admin", el("span", { class: `a-${n.admin}` }, n.admin)],
    ["schedulable", el("span", { class: n.schedulable ? "yes" : "no" }, n.schedulable ? "yes" : "no")],
    ["outlier", n.outlier ? "yes" : "no"],
    ["address", n.address],
    ["labels", n._labels || "-"],
    ["reasons", n._reasons || "-"],
    ["last seen", ago(n.last_seen)],
    ["failures in a row", String(n.consecutive_failures)],
    ["incarnation / seq", `${n.incarnation} / ${n.seq}`],
    ["version", n.version || "-"],
    ["drain", drain || "-"],
    ["identity", identity || "-"],
    ["cpu / mem", `${num(n._cpu)} % / ${num(n._mem)} %`],
    ["load", Object.entries(n.load || {}).map(([k, v]) => `${k} ${num(v, 3)}`).join(" · ") || "-"],
  ];
  facts.replaceChildren(el("dl", {}, ...pairs.flatMap(([k, ...v]) => [
    el("dt", {}, k), el("dd", { "data-fact": k.replace(/[^a-z]+/g, "-") }, ...v.flatMap((x) => [x, " "]))])));
  document.getElementById("node-actions").replaceChildren(...actionButtons(n, "node-message"));
}

const NODE_CHARTS = [
  { key: "cpu", label: "cpu %", pick: (s) => s.system && s.system.cpu_percent, max: 100 },
  { key: "mem", label: "mem %", pick: (s) => s.system && s.system.mem_percent, max: 100 },
  { key: "load1", label: "load1", pick: (s) => s.system && s.system.load1 },
  { key: "qps", label: "qps", pick: (s) => s.load && s.load.qps },
  { key: "error_rate", label: "error rate %", pick: (s) => s.load && typeof s.load.error_rate === "number" ? s.load.error_rate * 100 : undefined },
  { key: "pending", label: "pending tasks", pick: (s) => s.load && s.load.pending_tasks },
];

async function refreshNodeHistory() {
  const id = state.route.id;
  if (nodeHistory.id !== id) Object.assign(nodeHistory, { id, samples: [], lastTs: 0 });
  const now = Date.now() / 1000;
  const since = nodeHistory.lastTs ? nodeHistory.lastTs + 1e-6 : now - HOUR;
  try {
    const data = await getJSON(`/v1/nodes/${encodeURIComponent(id)}/history?since=${since.toFixed(6)}`);
    if (nodeHistory.id !== id) return;
    nodeHistory.samples.push(...data.samples);
  } catch (error) { say(String(error.message), "node-message"); return; }
  nodeHistory.samples = nodeHistory.samples.filter((s) => s.ts >= now - HOUR);
  if (nodeHistory.samples.length) nodeHistory.lastTs = nodeHistory.samples[nodeHistory.samples.length - 1].ts;
  renderNodeCharts(now);
}

function renderNodeCharts(now) {
  const samples = nodeHistory.samples;
  const n = state.rows.get(nodeHistory.id);
  const start = samples.length ? Math.max(now - HOUR, samples[0].ts) : now - HOUR;
  const width = Math.max(10, now - start);
  document.getElementById("node-span").textContent = spanText(width);
  const cards = NODE_CHARTS.map((c) => {
    const values = samples.map((s) => c.pick(s)).filter((v) => typeof v === "number");
    const top = c.max || Math.max(1e-9, ...values);
    const chart = svg("svg", { viewBox: "0 0 600 100", preserveAspectRatio: "none", role: "img",
      "aria-label": `${nodeHistory.id} ${c.label} over the last hour` });
    for (const y of [25, 50, 75]) chart.append(svg("line", { class: "grid", x1: 0, x2: 600, y1: y, y2: y }));
    // Shade the time the node was not healthy, so an outage reads at a glance.
    for (let i = 0; i < samples.length; i += 1) {
      if (samples[i].health === "healthy") continue;
      const next = samples[i + 1] ? samples[i + 1].ts : now;
      const x = ((samples[i].ts - start) / width) * 600;
      chart.append(svg("rect", { class: "outage", x, y: 0,
        width: Math.max(0.5, ((next - samples[i].ts) / width) * 600), height: 100 }));
    }
    // A hung or dead node sends no samples: shade from its last sample to now as well.
    if (n && n.health !== "healthy" && samples.length) {
      const x = ((samples[samples.length - 1].ts - start) / width) * 600;
      chart.append(svg("rect", { class: "outage", x, y: 0, width: Math.max(0.5, 600 - x), height: 100 }));
    }
    const points = [];
    for (const s of samples) {
      const v = c.pick(s);
      if (typeof v !== "number") continue;
      points.push(`${(((s.ts - start) / width) * 600).toFixed(1)},${(100 - Math.min(100, (v / top) * 100)).toFixed(1)}`);
    }
    chart.append(svg("polyline", { class: `line ${c.key}`, points: points.join(" ") }));
    const last = values[values.length - 1];
    return el("div", { class: "chart", "data-node": nodeHistory.id, "data-metric": c.key },
      el("h3", {}, c.label, el("span", {}, values.length
        ? `now ${num(last, 2)} · max ${num(Math.max(...values), 2)}` : "no samples yet")), chart);
  });
  document.getElementById("node-charts").replaceChildren(...cards);
}

async function loadNodeEvents() {
  const id = state.route.id;
  try {
    const data = await getJSON(`/v1/events?newest=true&limit=200&node_id=${encodeURIComponent(id)}`);
    if (state.route.id !== id) return;
    const list = document.getElementById("node-events");
    list.replaceChildren(...data.events.reverse().map((e) => eventItem(e, true)));
  } catch (error) { say(String(error.message), "node-message"); }
}

function evidenceBlock(evidence) {
  const entries = Object.entries(evidence || {});
  if (!entries.length) return "";
  const rows = entries.map(([k, v]) => el("div", { class: "ev" }, el("b", {}, k), " ",
    typeof v === "object" ? JSON.stringify(v, null, 1) : String(v)));
  return el("details", { class: "evidence" }, el("summary", {}, "evidence"), ...rows);
}

// ------------------------------------------------------------------ events

function eventItem(event, withEvidence = false) {
  const change = event.from || event.to ? ` ${event.from || "-"} → ${event.to || "-"}` : "";
  return el("li", { "data-kind": event.kind, "data-node": event.node_id || "" },
    el("span", { class: "when" }, clock(event.ts)),
    event.node_id ? nodeLink(event.node_id) : el("span", { class: "node" }, "(cluster)"), " ",
    el("span", { class: `kind k-${event.kind}` }, event.kind), change,
    event.reason ? el("span", { class: "reason" }, event.reason) : "",
    withEvidence ? evidenceBlock(event.evidence) : "");
}

function addEvent(event) {
  const list = document.getElementById("events");
  list.prepend(eventItem(event));
  while (list.children.length > MAX_EVENTS) list.lastElementChild.remove();
  if (state.route.name === "node" && event.node_id === state.route.id) {
    document.getElementById("node-events").prepend(eventItem(event, true));
  }
}

async function startEvents() {
  // The newest events first (from the coordinator's memory), then the stream after them.
  const data = await getJSON(`/v1/events?newest=true&limit=${MAX_EVENTS}`);
  for (const event of data.events) addEvent(event);
  followStream(data.last_id || "");
}

// The stream names each SSE event by its kind, and kinds grow over time; reading the stream
// with fetch sees every one (EventSource would need a listener per known kind).
async function followStream(after) {
  const stateEl = document.getElementById("stream-state");
  for (;;) {
    try {
      const response = await fetch(`/v1/events/stream${after ? `?after=${after}` : ""}`,
        { cache: "no-store" });
      if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
      stateEl.textContent = "live"; stateEl.classList.add("live");
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
          soonChanges();
        }
      }
    } catch (_) { /* the coordinator restarted or the network blinked: retry below */ }
    stateEl.textContent = "reconnecting"; stateEl.classList.remove("live");
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

// ------------------------------------------------------------------ routes and keys

function route() {
  const hash = location.hash || "#/";
  const match = hash.match(/^#\/node\/(.+)$/);
  clearInterval(nodeTimer);
  nodeTimer = null;
  if (match) {
    state.route = { name: "node", id: decodeURIComponent(match[1]) };
    document.getElementById("fleet-view").hidden = true;
    document.getElementById("node-view").hidden = false;
    document.title = `${state.route.id} · nodewatch`;
    if (nodeDetail.id !== state.route.id) Object.assign(nodeDetail, { id: "", view: null, missing: false });
    renderNodeFacts();
    loadNodeDetail();
    document.getElementById("node-charts").replaceChildren();
    document.getElementById("node-events").replaceChildren();
    refreshNodeHistory();
    loadNodeEvents();
    nodeTimer = setInterval(refreshNodeHistory, NODE_HISTORY_EVERY_MS);
    window.scrollTo(0, 0);
    return;
  }
  state.route = { name: "fleet" };
  document.getElementById("fleet-view").hidden = false;
  document.getElementById("node-view").hidden = true;
  document.title = "nodewatch";
  const query = new URLSearchParams(hash.split("?")[1] || "");
  document.getElementById("search").value = query.get("q") || "";
  document.getElementById("filter-health").value = query.get("health") || "";
  if (query.get("label")) setLabelFilter(query.get("label"));
  state.dirty = true;
  state.heatDirty = true;
  renderNow();
}

function typing(target) {
  return target && (target.tagName === "INPUT" || target.tagName === "SELECT" ||
    target.tagName === "TEXTAREA" || target.isContentEditable);
}

function toggleHelp(show) {
  const help = document.getElementById("help");
  help.hidden = show === undefined ? !help.hidden : !show;
  document.getElementById("help-button").setAttribute("aria-expanded", String(!help.hidden));
}

document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const search = document.getElementById("search");
  if (event.key === "Escape") {
    if (event.target === search && search.value) { search.value = ""; applyFilters(); return; }
    if (typing(event.target)) { event.target.blur(); return; }
    if (!document.getElementById("help").hidden) { toggleHelp(false); return; }
    if (state.route.name === "node") { location.hash = "#/"; return; }
    return;
  }
  if (typing(event.target)) return;
  if (event.key === "/") { event.preventDefault(); if (state.route.name !== "fleet") location.hash = "#/"; search.focus(); search.select(); return; }
  if (event.key === "?") { toggleHelp(); return; }
  if (event.key === "g") { location.hash = "#/"; return; }
  if (state.route.name !== "fleet") return;
  if (event.key === "j") { select(state.selected + 1); event.preventDefault(); }
  else if (event.key === "k") { select(state.selected - 1); event.preventDefault(); }
  else if (event.key === "a") setHealthFilter("attention");
  else if (event.key === "Enter" && state.selected >= 0 && event.target.tagName !== "BUTTON" &&
    event.target.tagName !== "A") {
    const n = state.visible[state.selected];
    if (n) location.hash = `#/node/${encodeURIComponent(n.node_id)}`;
  }
});

let firstSeen = new Set();
function firstView(part) {
  if (!window.nodewatch.timings[part]) window.nodewatch.timings[part] = performance.now();
  firstSeen.add(part);
  if (firstSeen.has("summary") && firstSeen.has("rows") && !window.nodewatch.timings.firstView) {
    window.nodewatch.timings.firstView = performance.now();
    document.body.dataset.ready = "1";
    firstSeen = new Set(["summary", "rows"]);
    startEventsOnce();
  }
}

// The timeline (200 events with their evidence, then the stream) is read once the first view
// is drawn, so that it does not compete with it; at the latest after a few seconds.
let eventsStarted = false;
function startEventsOnce() {
  if (eventsStarted) return;
  eventsStarted = true;
  startEvents().catch((error) => say(`events: ${error.message}`));
}

function start() {
  window.nodewatch.timings.script = performance.now();
  renderHead();
  document.getElementById("search").addEventListener("input", applyFilters);
  document.getElementById("filter-health").addEventListener("change", applyFilters);
  document.getElementById("filter-label").addEventListener("change", applyFilters);
  document.getElementById("clear-filters").addEventListener("click", () => {
    document.getElementById("search").value = "";
    document.getElementById("filter-health").value = "";
    document.getElementById("filter-label").value = "";
    applyFilters();
  });
  document.getElementById("table-scroll").addEventListener("scroll", () => {
    if (!renderQueued) { renderQueued = true; requestAnimationFrame(() => { renderQueued = false; renderRows(); }); }
  });
  document.getElementById("table-scroll").addEventListener("keydown", (event) => {
    if (event.key === "ArrowDown") { select(state.selected + 1); event.preventDefault(); }
    else if (event.key === "ArrowUp") { select(state.selected - 1); event.preventDefault(); }
  });
  document.getElementById("stack-by").addEventListener("change", renderStack);
  document.getElementById("heat-metric").addEventListener("change", () => { state.heatDirty = true; renderNow(); });
  document.getElementById("heat-group").addEventListener("change", () => { state.heatDirty = true; renderNow(); });
  document.getElementById("help-button").addEventListener("click", () => toggleHelp());
  window.addEventListener("hashchange", route);
  window.addEventListener("resize", () => { state.heatDirty = true; scheduleRender(); });
  route();
  refreshSummary();
  loadAllNodes().catch((error) => say(`nodes: ${error.message}`));
  setInterval(fetchChanges, CHANGES_EVERY_MS);
  setInterval(refreshSummary, SUMMARY_EVERY_MS);
  // "last seen" ages in the visible rows, once a few seconds, without refiltering.
  setInterval(() => { if (state.route.name === "fleet") refreshAges(); }, 5000);
  setTimeout(startEventsOnce, 3000);
}

start();

// The live dashboard: reads /api/v1/events (server-sent events, one state per second) with
// fetch so that a bearer token can be sent when the server asks for one; renders with
// textContent only (names come from certificates: never inserted as HTML).
"use strict";

const previous = new Map();   // peer id -> {t, sent, received}: throughput from deltas

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}

function rate(bps) { return bps === null ? "–" : (bps * 8 / 1e6).toFixed(2) + " Mbit/s"; }

function since(iso) {
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return Math.round(s) + " s";
  if (s < 3600) return Math.round(s / 60) + " min";
  return (s / 3600).toFixed(1) + " h";
}

function rows(tbody, items, render, empty) {
  tbody.replaceChildren();
  if (!items.length) {
    const tr = el("tr"); const td = el("td", "muted", empty);
    td.colSpan = tbody.parentElement.querySelectorAll("th").length;
    tr.append(td); tbody.append(tr); return;
  }
  for (const item of items) tbody.append(render(item));
}

function renderServices(services) {
  rows(document.querySelector("#services tbody"), services, (s) => {
    const tr = el("tr"); tr.dataset.service = s.service;
    tr.append(el("td", "service-name", s.service));
    const cons = el("td");
    if (!s.connectors.length) cons.append(el("span", "pill bad", "no Connector"));
    for (const c of s.connectors) {
      const div = el("div", "entry connector"); div.dataset.connectorId = c.id;
      div.append(el("span", "pill health " + (c.healthy ? "ok" : "bad"), c.healthy ? "healthy" : "unhealthy"));
      if (c.draining) div.append(el("span", "pill warn", "draining"));
      div.append(el("span", "", c.identity + " "), el("span", "muted", "#" + c.id + " · " + c.address +
        " · " + c.flows + (c.flows === 1 ? " flow" : " flows")));
      cons.append(div);
    }
    const agents = el("td");
    if (!s.agents.length) agents.append(el("span", "muted", "none"));
    for (const a of s.agents) {
      const div = el("div", "entry agent"); div.dataset.agentId = a.id;
      div.append(el("span", "pill path", a.path), el("span", "", a.identity + " "));
      if (a.warmup_ms !== null) div.append(el("span", "muted", "warm-up " + Math.round(a.warmup_ms) + " ms"));
      agents.append(div);
    }
    tr.append(cons, agents);
    return tr;
  }, "no services registered");
}

function renderConnections(conns, takenAt) {
  const t = Date.parse(takenAt) / 1000;
  const seen = new Set();
  rows(document.querySelector("#connections tbody"), conns, (c) => {
    seen.add(c.peer);
    const before = previous.get(c.peer);
    let down = null, up = null;
    if (before && t > before.t) {
      down = (c.bytes_sent - before.sent) / (t - before.t);
      up = (c.bytes_received - before.received) / (t - before.t);
    }
    previous.set(c.peer, {t, sent: c.bytes_sent, received: c.bytes_received});
    const tr = el("tr"); tr.dataset.peer = c.peer;
    const who = el("td"); who.append(el("div", "", c.identity), el("code", "muted", c.sans.join(", ")));
    const path = el("td"); if (c.path) path.append(el("span", "pill path", c.path));
    // A connection without registrations: e.g. the one a P2P socket keeps for its own address.
    const role = c.role === "none" ? el("td", "muted", "no registrations") : el("td", "", c.role);
    tr.append(who, role, el("td", "", c.services.join(", ") || "–"), path,
      el("td", "", c.rtt_ms === null ? "–" : c.rtt_ms.toFixed(1) + " ms"),
      el("td", "", rate(down) + " / " + rate(up)),
      el("td", "", bytes(c.bytes_sent) + " / " + bytes(c.bytes_received)),
      el("td", "muted", since(c.connected_since)));
    return tr;
  }, "no connections");
  for (const peer of [...previous.keys()]) if (!seen.has(peer)) previous.delete(peer);
}

function renderHistogram(id, h) {
  const box = document.getElementById(id);
  box.replaceChildren();
  const bars = el("div", "hist");
  const labels = el("div", "hist-labels");
  const max = Math.max(1, ...h.buckets.map((b) => b.count));
  for (const b of h.buckets) {
    const bar = el("div", "bar"); bar.style.height = (100 * b.count / max) + "%";
    bar.title = (b.le_ms === null ? "more" : "≤ " + b.le_ms + " ms") + ": " + b.count;
    bars.append(bar);
    labels.append(el("span", "", b.le_ms === null ? "∞" : String(b.le_ms)));
  }
  const summary = el("div", "hist-summary", h.count
    ? h.count + " samples · p50 ≤ " + (h.p50_ms ?? "∞") + " ms · p95 ≤ " + (h.p95_ms ?? "∞") + " ms"
    : "no samples yet");
  box.append(bars, labels, summary);
}

function renderFlows(flows) {
  rows(document.querySelector("#flows tbody"), flows, (f) => {
    const tr = el("tr");
    const state = el("td"); state.append(el("span", "pill " + (f.state === "open" ? "ok" : "warn"), f.state));
    tr.append(el("td", "", f.service), el("td", "", f.destination), el("td", "", "#" + f.agent),
      el("td", "", f.connector === null ? "–" : "#" + f.connector), state,
      el("td", "", bytes(f.bytes_up) + " / " + bytes(f.bytes_down)), el("td", "muted", since(f.started) + " ago"));
    return tr;
  }, "no relayed flows yet");
}

function render(state) {
  renderServices(state.services);
  renderConnections(state.connections, state.taken_at);
  renderHistogram("hist-handshake", state.histograms.handshake);
  renderHistogram("hist-warmup", state.histograms.warmup);
  renderFlows(state.flows);
  document.getElementById("updated").textContent = "updated " + new Date(state.taken_at).toLocaleTimeString();
}

function setLive(on, text) {
  const live = document.getElementById("live");
  live.className = "pill " + (on ? "on" : "off");
  live.textContent = text;
}

async function stream() {
  const token = sessionStorage.getItem("ztna-admin-token");
  const headers = token ? {Authorization: "Bearer " + token} : {};
  const response = await fetch("/api/v1/events", {headers, cache: "no-store"});
  if (response.status === 401) {
    document.getElementById("login").hidden = false;
    document.getElementById("login-error").textContent = token ? "wrong token" : "";
    setLive(false, "token required");
    return false;
  }
  if (!response.ok) throw new Error("HTTP " + response.status);
  document.getElementById("login").hidden = true;
  setLive(true, "live");
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end); buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data) render(JSON.parse(data));
    }
  }
  return true;
}

async function run() {
  for (;;) {
    let again = true;
    try { again = await stream(); } catch (err) { /* server gone: retry below */ }
    if (!again) return;
    setLive(false, "reconnecting…");
    await new Promise((r) => setTimeout(r, 2000));
  }
}

document.getElementById("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem("ztna-admin-token", document.getElementById("token").value);
  run();
});
run();

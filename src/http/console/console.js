// The cqrsd operator's console. Plain JavaScript with no build step and no
// dependency: every figure comes from the daemon's own guarded API, called
// with the token the operator typed (kept in sessionStorage, so for this tab
// only). Nothing here is loaded from another origin; the page's
// Content-Security-Policy would refuse it anyway.
"use strict";

const TOKEN_KEY = "cqrsd-console-token";
const NEEDS_TOKEN = document.querySelector('meta[name="cqrsd-auth"]').content === "token";
// How often each panel samples the API, and how much history the charts keep.
const PROJECTION_EVERY_MS = 1000;
const NODE_EVERY_MS = 2000;
const CHART_SAMPLES = 150;
const TAIL_ROWS = 500;

const $ = (selector) => document.querySelector(selector);

// Builds an element; children are nodes or text (never parsed as HTML, so
// event data cannot inject markup).
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

// ---- talking to the API ----

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function authHeaders(extra) {
  const headers = Object.assign({}, extra || {});
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (NEEDS_TOKEN && token) headers.Authorization = "Bearer " + token;
  return headers;
}

// Turns a failed response into an ApiError carrying the problem's detail.
async function failure(method, path, response) {
  let detail = response.statusText;
  try {
    const problem = await response.json();
    detail = problem.detail || problem.title || detail;
  } catch (_) {
    // Not a problem document: the status line is all there is to say.
  }
  if (response.status === 401 && NEEDS_TOKEN) showLogin(detail);
  return new ApiError(response.status, `${method} ${path}: ${response.status} ${detail}`);
}

async function api(method, path, options) {
  const opts = options || {};
  let response;
  try {
    response = await fetch(path, { method, headers: authHeaders(opts.headers), signal: opts.signal });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, `${method} ${path}: ${error.message}`);
  }
  if (!response.ok && !(opts.accept || []).includes(response.status)) {
    throw await failure(method, path, response);
  }
  return response;
}

const getJson = async (path, options) => (await api("GET", path, options)).json();

// Errors are shown per source until that source succeeds again: a failing
// poll is visible for as long as it fails, and never piles up duplicates.
const errors = new Map();
function report(source, error) {
  if (error) errors.set(source, error.message || String(error));
  else errors.delete(source);
  $("#errors").replaceChildren(...[...errors.values()].map((text) => el("p", {}, text)));
}

// ---- login ----

function showLogin(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  stopAll();
  $("#app").hidden = true;
  $("#tabs").hidden = true;
  $("#logout").hidden = true;
  $("#login").hidden = false;
  $("#login-error").textContent = message || "";
  $("#login-token").focus();
}

$("#login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("#login-token").value.trim());
  $("#login-token").value = "";
  start();
});

$("#logout").addEventListener("click", () => showLogin(""));

// ---- tabs ----

function showTab() {
  const name = (location.hash || "#projections").slice(1);
  for (const section of document.querySelectorAll(".tab")) section.hidden = section.id !== name;
  for (const link of document.querySelectorAll("#tabs a")) link.classList.toggle("active", link.dataset.tab === name);
}
window.addEventListener("hashchange", showTab);

// ---- projections ----

// The last sample of each projection's total of events, to derive events/s.
const projectionSamples = new Map();

// The total lag, then each partition's as a small chip: `topic:partition`
// with the records behind, and the next offset in its tooltip.
function lagCell(partitions) {
  const total = partitions.reduce((sum, p) => sum + p.lag, 0);
  return el("div", {},
    el("strong", { class: "total-lag" }, String(total)),
    el("ul", { class: "partitions" },
      ...partitions.map((p) => el("li", { "data-partition": `${p.topic}:${p.partition}`, title: `next offset ${p.position}`, class: p.lag > 0 ? "behind" : "" },
        `${p.topic}:${p.partition} `,
        el("span", { class: "lag" }, String(p.lag))))));
}

function eventsPerSecond(p, now) {
  const previous = projectionSamples.get(p.name);
  projectionSamples.set(p.name, { at: now, total: p.events_total });
  if (!previous || now <= previous.at) return p.events_per_sec;
  return Math.max(0, (p.events_total - previous.total) * 1000 / (now - previous.at));
}

function quarantineCell(p) {
  if (p.quarantine_count === 0) return el("span", { class: "muted" }, "0");
  return el("details", { class: "quarantine" },
    el("summary", {}, `${p.quarantine_count} event${p.quarantine_count === 1 ? "" : "s"}`),
    el("ul", {}, ...p.quarantined.map((q) =>
      el("li", {}, `${q.position} #${q.index}: ${q.reason}`))));
}

function rebuildCell(p) {
  const button = el("button", { type: "button", class: "rebuild", "data-projection": p.name }, "Rebuild");
  button.disabled = p.state === "rebuilding" || p.rebuild !== null;
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      await api("POST", `/admin/projections/${encodeURIComponent(p.name)}/rebuild`);
      report("rebuild", null);
    } catch (error) {
      report("rebuild", error);
    }
    pollProjections();
  });
  const progress = p.rebuild
    ? el("span", { class: "progress" }, ` ${p.rebuild.events} events applied`)
    : null;
  return el("span", {}, button, progress);
}

async function pollProjections() {
  try {
    const report_ = await getJson("/admin/projections");
    const now = Date.now();
    const rows = report_.projections.map((p) => el("tr", { "data-projection": p.name },
      el("td", { class: "name" }, p.name),
      el("td", { class: "kind" }, p.kind),
      el("td", { class: `state state-${p.state}` }, p.state, p.error ? el("div", { class: "error" }, p.error) : null),
      el("td", { class: "generation" }, String(p.generation)),
      el("td", {}, lagCell(p.partitions)),
      el("td", { class: "rate" }, eventsPerSecond(p, now).toFixed(1)),
      el("td", {}, quarantineCell(p)),
      el("td", {}, rebuildCell(p))));
    $("#projection-table tbody").replaceChildren(...rows);
    report("projections", null);
  } catch (error) {
    report("projections", error);
  }
}

// ---- one aggregate ----

// The aggregate types, read from the OpenAPI document, which has one
// `/aggregates/<type>/{id}` path per type the domain declares.
async function loadAggregateTypes() {
  const document_ = await getJson("/openapi.json");
  const types = [];
  for (const path of Object.keys(document_.paths || {})) {
    const match = /^\/aggregates\/([^/{}]+)\/\{id\}$/.exec(path);
    if (match) types.push(match[1]);
  }
  types.sort();
  $("#aggregate-type").replaceChildren(...types.map((t) => el("option", { value: t }, t)));
  $("#tail-filter").replaceChildren(el("option", { value: "" }, "every aggregate type"),
    ...types.map((t) => el("option", { value: t }, t)));
  return document_;
}

// The first version of each page seen so far and the page shown, so
// "previous" goes back without the API having to page backwards.
let historyPages = { type: "", id: "", firsts: [1], shown: 0 };

async function showAggregate(fromVersion) {
  const { type, id } = historyPages;
  const limit = Number($("#aggregate-page-size").value) || 20;
  const base = `/aggregates/${encodeURIComponent(type)}/${encodeURIComponent(id)}`;
  try {
    const [aggregate, events] = await Promise.all([
      getJson(base),
      getJson(`${base}/events?from_version=${fromVersion}&limit=${limit}`),
    ]);
    $("#aggregate-version").textContent = String(aggregate.version);
    $("#aggregate-state").textContent = JSON.stringify(aggregate.state, null, 2);
    $("#history-table tbody").replaceChildren(...events.events.map((e) => el("tr", { "data-version": String(e.version) },
      el("td", {}, String(e.version)),
      el("td", { class: "type" }, e.type),
      el("td", {}, e.timestamp),
      el("td", {}, el("pre", {}, JSON.stringify(e.data))),
      el("td", {}, e.command),
      el("td", {}, e.principal || ""))));
    const page = historyPages.firsts.indexOf(fromVersion);
    historyPages.shown = page;
    $("#history-page").textContent = `page ${page + 1}`;
    $("#history-prev").disabled = page <= 0;
    $("#history-next").disabled = events.next_from_version === null;
    $("#history-next").dataset.from = String(events.next_from_version);
    $("#aggregate-result").hidden = false;
    report("aggregate", null);
  } catch (error) {
    $("#aggregate-result").hidden = true;
    report("aggregate", error);
  }
}

$("#aggregate-form").addEventListener("submit", (event) => {
  event.preventDefault();
  historyPages = { type: $("#aggregate-type").value, id: $("#aggregate-id").value.trim(), firsts: [1], shown: 0 };
  showAggregate(1);
});
$("#history-next").addEventListener("click", () => {
  const from = Number($("#history-next").dataset.from);
  historyPages.firsts = historyPages.firsts.slice(0, historyPages.shown + 1);
  historyPages.firsts.push(from);
  showAggregate(from);
});
$("#history-prev").addEventListener("click", () => {
  showAggregate(historyPages.firsts[Math.max(0, historyPages.shown - 1)]);
});

// ---- live tail ----

// EventSource cannot send an Authorization header, so the stream is read
// with fetch and parsed here. `lastId` is the cursor of the last message
// shown: resuming sends it as Last-Event-ID, and the daemon continues right
// after that event, so a pause loses and repeats nothing.
const tail = { controller: null, lastId: null, filter: "" };

function setTailStatus(text) {
  $("#tail-status").textContent = text;
  $("#tail-toggle").textContent = tail.controller ? "Pause" : (tail.lastId ? "Resume" : "Start");
}

function showStreamed(message) {
  const e = JSON.parse(message.data);
  const row = el("tr", { "data-aggregate": e.aggregate, "data-id": e.id, "data-version": String(e.version), "data-received-at": String(Date.now()) },
    el("td", {}, new Date().toISOString().slice(11, 23)),
    el("td", {}, e.aggregate),
    el("td", { class: "id" }, e.id),
    el("td", {}, String(e.version)),
    el("td", { class: "type" }, e.type),
    el("td", {}, el("pre", {}, JSON.stringify(e.data))),
    el("td", {}, e.position));
  const body = $("#tail-table tbody");
  body.prepend(row);
  while (body.rows.length > TAIL_ROWS) body.deleteRow(body.rows.length - 1);
}

async function runTail() {
  const controller = new AbortController();
  tail.controller = controller;
  setTailStatus("connecting");
  const query = tail.filter ? `?aggregate=${encodeURIComponent(tail.filter)}` : "";
  const headers = { Accept: "text/event-stream" };
  if (tail.lastId) headers["Last-Event-ID"] = tail.lastId;
  try {
    const response = await api("GET", `/events/stream${query}`, { headers, signal: controller.signal });
    setTailStatus("live");
    report("tail", null);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) throw new Error("the daemon closed the stream");
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const message = { id: null, data: [] };
        for (const line of block.split("\n")) {
          if (line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "id") message.id = text;
          else if (field === "data") message.data.push(text);
        }
        if (message.data.length === 0) continue;
        showStreamed({ data: message.data.join("\n") });
        if (message.id) tail.lastId = message.id;
      }
    }
  } catch (error) {
    if (tail.controller === controller) tail.controller = null;
    if (error.name === "AbortError") return;
    report("tail", error instanceof ApiError ? error : new Error(`live tail: ${error.message}`));
    setTailStatus("stopped by an error");
  }
}

function pauseTail() {
  if (!tail.controller) return;
  const controller = tail.controller;
  tail.controller = null;
  controller.abort();
  setTailStatus("paused");
}

$("#tail-toggle").addEventListener("click", () => {
  if (tail.controller) pauseTail();
  else runTail();
});
$("#tail-clear").addEventListener("click", () => $("#tail-table tbody").replaceChildren());
$("#tail-filter").addEventListener("change", () => {
  // A cursor names the partitions of one filter; another filter starts anew.
  const running = tail.controller !== null;
  pauseTail();
  tail.filter = $("#tail-filter").value;
  tail.lastId = null;
  if (running) runTail();
  else setTailStatus("stopped");
});

// ---- the node ----

// Each chart's samples: [time in ms, value].
const series = { commands: [], lookups: [], lag: [] };
let lastCounters = null;
const LOOKUP_ROUTE = /^\/(aggregates|views|aggregations|search)\//;

// Sums the samples of one metric in the Prometheus text format, keeping
// those whose labels pass `keep`.
function sumMetric(text, name, keep) {
  let total = 0;
  for (const line of text.split("\n")) {
    if (!line.startsWith(name)) continue;
    const rest = line.slice(name.length);
    if (rest[0] !== "{" && rest[0] !== " ") continue;
    let labels = "";
    let value = rest;
    if (rest[0] === "{") {
      const close = rest.lastIndexOf("}");
      labels = rest.slice(1, close);
      value = rest.slice(close + 1);
    }
    if (keep && !keep(labels)) continue;
    const number = Number(value.trim().split(" ")[0]);
    if (Number.isFinite(number)) total += number;
  }
  return total;
}

function routeOf(labels) {
  const match = /route="([^"]*)"/.exec(labels);
  return match ? match[1] : "";
}

function push(name, at, value) {
  const samples = series[name];
  samples.push([at, value]);
  while (samples.length > CHART_SAMPLES) samples.shift();
  drawChart(name);
}

// Draws one chart as an inline SVG line over the samples kept.
function drawChart(name) {
  const samples = series[name];
  const figure = $(`#chart-${name}`);
  const last = samples.length ? samples[samples.length - 1][1] : 0;
  figure.querySelector(".value").textContent = last.toFixed(name === "lag" ? 0 : 1);
  figure.dataset.samples = String(samples.length);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  const width = 320, height = 90;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  const axis = document.createElementNS(ns, "line");
  for (const [k, v] of Object.entries({ x1: 0, y1: height - 1, x2: width, y2: height - 1 })) axis.setAttribute(k, v);
  svg.append(axis);
  if (samples.length > 1) {
    const first = samples[0][0];
    const span = Math.max(1, samples[samples.length - 1][0] - first);
    const top = Math.max(1, ...samples.map((s) => s[1]));
    const points = samples.map(([at, v]) =>
      `${((at - first) / span * width).toFixed(1)},${(height - 2 - v / top * (height - 16)).toFixed(1)}`);
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", points.join(" "));
    svg.append(line);
    const scale = document.createElementNS(ns, "text");
    scale.setAttribute("x", "2");
    scale.setAttribute("y", "10");
    scale.textContent = `max ${top.toFixed(name === "lag" ? 0 : 1)}`;
    svg.append(scale);
  }
  figure.querySelector(".span").textContent = samples.length > 1
    ? `last ${Math.round((samples[samples.length - 1][0] - samples[0][0]) / 1000)} s` : "";
  const old = figure.querySelector("svg");
  if (old) old.replaceWith(svg);
  else figure.append(svg);
}

async function pollReadiness() {
  try {
    // 503 (not ready) is an answer, not a failure: its body lists the components.
    const response = await api("GET", "/readyz", { accept: [503] });
    const body = await response.json();
    const components = body.components || {};
    $("#node-status").textContent = response.ok ? "ready" : "not ready";
    $("#node-status").className = `ready-${response.ok}`;
    $("#component-table tbody").replaceChildren(...Object.entries(components).map(([name, c]) => {
      const ready = typeof c === "object" && c !== null ? c.ready : c;
      const detail = typeof c === "object" && c !== null ? (c.detail || c.reason || c.message || "") : "";
      return el("tr", { "data-component": name },
        el("td", {}, name),
        el("td", { class: `ready-${ready}` }, String(ready)),
        el("td", {}, typeof detail === "string" ? detail : JSON.stringify(detail)));
    }));
    // Node roles are reported by newer daemons only; show one when present.
    if (typeof body.role === "string") $("#role").textContent = `role: ${body.role}`;
    report("readyz", null);
  } catch (error) {
    report("readyz", error);
  }
}

async function pollMetrics() {
  try {
    const text = await (await api("GET", "/metrics")).text();
    const at = Date.now();
    const counters = {
      at,
      commands: sumMetric(text, "cqrsd_commands_total"),
      lookups: sumMetric(text, "cqrsd_http_requests_total", (labels) => LOOKUP_ROUTE.test(routeOf(labels))),
    };
    if (lastCounters && at > lastCounters.at) {
      const seconds = (at - lastCounters.at) / 1000;
      push("commands", at, Math.max(0, counters.commands - lastCounters.commands) / seconds);
      push("lookups", at, Math.max(0, counters.lookups - lastCounters.lookups) / seconds);
    }
    lastCounters = counters;
    push("lag", at, sumMetric(text, "cqrsd_projection_lag"));
    report("metrics", null);
  } catch (error) {
    report("metrics", error);
  }
}

// ---- starting and stopping ----

const timers = [];

function every(ms, poll) {
  poll();
  timers.push(setInterval(poll, ms));
}

function stopAll() {
  while (timers.length) clearInterval(timers.pop());
  pauseTail();
}

async function start() {
  $("#login").hidden = true;
  try {
    const document_ = await loadAggregateTypes();
    // A daemon with node roles describes /admin/node; older ones do not.
    if (document_.paths && document_.paths["/admin/node"]) {
      getJson("/admin/node").then((node) => {
        if (node && typeof node.role === "string") $("#role").textContent = `role: ${node.role}`;
      }).catch((error) => report("node", error));
    }
    report("start", null);
  } catch (error) {
    report("start", error);
    if (error.status === 401) return;
  }
  $("#app").hidden = false;
  $("#tabs").hidden = false;
  $("#logout").hidden = !NEEDS_TOKEN;
  showTab();
  stopAll();
  every(PROJECTION_EVERY_MS, pollProjections);
  every(NODE_EVERY_MS, () => { pollReadiness(); pollMetrics(); });
}

if (NEEDS_TOKEN && !sessionStorage.getItem(TOKEN_KEY)) showLogin("");
else start();

// The finstream console: plain JavaScript over the API's REST endpoints and WebSocket.
// Auth: in FINSTREAM_ENV=dev, config.json carries a development token; otherwise a
// bearer token pasted into the login form (kept in sessionStorage for this tab).
"use strict";

const state = {
  token: null, user: null, roles: [], config: null, ws: null,
  symbol: null, quotes: new Map(), rules: [], levels: [],
  chart: null, series: null, bar: null, journeyId: null,
};
const $ = (sel) => document.querySelector(sel);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return node;
}

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${state.token}`, ...(options.headers || {}) };
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, { ...options, headers, body: options.body === undefined ? undefined : JSON.stringify(options.body) });
  if (resp.status === 401) { signOut("Your token was refused; sign in again."); throw new Error("unauthorized"); }
  const text = await resp.text();
  const data = text ? JSON.parse(text) : null;
  if (!resp.ok) throw new Error((data && data.detail) || `${resp.status} ${resp.statusText}`);
  return data;
}

function claims(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part + "=".repeat((4 - part.length % 4) % 4)));
  } catch (e) { return {}; }
}

function signOut(message) {
  sessionStorage.removeItem("finstream.token");
  if (state.ws) state.ws.close();
  $("#app").hidden = true;
  $("#login").hidden = false;
  $("#login-error").textContent = message || "";
}

async function start() {
  state.config = await (await fetch("config.json")).json();
  const links = $("#links");
  for (const [name, url] of Object.entries(state.config.links || {})) {
    links.append(el("a", { href: url, target: "_blank", rel: "noopener" }, name));
  }
  $("#login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem("finstream.token", $("#login-token").value.trim());
    boot().catch((e) => signOut(e.message));
  });
  const token = sessionStorage.getItem("finstream.token") || state.config.dev_token;
  if (!token) { signOut(); return; }
  sessionStorage.setItem("finstream.token", token);
  await boot();
}

async function boot() {
  state.token = sessionStorage.getItem("finstream.token");
  const c = claims(state.token);
  state.user = c.sub;
  const roles = c[state.config.roles_claim || "roles"] || [];
  state.roles = Array.isArray(roles) ? roles : String(roles).split(/[ ,]/);
  $("#who").textContent = `${state.user} (${state.roles.join(", ")})`;
  $("#login").hidden = true;
  $("#app").hidden = false;
  const operator = state.roles.includes("operator");
  $("#journeys-card").hidden = !operator;
  $("#status-card").hidden = !operator;
  const symbols = state.config.symbols;
  const select = $("#rule-symbol");
  select.replaceChildren(...symbols.map((s) => el("option", { value: s }, s)));
  for (const s of symbols) quoteRow(s);
  setupChart();
  await selectSymbol(symbols[0]);
  $("#scheduled-user").value = state.user;
  $("#scheduled-user").readOnly = !operator;  // a user sees their own; operators anyone's
  await Promise.all([loadRules(), loadInbox(), loadScheduled()]);
  connect();
  if (operator) {
    $("#journey-user").value = state.user;
    await searchJourneys();
    refreshStatus();
    setInterval(refreshStatus, 5000);
  }
  setInterval(loadInbox, 15000);
  // Not while a time is being picked in the list.
  setInterval(() => { if (!document.activeElement?.closest?.("#scheduled")) loadScheduled(); }, 15000);
}

// -- live stream ------------------------------------------------------------------------

function connect() {
  const proto = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${proto}://${location.host}/v1/stream`, ["finstream.v1", `bearer.${state.token}`]);
  state.ws = ws;
  const badge = $("#ws-state");
  ws.onopen = () => {
    badge.textContent = "live"; badge.className = "badge ok";
    for (const s of state.config.symbols) ws.send(JSON.stringify({ type: "subscribe", stream: "quotes", symbol: s }));
    ws.send(JSON.stringify({ type: "subscribe", stream: "inbox" }));
    if (state.symbol) ws.send(JSON.stringify({ type: "subscribe", stream: "bars", symbol: state.symbol, interval: "1m" }));
  };
  ws.onmessage = (ev) => {
    const frame = JSON.parse(ev.data);
    if (frame.type === "quote") onQuote(frame.symbol, frame.data);
    else if (frame.type === "bar") onBar(frame.data);
    else if (frame.type === "inbox") loadInbox();
    else if (frame.type === "gap") loadInbox();
  };
  ws.onclose = (ev) => {
    badge.textContent = "reconnecting"; badge.className = "badge bad";
    if (ev.code === 4001) { signOut("The stream refused the token."); return; }
    setTimeout(connect, 2000);
  };
}

// -- quotes -----------------------------------------------------------------------------

function quoteRow(symbol) {
  let row = document.getElementById(`q-${symbol}`);
  if (!row) {
    row = el("tr", { id: `q-${symbol}`, onclick: () => selectSymbol(symbol) },
      el("td", {}, symbol), el("td", { class: "price" }, "-"), el("td", { class: "change" }, ""), el("td", { class: "time muted" }, ""));
    $("#quotes tbody").append(row);
  }
  return row;
}

function onQuote(symbol, q) {
  const row = quoteRow(symbol);
  const price = Number(q.price);
  const prev = Number(q.prev_close || 0);
  row.querySelector(".price").textContent = q.price;
  const change = row.querySelector(".change");
  if (prev) {
    const pct = ((price - prev) / prev) * 100;
    change.textContent = `${pct >= 0 ? "+" : ""}${pct.toFixed(2)}%`;
    change.className = `change ${pct >= 0 ? "up" : "down"}`;
  }
  const ts = q.ts ? new Date(q.ts) : new Date();
  row.querySelector(".time").textContent = ts.toLocaleTimeString();
  state.quotes.set(symbol, price);
  if (symbol === state.symbol && state.series) tickIntoBar(ts, price);
}

// -- chart ------------------------------------------------------------------------------

function setupChart() {
  if (state.chart) return;
  const LC = window.LightweightCharts;
  state.chart = LC.createChart($("#chart"), {
    autoSize: true,
    layout: { background: { color: "#ffffff" }, textColor: "#1d2330" },
    grid: { vertLines: { color: "#f0f1f4" }, horzLines: { color: "#f0f1f4" } },
    timeScale: { timeVisible: true, secondsVisible: false },
  });
  state.series = state.chart.addSeries(LC.CandlestickSeries, {});
}

async function selectSymbol(symbol) {
  if (state.ws && state.ws.readyState === 1 && state.symbol) {
    state.ws.send(JSON.stringify({ type: "unsubscribe", stream: "bars", symbol: state.symbol, interval: "1m" }));
  }
  state.symbol = symbol;
  $("#chart-symbol").textContent = symbol;
  $("#rule-symbol").value = symbol;
  for (const row of document.querySelectorAll("#quotes tbody tr")) row.classList.toggle("selected", row.id === `q-${symbol}`);
  const from = new Date(Date.now() - 3 * 3600 * 1000).toISOString();
  const page = await api(`/v1/bars/${encodeURIComponent(symbol)}?interval=1m&limit=500&from=${encodeURIComponent(from)}`);
  const bars = page.items.map(barPoint);
  state.series.setData(bars);
  state.chart.timeScale().fitContent();
  state.bar = bars.length ? { ...bars[bars.length - 1] } : null;
  drawLevels();
  if (state.ws && state.ws.readyState === 1) {
    state.ws.send(JSON.stringify({ type: "subscribe", stream: "bars", symbol, interval: "1m" }));
  }
}

function barPoint(b) {
  return { time: Math.floor(new Date(b.start).getTime() / 1000), open: Number(b.open), high: Number(b.high), low: Number(b.low), close: Number(b.close) };
}

function onBar(b) {
  if (b.symbol !== state.symbol || b.interval !== "1m") return;
  const p = barPoint(b);
  if (state.bar && p.time < state.bar.time) return;
  state.bar = { ...p };
  state.series.update(p);
}

// Between bar publications, the latest quotes move the current bar.
function tickIntoBar(ts, price) {
  const minute = Math.floor(ts.getTime() / 60000) * 60;
  if (!state.bar || minute > state.bar.time) state.bar = { time: minute, open: price, high: price, low: price, close: price };
  else if (minute < state.bar.time) return;
  else {
    state.bar.high = Math.max(state.bar.high, price);
    state.bar.low = Math.min(state.bar.low, price);
    state.bar.close = price;
  }
  state.series.update({ ...state.bar });
}

function drawLevels() {
  if (!state.series) return;
  for (const line of state.levels) state.series.removePriceLine(line);
  state.levels = [];
  const price = state.quotes.get(state.symbol) || (state.bar && state.bar.close);
  let off = 0;
  for (const r of state.rules.filter((x) => x.symbol === state.symbol)) {
    for (const key of ["value", "lower", "upper"]) {
      if (r[key] === null || r[key] === undefined) continue;
      const level = Number(r[key]);
      // A level far from the price (a catch-all "above 0.01") would flatten the chart.
      if (price && (level < price * 0.5 || level > price * 2)) { off += 1; continue; }
      state.levels.push(state.series.createPriceLine({
        price: level, color: "#2c5fd8", lineWidth: 1, lineStyle: 2, axisLabelVisible: true,
        title: `${r.condition.toLowerCase().replace(/_/g, " ")}${key === "value" ? "" : " " + key}`,
      }));
    }
  }
  $("#chart-levels").textContent = `${state.levels.length} alert level(s) drawn` + (off ? `, ${off} off the chart` : "");
}

// -- rules ------------------------------------------------------------------------------

async function loadRules() {
  const page = await api("/v1/users/me/rules");
  state.rules = page.items || [];
  const list = $("#rules");
  list.replaceChildren(...state.rules.map((r) => el("li", { "data-rule": r.rule_id },
    el("span", { class: "grow" }, `${r.symbol} ${r.condition.toLowerCase().replace(/_/g, " ")} ${r.value ?? [r.lower, r.upper].filter((x) => x != null).join("-") ?? r.percent ?? ""}`),
    el("span", { class: "muted" }, r.frequency.toLowerCase().replace(/_/g, " ")),
    el("button", { class: "remove", onclick: () => removeRule(r.rule_id) }, "remove"))));
  drawLevels();
}

async function addRule(ev) {
  ev.preventDefault();
  $("#rule-error").textContent = "";
  const body = {
    symbol: $("#rule-symbol").value, condition: $("#rule-condition").value,
    value: $("#rule-value").value.trim(), frequency: $("#rule-frequency").value,
    message: "added in the console",
  };
  try {
    await api("/v1/users/me/rules", { method: "POST", body, headers: { "Idempotency-Key": crypto.randomUUID() } });
    $("#rule-value").value = "";
    await loadRules();
  } catch (e) { $("#rule-error").textContent = e.message; }
}

async function removeRule(id) {
  try { await api(`/v1/users/me/rules/${encodeURIComponent(id)}`, { method: "DELETE" }); } catch (e) { $("#rule-error").textContent = e.message; }
  await loadRules();
}

// -- inbox ------------------------------------------------------------------------------

async function loadInbox() {
  const page = await api("/v1/users/me/inbox?limit=50");
  $("#inbox-unread").textContent = `${page.unread} unread`;
  $("#inbox").replaceChildren(...page.items.map((m) => el("li", { class: m.read ? "" : "unread", "data-category": m.category },
    el("span", { class: "muted" }, new Date(m.created_at).toLocaleTimeString()),
    el("span", { class: "grow", title: m.body || "" }, m.subject || m.body || ""),
    el("span", { class: "badge" }, m.category))));
}

// -- scheduled notifications --------------------------------------------------------------

function scheduledUser() {
  return $("#scheduled-user").value.trim() || state.user;
}

// A datetime-local value (the browser's zone) for a time; and back to ISO 8601 with a zone.
function localInput(iso) {
  const d = new Date(iso);
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

async function loadScheduled(ev) {
  if (ev) ev.preventDefault();
  const user = scheduledUser();
  let page;
  try { page = await api(`/v1/users/${encodeURIComponent(user)}/scheduled`); } catch (e) { $("#scheduled-message").textContent = e.message; return; }
  $("#scheduled").replaceChildren(...page.items.map((i) => {
    const when = el("input", { type: "datetime-local", class: "when", value: localInput(i.due) });
    return el("li", { "data-item": i.item_id, "data-state": i.state },
      el("span", { class: "muted" }, new Date(i.due).toLocaleString()),
      el("span", { class: "grow", title: i.item_id }, `${i.category}${i.template ? " · " + i.template : ""}${i.kind === "digest" ? ` · ${i.items} item(s)` : ""}`),
      el("span", { class: "badge" }, `${i.kind === "digest" ? "digest" : i.reason}${i.state === "rescheduled" ? " · moved" : ""}`),
      when,
      el("button", { class: "reschedule", onclick: () => scheduledCommand(user, i.item_id, "PATCH", when.value) }, "reschedule"),
      el("button", { class: "cancel", onclick: () => scheduledCommand(user, i.item_id, "DELETE") }, "cancel"));
  }));
  if (!page.items.length) $("#scheduled").replaceChildren(el("li", { class: "muted" }, `nothing held for ${user}`));
}

async function scheduledCommand(user, id, method, local) {
  const message = $("#scheduled-message");
  message.className = "muted";
  const options = { method };
  if (method === "PATCH") {
    const at = new Date(local);
    if (!local || Number.isNaN(at.getTime())) { message.className = "error"; message.textContent = "pick a new time"; return; }
    options.body = { deliver_at: at.toISOString() };
  }
  try {
    const answer = await api(`/v1/users/${encodeURIComponent(user)}/scheduled/${encodeURIComponent(id)}`, options);
    message.textContent = `${answer.action} of ${id} accepted (command ${answer.command_id}); the journey of ${id} shows the outcome.`;
  } catch (e) { message.className = "error"; message.textContent = e.message; }
  setTimeout(loadScheduled, 1000);
}

// -- journeys (operators) ----------------------------------------------------------------

async function searchJourneys(ev) {
  if (ev) ev.preventDefault();
  const user = $("#journey-user").value.trim();
  const minutes = Number($("#journey-range").value);
  const from = new Date(Date.now() - minutes * 60000).toISOString();
  const page = await api(`/v1/users/${encodeURIComponent(user)}/journeys?from=${encodeURIComponent(from)}&limit=100`);
  $("#journeys").replaceChildren(...page.items.map((j) => el("li", { "data-request": j.request_id, onclick: () => openJourney(j.request_id) },
    el("span", { class: "muted" }, new Date(j.first_at).toLocaleTimeString()),
    el("span", { class: "grow" }, `${j.category || "?"} · ${j.template || "?"}`),
    el("span", { class: "badge" }, j.last_action))));
}

async function openJourney(id) {
  state.journeyId = id;
  for (const li of document.querySelectorAll("#journeys li")) li.classList.toggle("selected", li.dataset.request === id);
  const j = await api(`/v1/notifications/${encodeURIComponent(id)}/journey`);
  const box = $("#journey");
  const channels = Object.entries(j.channels).map(([c, v]) => `${c}: ${v.decision}${v.reason ? ` (${v.reason})` : ""}`).join(" · ");
  box.replaceChildren(
    el("p", {}, el("strong", {}, j.request_id), ` — ${j.state}, ${j.category}/${j.template}`),
    el("p", { class: "muted" }, channels),
    ...j.steps.map((s) => el("div", { class: "step" },
      el("span", { class: "muted" }, `+${s.elapsed_ms.toFixed(0)} ms`), el("span", { class: "kind" }, s.kind), el("span", {}, s.summary))));
}

// -- status (operators) -----------------------------------------------------------------

async function refreshStatus() {
  let data;
  try { data = await api("/v1/ops/status"); } catch (e) { return; }
  $("#status tbody").replaceChildren(...data.roles.map((r) => el("tr", {},
    el("td", {}, r.role),
    el("td", {}, el("span", { class: `badge ${r.ready ? "ok" : "bad"}` }, r.up ? (r.ready ? "ready" : "not ready") : "down")),
    el("td", {}, r.lag ?? "-"), el("td", {}, r.rate == null ? "-" : r.rate.toFixed(1)),
    el("td", {}, r.dead_letters ?? "-"), el("td", { class: "muted" }, r.last_error || (r.ready ? "" : r.reason)))));
}

document.addEventListener("DOMContentLoaded", () => {
  $("#rule-form").addEventListener("submit", addRule);
  $("#journey-form").addEventListener("submit", searchJourneys);
  $("#scheduled-form").addEventListener("submit", loadScheduled);
  start().catch((e) => signOut(e.message));
});

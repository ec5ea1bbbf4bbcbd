// Herald Console and tenant portal: one script, no framework, no build step. It uses only the
// public /v1 API and /metrics, with the token it keeps in session storage (never in the URL),
// so everything here can be scripted. Pages are built with DOM calls, never from HTML strings,
// so no value from the API can become markup.
"use strict";

const PORTAL = location.pathname.startsWith("/portal");
const TOKEN_KEY = "herald.token";
// Session storage can be refused (a portal embedded in another site, with third-party storage
// blocked, throws on touching it): the token is then kept in memory only, for this page.
const stored = {
  get() { try { return sessionStorage.getItem(TOKEN_KEY); } catch { return null; } },
  set(v) { try { sessionStorage.setItem(TOKEN_KEY, v); } catch { /* memory only */ } },
  forget() { try { sessionStorage.removeItem(TOKEN_KEY); } catch { /* memory only */ } },
};
const session = { token: stored.get(), role: null };
let timers = [];
// Counts `route()` calls: an answer to a request made for an earlier one belongs to a page the
// user has left, and is dropped (`Stale`) rather than drawn over the page they went to.
let routes = 0;
// A secret to show once on the next page (a new subscription's), held in memory only.
let flash = null;

// ---------- DOM helpers ----------

// A click or submit whose work is under way is not taken again: a double click made two
// subscriptions (the first one's signing secret never shown), two keys, two resends. A
// handler that may be asked again while its work runs returns nothing (a filter: the newer
// list replaces the one loading, see `pager`).
function once(el, handler) {
  return (ev) => {
    if (el.getAttribute("aria-busy") === "true") { ev.preventDefault(); return; }
    const work = handler(ev);
    if (!(work instanceof Promise)) return;
    el.setAttribute("aria-busy", "true");
    work.finally(() => el.removeAttribute("aria-busy")).catch(() => {});
  };
}

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "onclick" || k === "onsubmit") el.addEventListener(k.slice(2), once(el, v));
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const fmtTime = (s) => (s ? new Date(s).toLocaleString() : "—");
const fmtNum = (n, d = 0) => (Number.isFinite(n) ? n.toLocaleString(undefined, { maximumFractionDigits: d }) : "—");
const badge = (text, kind) => h("span", { class: "badge " + (kind || "") }, text);
const STATE_KIND = { delivered: "ok", dead_lettered: "bad", dropped: "bad", retrying: "warn", pending: "", gone: "bad" };
const stateBadge = (s) => badge(s.replace("_", " "), STATE_KIND[s] ?? "");
const outcomeBadge = (o) => badge(o.replace("_", " "), o === "delivered" ? "ok" : "bad");
const link = (href, text) => h("a", { href }, text);
const empty = (text) => h("p", { class: "empty" }, text);

function table(headers, rows, emptyText) {
  if (!rows.length) return empty(emptyText);
  return h("div", { class: "table-wrap" },
    h("table", {},
      h("thead", {}, h("tr", {}, headers.map((x) => h("th", { scope: "col" }, x)))),
      h("tbody", {}, rows)));
}

/** What to do when a list could not be read: say so in its place, and take away its paging
 *  and any actions drawn for it (the list before, left under a new filter, read as that
 *  filter's). A page the user has left says nothing. */
const unreadList = (list, ...drawnFor) => (e) => {
  if (e instanceof Stale) return;
  list.replaceChildren(errorBox(e));
  for (const el of drawnFor) el.replaceChildren();
};

function errorBox(err) {
  const text = err.field ? `${err.field}: ${err.message}` : err.message;
  return h("div", { class: "alert error", role: "alert" }, text);
}

/** A Copy button for `value`, shown in `code`, and where it says what became of the copy. */
function copyButton(code, value) {
  const said = h("span", { class: "muted", "aria-live": "polite" });
  // The clipboard is refused outside a secure context (plain HTTP to another host) and in a
  // frame not allowed it: say so, and select the text for the keyboard's copy.
  const copy = h("button", { type: "button", onclick: async () => {
    try {
      if (!navigator.clipboard) throw new Error("no clipboard here");
      await navigator.clipboard.writeText(value);
      said.textContent = " Copied.";
    } catch {
      getSelection()?.selectAllChildren(code);
      said.textContent = " Could not copy here: it is selected, copy it with the keyboard.";
    }
  } }, "Copy");
  return [copy, said];
}

function secretBox(title, value) {
  const code = h("code", { "data-secret": "" }, value);
  return h("div", { class: "alert secret", role: "status" }, h("strong", {}, title), code,
    h("div", { class: "muted" }, "Shown this once: store it now."), ...copyButton(code, value));
}

// ---------- the API ----------

/** A request answered after the user left the page that made it. */
class Stale extends Error {}

class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || `HTTP ${status}`);
    this.status = status;
    this.code = e.code;
    this.field = e.field;
  }
}

async function api(method, path, body) {
  const mine = routes;
  // A read answered (or failed) after the user left the page that made it is dropped; a
  // write's answer is always used: a new subscription's secret is shown that once.
  const stale = () => method === "GET" && mine !== routes;
  const headers = { authorization: "Bearer " + session.token };
  if (body !== undefined) headers["content-type"] = "application/json";
  let res, text;
  try {
    res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    text = await res.text();
  } catch (e) {
    if (stale()) throw new Stale("the page was left");
    throw e;
  }
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch { json = null; }
  if (res.status === 401 && session.role) {
    // A write's page holds what was typed (a long JSON of settings): signed in again over it,
    // not replaced by the sign-in form. A read's page is drawn again once signed in.
    if (method === "GET") signOut(ended());
    else signInOver(ended());
    throw new ApiError(401, json);
  }
  if (stale()) throw new Stale("the page was left");
  if (!res.ok) throw new ApiError(res.status, json);
  return json;
}

const q = (params) => {
  const s = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== "") s.set(k, v);
  const t = s.toString();
  return t ? "?" + t : "";
};

// ---------- session ----------

async function whoAmI() {
  // The admin token lists tenants; a tenant key or portal link is refused there (403). One
  // is enough to tell: the whole list was megabytes at ten thousand tenants, at every load.
  try {
    await api("GET", "/v1/tenants?limit=1");
    return "admin";
  } catch (e) {
    if (e.status === 403) return "tenant";
    throw e;
  }
}

// Why a session ended: someone who came in by a portal link has no API key to sign in with,
// and is told where a new link comes from rather than asked for a key.
const ended = () => (session.token || "").startsWith("hp.")
  ? "This portal link has expired or was revoked: ask whoever gave it to you for a new one (or sign in with an API key)."
  : "That token is no longer accepted: sign in again.";

function signOut(message) {
  // Reads under way belong to the session that ended: not drawn over the sign-in form.
  routes++;
  stored.forget();
  session.token = null;
  session.role = null;
  renderLogin(message);
}

/** The sign-in form, with `message` above it; `signedIn` runs once a token is taken. */
function loginForm(id, message, signedIn) {
  const input = h("input", { id, type: "password", autocomplete: "off", required: true, "aria-describedby": `${id}-help` });
  const out = h("div", {});
  if (message) out.append(h("div", { class: "alert error", role: "alert" }, message));
  const form = h("form", { class: "stack", onsubmit: async (ev) => {
    ev.preventDefault();
    out.replaceChildren();
    // A new portal link pasted whole is taken for its token.
    const given = input.value.trim();
    session.token = (PORTAL && given.match(/#token=(hp\.[^&]+)/)?.[1]) || given;
    try {
      session.role = await whoAmI();
      stored.set(session.token);
      signedIn();
    } catch (e) {
      session.token = null;
      out.replaceChildren(h("div", { class: "alert error", role: "alert" },
        e.status === 401 ? "That token was not accepted." : e.message));
    }
  } },
  h("label", { for: id }, PORTAL ? "API key" : "Admin token or tenant API key", input),
  h("p", { id: `${id}-help`, class: "muted" }, "Kept in this tab's session storage only, never sent elsewhere; signing out forgets it (a browser that reopens a closed tab may bring it back: sign out on a shared machine)."),
  h("button", { class: "primary", type: "submit" }, "Sign in"));
  return { out, form, input };
}

function renderLogin(message) {
  stopTimers();
  closeSignInOver();
  const { out, form, input } = loginForm("token", message, () => {
    // A new address routes by itself (hashchange); routing here too drew the page twice.
    if (!location.hash || location.hash === "#/") location.hash = home();
    else route();
  });
  document.getElementById("app").replaceChildren(
    h("main", { id: "main", class: "login" },
      h("div", { class: "panel" }, h("h1", {}, PORTAL ? "Herald portal" : "Herald Console"), out, form)));
  input.focus();
}

// Whose session it is, as far as the page can tell: the admin, a portal link's tenant (named in
// the link), or an API key (whose tenant the page is not told: another key counts as another).
const principal = () => session.role === "admin" ? "admin"
  : /^hp\.([^.]+)\./.exec(session.token || "")?.[1] ? "tenant:" + /^hp\.([^.]+)\./.exec(session.token)[1]
    : "key:" + (session.token || "").split(".")[1];

// Whose session a sign-in over the page replaces (`signInOver`), while one is asked for.
let signingInOver = null;

/** Takes away a sign-in asked for over a page the user has left (or signed in on anew). */
function closeSignInOver() {
  document.querySelector("dialog[data-sign-in]")?.remove();
  signingInOver = null;
}

/** Asks for a token again over the page, which stays as it is (see `api`). */
function signInOver(message) {
  if (session.role) signingInOver = principal();
  stored.forget();
  // No role until signed in again: a token refused in the box is said there, not taken for
  // this session ending again.
  session.token = null;
  session.role = null;
  if (document.querySelector("dialog[data-sign-in]")) return;
  const dialog = h("dialog", { class: "panel", "data-sign-in": "", "aria-labelledby": "sign-in-again" });
  const { out, form } = loginForm("token-again", message, () => {
    const before = signingInOver;
    closeSignInOver();
    // Someone else's now (another tenant's link, another key), or the page was left for the
    // sign-in form meanwhile: drawn anew.
    if (principal() !== before || document.getElementById("token")) route();
  });
  dialog.append(h("h2", { id: "sign-in-again" }, "Sign in again"),
    h("p", { class: "muted" }, "What you typed on this page is kept: save again once signed in."), out, form);
  // Escape would leave a page that cannot save: sign out instead, as the button says.
  dialog.addEventListener("cancel", (ev) => ev.preventDefault());
  form.append(h("button", { type: "button", onclick: () => { closeSignInOver(); signOut(); } }, "Sign out"));
  document.body.append(dialog);
  dialog.showModal();
}

const home = () => (session.role === "admin" ? "#/overview" : "#/subscriptions");

// ---------- layout and routing ----------

const SCREENS = [
  { path: "overview", title: "Overview", admin: true },
  { path: "tenants", title: "Tenants", admin: true },
  { path: "subscriptions", title: "Subscriptions" },
  { path: "events", title: "Events" },
  { path: "event-types", title: "Event types" },
  { path: "dlq", title: "Dead letters" },
  { path: "edge", title: "Edge devices", admin: true },
];

function stopTimers() {
  timers.forEach(clearInterval);
  timers = [];
}

function layout(current, title, ...content) {
  const nav = h("nav", { class: "tabs", "aria-label": "Sections" },
    SCREENS.filter((s) => !s.admin || session.role === "admin")
      .map((s) => h("a", { href: "#/" + s.path, "aria-current": s.path === current ? "page" : false }, s.title)));
  // A portal link names its tenant (`hp.<tenant>.<expiry>.<minted>.<tag>`; a tenant id has no
  // dot): shown, so that a visitor sent someone else's link can see whose portal this is.
  const linked = session.role !== "admin" && /^hp\.([^.]+)\./.exec(session.token || "");
  const brand = h("span", { class: "brand" }, "Herald",
    h("small", {}, session.role === "admin" ? "console" : "portal"),
    linked ? h("small", { class: "mono", "data-tenant": linked[1] }, linked[1]) : null);
  const out = h("button", { type: "button", onclick: () => signOut() }, "Sign out");
  const heading = h("h1", { tabindex: "-1" }, title);
  document.title = `${title} · Herald`;
  document.getElementById("app").replaceChildren(
    h("header", { class: "top" }, brand, nav, out),
    h("main", { id: "main" }, heading, ...content));
  heading.focus({ preventScroll: true });
}

// Herald did not answer who the token is (a restart, a 503, a 429): the token is kept — a
// portal link's is in no address any more, so forgetting it would lock the tenant out.
function renderUnreachable(err) {
  document.getElementById("app").replaceChildren(
    h("main", { id: "main", class: "login" },
      h("div", { class: "panel" }, h("h1", {}, PORTAL ? "Herald portal" : "Herald Console"), errorBox(err),
        h("div", { class: "actions" },
          h("button", { class: "primary", type: "button", onclick: () => route() }, "Try again"),
          h("button", { type: "button", onclick: () => signOut() }, "Sign out")))));
}

async function route() {
  routes++;
  stopTimers();
  if (!session.token) return renderLogin();
  if (!session.role) {
    try { session.role = await whoAmI(); } catch (e) {
      if (e instanceof Stale) return;
      if (e.status === 401) return signOut(ended());
      return renderUnreachable(e);
    }
  }
  // The portal is a tenant's page (other sites may frame it): the operator uses the console.
  if (PORTAL && session.role === "admin") return signOut("The portal is for tenants: the operator signs in at /console.");
  // A hand-typed or damaged address (`#/events/%E0`) is taken as written, not thrown on:
  // thrown here, it left the page on "Loading Herald…".
  const decoded = (part) => { try { return decodeURIComponent(part); } catch { return part; } };
  const [screen, id, sub] = location.hash.replace(/^#\/?/, "").split("?")[0].split("/").map(decoded);
  const screens = {
    overview: overview, tenants: tenants, subscriptions: subscriptions, events: events, dlq: deadLetters, edge: edgeDevices,
    "event-types": eventTypes,
  };
  const allowed = SCREENS.find((s) => s.path === screen && (!s.admin || session.role === "admin"));
  if (!allowed) { location.hash = home(); return; }
  try {
    await screens[screen](id, sub);
  } catch (e) {
    if (e.status === 401 || e instanceof Stale) return;
    layout(screen, allowed.title, errorBox(e));
  }
}

// ---------- Overview: Herald's own metrics, live ----------

function parseMetrics(text) {
  const series = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const l of (m[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
    series.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return series;
}

// An attempt that succeeded: a 2xx answer ("success") or a transport's own delivered outcome.
const succeeded = (l) => l.outcome === "success" || l.outcome === "delivered";
// A tier's delay in ms from its topic suffix ("retry.250ms", "retry.4h"), to list tiers in order.
const tierMs = (source) => {
  const m = /(\d+)(ms|s|m|h|d)$/.exec(source) || [];
  return Number(m[1]) * ({ ms: 1, s: 1e3, m: 6e4, h: 3.6e6, d: 8.64e7 }[m[2]] || NaN);
};
const sum = (series, name, pred = () => true) =>
  series.filter((s) => s.name === name && pred(s.labels)).reduce((a, s) => a + s.value, 0);

// A quantile from the difference of two scrapes' cumulative histogram buckets.
function quantile(prev, cur, name, q) {
  const buckets = (series) => {
    const by = new Map();
    for (const s of series) if (s.name === name + "_bucket") by.set(s.labels.le, (by.get(s.labels.le) || 0) + s.value);
    return by;
  };
  const a = buckets(prev), b = buckets(cur);
  const les = [...b.keys()].sort((x, y) => Number(x) - Number(y));
  const counts = les.map((le) => (b.get(le) || 0) - (a.get(le) || 0));
  const total = counts[counts.length - 1];
  if (!(total > 0)) return NaN;
  const i = counts.findIndex((c) => c >= q * total);
  return Number(les[i]);
}

/** Whether a counter of `prev` is higher in `cur`: `cur` is another process's, or a restart's. */
function wentDown(prev, cur) {
  const id = (s) => s.name + JSON.stringify(s.labels);
  const before = new Map(prev.filter((s) => /_(total|bucket|count)$/.test(s.name)).map((s) => [id(s), s.value]));
  return cur.some((s) => before.has(id(s)) && s.value < before.get(id(s)));
}

function sparkline(points) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", "0 0 100 30");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("aria-hidden", "true");
  const finite = points.filter(Number.isFinite);
  if (finite.length > 1) {
    const max = Math.max(...finite), min = Math.min(...finite, 0);
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", points.map((v, i) =>
      `${(i / (points.length - 1)) * 100},${28 - ((Number.isFinite(v) ? v : min) - min) / ((max - min) || 1) * 26}`).join(" "));
    svg.append(line);
  }
  return svg;
}

async function overview() {
  const mine = routes;
  // Not a live region: redrawn every 3 s, six cards were read out again each time.
  const cards = h("div", { class: "grid" });
  const tiers = h("div", {});
  const status = h("p", { class: "muted" }, "Reading /metrics…");
  layout("overview", "Overview", status, cards, h("h2", {}, "Retries waiting, per tier"), tiers);
  const history = { rate: [], success: [], p50: [], p99: [], dead: [], lag: [] };
  let prev = null, prevAt = 0, busy = false;
  const tick = async () => {
    // Not while the tab is hidden, nor over a scrape still waited for (a slow /metrics).
    if (busy || document.hidden) return;
    busy = true;
    try { await scrape(); } finally { busy = false; }
  };
  const scrape = async () => {
    let text;
    try {
      const res = await fetch("/metrics");
      // A proxy that keeps /metrics to itself answers 403 or 404: no series, so every sum
      // would read 0 — say so instead.
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      text = await res.text();
    } catch (e) {
      status.textContent = "Could not read /metrics: " + e.message;
      return;
    }
    const cur = parseMetrics(text), now = Date.now();
    const delivered = sum(cur, "herald_deliveries_total", (l) => l.outcome === "delivered");
    const attempts = sum(cur, "herald_attempts_total");
    const ok = sum(cur, "herald_attempts_total", succeeded);
    const dead = sum(cur, "herald_dead_letters_total");
    const lag = sum(cur, "herald_consumer_lag", (l) => !/retry|dlq|history/.test(l.source || ""));
    // A counter that went down is another process's (a load balancer in front of several) or
    // a restarted one's: no rate between the two, rather than a negative one.
    const comparable = prev && !wentDown(prev, cur);
    if (comparable) {
      const secs = (now - prevAt) / 1000;
      const dAttempts = attempts - sum(prev, "herald_attempts_total");
      const dOk = ok - sum(prev, "herald_attempts_total", succeeded);
      history.rate.push((delivered - sum(prev, "herald_deliveries_total", (l) => l.outcome === "delivered")) / secs);
      history.success.push(dAttempts ? (dOk / dAttempts) * 100 : NaN);
      history.p50.push(quantile(prev, cur, "herald_delivery_end_to_end_seconds", 0.5) * 1000);
      history.p99.push(quantile(prev, cur, "herald_delivery_end_to_end_seconds", 0.99) * 1000);
    } else {
      history.rate.push(NaN); history.success.push(attempts ? (ok / attempts) * 100 : NaN);
      history.p50.push(NaN); history.p99.push(NaN);
    }
    history.dead.push(dead);
    history.lag.push(lag);
    for (const k of Object.keys(history)) if (history[k].length > 60) history[k].shift();
    const last = (k) => history[k][history[k].length - 1];
    const card = (label, key, value) => h("div", { class: "card", "data-metric": key },
      h("div", { class: "label" }, label), h("div", { class: "value" }, value), sparkline(history[key]));
    cards.replaceChildren(
      card("Deliveries / s", "rate", fmtNum(last("rate"), 1)),
      // The value is since start (a quiet moment has no ratio); the line is per refresh.
      card("Success ratio since start", "success", attempts ? fmtNum((ok / attempts) * 100, 1) + " %" : "—"),
      card("End to end p50", "p50", Number.isFinite(last("p50")) ? fmtNum(last("p50"), 1) + " ms" : "—"),
      card("End to end p99", "p99", Number.isFinite(last("p99")) ? fmtNum(last("p99"), 1) + " ms" : "—"),
      card("Dead letters", "dead", fmtNum(last("dead"))),
      card("Consumer lag", "lag", fmtNum(last("lag"))));
    const bySource = new Map();
    for (const s of cur) if (s.name === "herald_consumer_lag" && /retry/.test(s.labels.source || ""))
      bySource.set(s.labels.source, (bySource.get(s.labels.source) || 0) + s.value);
    tiers.replaceChildren(table(["Tier", "Waiting"],
      [...bySource].sort((a, b) => tierMs(a[0]) - tierMs(b[0])).map(([src, n]) => h("tr", {}, h("td", { class: "mono" }, src), h("td", { class: "num" }, fmtNum(n)))),
      "No retry tier is worked by this process yet."));
    status.textContent = (prev && !comparable ? "Another process answered or this one restarted: rates start again · " : "") +
      `This process, refreshed every 3 s · last ${new Date(now).toLocaleTimeString()}`;
    prev = cur; prevAt = now;
  };
  await tick();
  // Left during the first scrape: `route` has already stopped this page's timers.
  if (mine === routes) timers.push(setInterval(tick, 3000));
}

// ---------- Tenants ----------

async function tenants() {
  // A key shown once stays above what later clicks say (`out`) until another is issued.
  const kept = h("div", {});
  const out = h("div", {});
  const name = h("input", { id: "tenant-name", type: "text", required: true, maxlength: 200 });
  const create = h("form", { class: "row", onsubmit: async (ev) => {
    ev.preventDefault();
    try {
      const t = await api("POST", "/v1/tenants", { name: name.value });
      out.replaceChildren(h("div", { class: "alert ok", role: "status" }, `Tenant ${t.name} created: ${t.id}`));
      name.value = "";
      // The list is oldest first: the new tenant is on its last page, so it is found by name.
      find.value = t.name;
      await load();
    } catch (e) { out.replaceChildren(errorBox(e)); }
  } }, h("label", { for: "tenant-name" }, "New tenant's name", name), h("button", { class: "primary", type: "submit" }, "Create tenant"));
  const list = h("div", {});
  const more = h("div", {});
  const find = h("input", { id: "tenant-find", type: "search", placeholder: "any" });
  const refused = unreadList(list, more);
  const search = h("form", { class: "row", role: "search", onsubmit: (ev) => { ev.preventDefault(); load().catch(refused); } },
    h("label", { for: "tenant-find" }, "Find tenants by name", find), h("button", { type: "submit" }, "Find"));
  layout("tenants", "Tenants", h("div", { class: "panel" }, create), kept, out, search, list, more);
  // Each tenant's chosen link lifetime, kept while its row is drawn again.
  const lifetimes = new Map();

  // A tenant's row; a key issued or revoked draws the row again, in its place (the list
  // drawn anew went back to its first page, and a tenant reached by "Load more" was gone).
  const row = (t) => {
    const redraw = () => document.querySelector(`tr[data-tenant="${CSS.escape(t.id)}"]`)?.replaceWith(row(t));
    const keys = h("ul", {}, t.keys.map((k) => h("li", {}, h("span", { class: "mono" }, k.id), " ",
      h("button", { type: "button", class: "danger", "aria-label": `Revoke ${k.id}`, onclick: async () => {
        if (!confirm(`Revoke key ${k.id}? Clients using it stop working at once.`)) return;
        try {
          await api("DELETE", `/v1/tenants/${t.id}/keys/${k.id}`);
          t.keys = t.keys.filter((other) => other.id !== k.id);
          redraw();
        } catch (e) { out.replaceChildren(errorBox(e)); }
      } }, "Revoke"))));
    // How long a link minted here works (the API's range: a minute to a week).
    const lifetime = h("select", { "aria-label": `Lifetime of ${t.name}'s portal links` },
      [["", "for the default time (api.portal_ttl)"], ["1h", "for 1 hour"], ["8h", "for 8 hours"], ["1d", "for 1 day"], ["7d", "for 7 days"]]
        .map(([v, text]) => h("option", { value: v, selected: lifetimes.get(t.id) === v }, text)));
    lifetime.addEventListener("change", () => lifetimes.set(t.id, lifetime.value));
    return h("tr", { "data-tenant": t.id },
      h("td", {}, h("strong", {}, t.name), h("div", { class: "mono muted" }, t.id)),
      h("td", {}, fmtTime(t.created_at)),
      h("td", {}, t.keys.length ? keys : h("span", { class: "muted" }, "none")),
      h("td", {}, h("div", { class: "actions" },
        h("button", { type: "button", onclick: async () => {
          try {
            const k = await api("POST", `/v1/tenants/${t.id}/keys`);
            kept.replaceChildren(secretBox(`New API key ${k.id} for ${t.name}`, k.key));
            out.replaceChildren();
            t.keys = [...t.keys, { id: k.id }];
            redraw();
          } catch (e) { out.replaceChildren(errorBox(e)); }
        } }, "Issue key"),
        lifetime,
        h("button", { type: "button", onclick: async () => {
          try {
            const p = await api("POST", `/v1/tenants/${t.id}/portal`, lifetime.value ? { ttl: lifetime.value } : {});
            const url = h("code", { "data-portal-url": "" }, p.url);
            out.replaceChildren(h("div", { class: "alert secret", role: "status" },
              h("strong", {}, `Portal link for ${t.name}, valid until ${fmtTime(p.expires_at)}`), url,
              h("div", { class: "muted" }, "Anyone with this link acts as the tenant until it expires, or until the tenant's portal links are revoked."),
              ...copyButton(url, p.url)));
          } catch (e) { out.replaceChildren(errorBox(e)); }
        } }, "Portal link"),
        h("button", { type: "button", class: "danger", onclick: async () => {
          // The name is the operator's, but quoted as elsewhere: one line, no rewriting.
          if (!confirm(`Revoke every portal link of ${JSON.stringify(t.name)}? Links given out so far stop working at once; links minted after work.`)) return;
          try {
            await api("DELETE", `/v1/tenants/${t.id}/portal`);
            out.replaceChildren(h("div", { class: "alert ok", role: "status", "data-portal-revoked": "" },
              `Every portal link of ${t.name} minted until now is refused.`));
          } catch (e) { out.replaceChildren(errorBox(e)); }
        } }, "Revoke portal links"),
        link(`#/subscriptions?tenant=${encodeURIComponent(t.id)}`, "Subscriptions"))));
  };

  // A page at a time, as the other lists: a platform has a tenant per customer.
  const { page, reload: load } = pager("/v1/tenants", () => ({ name: find.value.trim(), limit: 100 }), (items, next) => {
    more.replaceChildren(next ? h("button", { type: "button", onclick: () => page().catch((e) => more.replaceChildren(errorBox(e))) }, "Load more") : "");
    list.replaceChildren(table(["Tenant", "Created", "API keys", ""], items.map(row),
      find.value.trim() ? "No tenant's name holds that." : "No tenants yet: create the first one above."));
  });
  await load();
}

// ---------- Subscriptions ----------

function hashParams() {
  const i = location.hash.indexOf("?");
  return new URLSearchParams(i < 0 ? "" : location.hash.slice(i + 1));
}

// A listing the server filters and pages, looking at a bounded number of entries a page: a
// page that found none may still say where to go on, so a few more are asked for before
// drawing, then "Load more" goes on (`page`). A page that comes back after the filters changed
// (`reload`), or after another request moved on from the same cursor (a second click on "Load
// more"), is dropped. `params()` gives the query's filters, read when the list is (re)loaded:
// a cursor goes on with the filters it was made with, not what has been typed since;
// `draw(items, next, filters, added)` shows all loaded, `added` those this page brought.
function pager(path, params, draw) {
  let loaded = [], next = null, generation = 0, filters = null;
  async function page() {
    const mine = generation;
    filters ??= params();
    let added = [];
    for (let asked = 0; asked < 20; asked++) {
      const cursor = next;
      let r;
      try {
        r = await api("GET", path + q({ ...filters, cursor }));
      } catch (e) {
        // A page of a list replaced since (a newer filter) says nothing, failed or not.
        if (mine !== generation) return;
        throw e;
      }
      if (mine !== generation || next !== cursor) return;
      loaded = loaded.concat(r.items);
      added = added.concat(r.items);
      next = r.next;
      if (r.items.length || !next) break;
    }
    draw(loaded, next, filters, added);
  }
  function reload() {
    generation++;
    loaded = [];
    next = null;
    filters = null;
    return page();
  }
  return { page, reload };
}

async function subscriptions(id, sub) {
  if (id === "new") return subscriptionForm(null);
  if (id && sub === "edit") return subscriptionForm(await api("GET", `/v1/subscriptions/${encodeURIComponent(id)}`));
  if (id) return subscriptionDetail(id);
  const params = hashParams();
  const filters = {
    tenant: h("input", { id: "f-tenant", type: "text", value: params.get("tenant") || "", placeholder: "any" }),
    transport: h("select", { id: "f-transport" }, ["", "webhook", "amqp", "edge"].map((v) => h("option", { value: v }, v || "any"))),
    enabled: h("select", { id: "f-enabled" }, [["", "any"], ["true", "enabled"], ["false", "disabled"]].map(([v, t]) => h("option", { value: v }, t))),
    breaker: h("select", { id: "f-breaker" }, ["", "closed", "open", "half_open"].map((v) => h("option", { value: v }, v ? v.replace("_", " ") : "any"))),
  };
  const list = h("div", {});
  const more = h("div", {});
  const admin = session.role === "admin";
  const bar = h("form", { class: "row panel", onsubmit: (ev) => { ev.preventDefault(); load(reload); } },
    admin ? h("label", { for: "f-tenant" }, "Tenant", filters.tenant) : null,
    h("label", { for: "f-transport" }, "Transport", filters.transport),
    h("label", { for: "f-enabled" }, "State", filters.enabled),
    h("label", { for: "f-breaker" }, "Breaker", filters.breaker),
    h("button", { type: "submit" }, "Filter"),
    h("a", { href: "#/subscriptions/new", class: "primary-link" }, "New subscription"));
  layout("subscriptions", "Subscriptions", bar, list, more);
  // A link may carry the filters (#/subscriptions?breaker=open); the server applies them.
  for (const name of ["transport", "enabled", "breaker"]) filters[name].value = params.get(name) || "";
  for (const f of [filters.transport, filters.enabled, filters.breaker]) f.addEventListener("change", () => load(reload));
  const kind = (s) => (s.via_edge ? "edge" : s.transport);
  const filtered = (used) => [used.tenant, used.transport, used.enabled, used.breaker].some(Boolean);
  const { page, reload } = pager("/v1/subscriptions", () => ({
    limit: 500, tenant: admin ? filters.tenant.value.trim() : undefined,
    transport: filters.transport.value, enabled: filters.enabled.value, breaker: filters.breaker.value,
  }), (loaded, next, used) => {
    list.replaceChildren(table(["Subscription", "Tenant", "Transport", "Events", "State", "Breaker", "In flight"], loaded.map((s) =>
      h("tr", { "data-subscription": s.id },
        h("td", {}, link(`#/subscriptions/${s.id}`, s.id), h("div", { class: "muted wrap" }, s.url)),
        h("td", { class: "mono" }, s.tenant),
        h("td", {}, kind(s)),
        h("td", {}, (s.events || []).length ? s.events.join(", ") : h("span", { class: "muted" }, "all")),
        h("td", {}, s.enabled === false ? badge("disabled", "bad") : badge("enabled", "ok")),
        h("td", {}, badge((s.health?.breaker || "—").replace("_", " "), s.health?.breaker === "closed" ? "ok" : "bad")),
        h("td", { class: "num" }, `${s.health?.in_flight ?? "—"} / ${s.health?.max_in_flight ?? "—"}`))),
    next ? "None found yet: “Load more” looks further." : filtered(used) ? "No subscription matches these filters." :
      "No subscriptions yet: create one with “New subscription”."));
    more.replaceChildren(next ? h("button", { type: "button", onclick: () => load(page) }, "Load more") : "");
  });
  // What a click or a change starts: an API error takes the list's place (a 401 signs out).
  function load(what) {
    what().catch((e) => { if (e.status !== 401) list.replaceChildren(errorBox(e)); });
  }
  filters.tenant.addEventListener("change", () => load(reload));
  await page();
}

// The form shows the common fields; the rest of the API's settings go in the JSON box, so
// nothing the API can do is out of the console's reach. Errors come back naming a field: shown
// under that field if the form has it, else above the form with its name.
const FORM_FIELDS = ["tenant", "url", "events", "payload", "timeout", "max_in_flight", "rate_limit", "via_edge"];
const ADVANCED_KEYS = ["signature", "headers", "key", "auth", "tls", "retry", "amqp", "transport", "proxy", "ordering"];

function subscriptionForm(existing) {
  const v = existing || {};
  const input = (name, attrs) => h("input", { id: "s-" + name, name, type: "text", ...attrs });
  const fields = {
    tenant: input("tenant", { value: v.tenant || "", placeholder: "default", disabled: !!existing }),
    url: input("url", { value: v.url || "", required: true, placeholder: "https://example.com/webhooks" }),
    events: input("events", { value: (v.events || []).join(", "), placeholder: "all event types" }),
    payload: h("select", { id: "s-payload" }, ["envelope", "raw", "raw_bytes"].map((p) => h("option", { value: p, selected: (v.payload || "envelope") === p }, p))),
    timeout: input("timeout", { value: v.timeout || "", placeholder: "30s" }),
    max_in_flight: input("max_in_flight", { value: v.max_in_flight ?? "", inputmode: "numeric", placeholder: "64" }),
    rate_limit: input("rate_limit", { value: v.rate_limit ?? "", inputmode: "decimal", placeholder: "no limit" }),
    via_edge: input("via_edge", { value: v.via_edge || "", placeholder: "none" }),
  };
  const advanced = {};
  for (const k of ADVANCED_KEYS) if (v[k] !== undefined) advanced[k] = v[k];
  const json = h("textarea", { id: "s-advanced", spellcheck: "false" }, Object.keys(advanced).length ? JSON.stringify(advanced, null, 2) : "");
  const errors = {};
  const labelled = (name, text, control) => {
    errors[name] = h("div", { class: "field-error", id: `s-${name}-error`, role: "alert" });
    control.setAttribute("aria-describedby", `s-${name}-error`);
    // The error sits beside the label, not in it, so the field's accessible name stays its
    // label; aria-describedby reads the error out with it.
    return h("div", { class: "field" }, h("label", { for: control.id }, text, control), errors[name]);
  };
  const banner = h("div", {});
  const form = h("form", { class: "stack panel", novalidate: true, onsubmit: async (ev) => {
    ev.preventDefault();
    banner.replaceChildren();
    Object.values(errors).forEach((e) => e.replaceChildren());
    let body;
    try { body = buildBody(); } catch (e) { return show(e); }
    try {
      const saved = existing
        ? await api("PATCH", `/v1/subscriptions/${existing.id}`, body)
        : await api("POST", "/v1/subscriptions", body);
      if (!existing) flash = { title: `Signing secret of ${saved.id}`, secret: saved.secret };
      if (saved.warnings?.length) flash = { ...flash, warnings: saved.warnings };
      location.hash = `#/subscriptions/${saved.id}`;
    } catch (e) { show(e); }
  } },
  session.role === "admin" ? labelled("tenant", "Tenant", fields.tenant) : null,
  labelled("url", "URL", fields.url),
  labelled("events", "Event types (comma-separated; empty: all)", fields.events),
  labelled("payload", "Payload", fields.payload),
  h("div", { class: "row" },
    labelled("timeout", "Timeout", fields.timeout),
    labelled("max_in_flight", "Max in flight", fields.max_in_flight),
    labelled("rate_limit", "Rate limit (/s)", fields.rate_limit)),
  labelled("via_edge", "Through edge device", fields.via_edge),
  labelled("advanced", "More settings as JSON (signature, retry, headers, auth, tls, amqp…; null clears one)", json),
  h("div", { class: "actions" },
    h("button", { class: "primary", type: "submit" }, existing ? "Save changes" : "Create subscription"),
    link(existing ? `#/subscriptions/${existing.id}` : "#/subscriptions", "Cancel")));

  function show(e) {
    const top = (e.field || "").split(/[.[]/)[0];
    if (errors[top]) errors[top].textContent = `${e.field}: ${e.message}`;
    else if (e.field && ADVANCED_KEYS.includes(top)) errors.advanced.textContent = `${e.field}: ${e.message}`;
    else banner.replaceChildren(errorBox(e));
    (errors[top] ? fields[top] : null)?.focus();
  }

  function buildBody() {
    const body = {};
    const text = (k) => fields[k].value.trim();
    const num = (k) => {
      if (!text(k)) return existing ? null : undefined;
      const n = Number(text(k));
      if (!Number.isFinite(n)) throw Object.assign(new Error("must be a number"), { field: k });
      return n;
    };
    if (!existing && text("tenant")) body.tenant = text("tenant");
    body.url = text("url");
    // Sent when changed only: a type may have a comma in its name, which the field's
    // comma-separated text cannot give back.
    if (!existing || fields.events.value !== fields.events.defaultValue) {
      body.events = text("events") ? text("events").split(",").map((s) => s.trim()).filter(Boolean) : [];
    }
    body.payload = fields.payload.value;
    body.timeout = text("timeout") || (existing ? null : undefined);
    body.max_in_flight = num("max_in_flight");
    body.rate_limit = num("rate_limit");
    body.via_edge = text("via_edge") || (existing ? null : undefined);
    if (json.value.trim()) {
      let extra;
      try { extra = JSON.parse(json.value); } catch (err) {
        throw Object.assign(new Error("not valid JSON: " + err.message), { field: "advanced" });
      }
      if (typeof extra !== "object" || Array.isArray(extra) || extra === null)
        throw Object.assign(new Error("must be a JSON object"), { field: "advanced" });
      for (const [k, v] of Object.entries(extra)) {
        // Settings shown as read carry secrets as "********": sending them back unchanged
        // would overwrite the real ones, so only what was edited is sent — down to the keys
        // within (a header added beside a hidden one sent the hidden one back, refused), and a
        // key taken out is sent as null, which removes it (the API merges, RFC 7396).
        if (existing && JSON.stringify(v) === JSON.stringify(advanced[k])) continue;
        body[k] = existing && k in advanced ? mergeDiff(advanced[k], v, TAGGED.includes(k)) : v;
      }
    }
    for (const k of Object.keys(body)) if (body[k] === undefined) delete body[k];
    return body;
  }
  layout("subscriptions", existing ? `Edit ${existing.id}` : "New subscription", banner, form);
}

// The subscription's settings whose objects carry a tag (`type`, `scheme`, `policy`): one whose
// tag changes is replaced by the API, not merged, so it is sent whole.
const TAGGED = ["auth", "signature", "retry"];

/** The JSON Merge Patch (RFC 7396) that turns `before` into `after`: what changed, down to the
 * keys of objects, and null for a key taken out. `tagged`: a tag that changes sends all of it. */
function mergeDiff(before, after, tagged = false) {
  const object = (x) => x !== null && typeof x === "object" && !Array.isArray(x);
  if (!object(before) || !object(after)) return after;
  if (tagged && ["type", "scheme", "policy"].some((t) => t in after && after[t] !== before[t])) return after;
  const patch = {};
  for (const k of Object.keys(before)) if (!(k in after)) patch[k] = null;
  for (const [k, v] of Object.entries(after)) {
    if (JSON.stringify(v) !== JSON.stringify(before[k])) patch[k] = k in before ? mergeDiff(before[k], v) : v;
  }
  return patch;
}

async function subscriptionDetail(id) {
  const s = await api("GET", `/v1/subscriptions/${encodeURIComponent(id)}`);
  // What the last save said (a secret shown once, the API's warnings) stays above the
  // messages of the actions taken since, which go to `out`.
  const kept = h("div", {});
  const out = h("div", {});
  // Shown again when this page is drawn anew by an action of its own (enable, disable).
  let shown = flash;
  flash = null;
  if (shown) {
    if (shown.secret) kept.append(secretBox(shown.title, shown.secret));
    for (const w of shown.warnings || []) kept.append(h("div", { class: "alert warn", role: "status", "data-warning": "" }, w));
  }
  const attemptsBox = h("div", {});
  const moreAttempts = h("div", {});
  // An ordered subscription's keys held up by a failing or dead-lettered head, each with a skip
  // (what `on_dead_letter: "block"` waits for).
  const ordered = !!s.ordering && s.ordering.mode !== "none";
  const blockedBox = h("div", {});
  const moreBlocked = h("div", {});
  const blockedPages = pager(`/v1/subscriptions/${s.id}/ordering/blocked`, () => ({ limit: 100 }), (loaded, next) => {
    blockedBox.replaceChildren(table(["Key", "State", "Head event", "Waiting behind it", ""], loaded.map((b) =>
      h("tr", { "data-blocked-key": b.key },
        h("td", { class: "mono" }, b.key),
        h("td", {}, stateBadge(b.state)),
        h("td", {}, link(eventHref(b.head_event, s.tenant), b.head_event)),
        h("td", { class: "num" }, fmtNum(b.waiting)),
        h("td", {}, h("button", { type: "button", class: "danger", onclick: async () => {
          // The key is the publisher's: quoted on one line, so it cannot write the question.
          if (!confirm(`Skip the head of key ${JSON.stringify(b.key)}? It is dead-lettered (replayable) and the key's next delivery goes on.`)) return;
          try {
            await api("POST", `/v1/subscriptions/${s.id}/ordering/skip`, { key: b.key, event: b.head_event });
            out.replaceChildren(h("div", { class: "alert ok", role: "status", "data-skip-result": "" }, `Key ${b.key}: its head is skipped.`));
            await blockedPages.reload();
          } catch (e) { out.replaceChildren(errorBox(e)); }
        } }, "Skip head")))),
    "No key is held up."));
    moreBlocked.replaceChildren(next ? h("button", { type: "button", onclick: () => blockedPages.page().catch((e) => moreBlocked.replaceChildren(errorBox(e))) }, "Load more keys") : "");
  });
  const act = (label, fn, cls) => h("button", { type: "button", class: cls, onclick: async () => {
    try { await fn(); } catch (e) { out.replaceChildren(errorBox(e)); }
  } }, label);
  const since = h("input", { id: "recover-since", type: "datetime-local", required: true });
  const all = h("input", { id: "recover-all", type: "checkbox" });
  // One call re-sends so many events at most and says where it stopped (to the millisecond,
  // with why if something stopped it): "Continue" goes on from exactly there — the form's
  // input holds whole minutes, and asked again from the minute, a busy subscription's recover
  // re-sent the same events and stopped in that minute again.
  // Going on, the window ends where the first call's did: a later "now" also took in what
  // was delivered meanwhile (a rewind re-sent it).
  const recoverFrom = async (from, everything, until) => {
    const r = await api("POST", `/v1/subscriptions/${s.id}/recover`, { since: from, until, all: everything });
    const said = h("div", { class: "alert ok", role: "status", "data-recover-result": "" },
      `${r.queued} event(s) queued again.`
      + (r.stopped?.error?.message ? ` Stopped: ${r.stopped.error.message}.` : "")
      + (r.continue_from ? ` It went as far as ${fmtTime(r.continue_from)}.` : "")
      + (r.history_lag ? ` The history was ${r.history_lag} record(s) behind: recover again in a moment for the newest.` : ""));
    if (r.continue_from) {
      said.append(" ", h("button", { type: "button", onclick: () => recoverFrom(r.continue_from, everything, r.until).catch((e) => out.replaceChildren(errorBox(e))) },
        `Continue from ${fmtTime(r.continue_from)}`));
    }
    out.replaceChildren(said);
  };
  const recover = h("form", { class: "row", onsubmit: async (ev) => {
    ev.preventDefault();
    try {
      if (!since.value) throw Object.assign(new Error("choose a time"), { field: "since" });
      await recoverFrom(new Date(since.value).toISOString(), all.checked);
    } catch (e) { out.replaceChildren(errorBox(e)); }
  } }, h("label", { for: "recover-since" }, "Recover since", since),
  h("label", { class: "check", for: "recover-all" }, all, " every event, delivered or not"),
  h("button", { type: "submit" }, "Recover"));
  const health = s.health || {};
  const facts = h("dl", { class: "facts" },
    h("dt", {}, "Tenant"), h("dd", { class: "mono" }, s.tenant),
    h("dt", {}, "URL"), h("dd", {}, s.url),
    h("dt", {}, "Events"), h("dd", {}, (s.events || []).join(", ") || "all"),
    h("dt", {}, "Order"), h("dd", {}, ordered
      ? `per key${s.ordering.key ? ` (${s.ordering.key} when an event has no ordering_key)` : ""}; a dead letter ${s.ordering.on_dead_letter === "block" ? "blocks its key until skipped" : "lets its key go on"}`
      : "none"),
    h("dt", {}, "State"), h("dd", {}, s.enabled === false ? badge("disabled", "bad") : badge("enabled", "ok"),
      s.disabled_reason ? h("span", { class: "muted" }, " " + s.disabled_reason) : ""),
    h("dt", {}, "Breaker"), h("dd", { "data-breaker": health.breaker }, badge((health.breaker || "—").replace("_", " "), health.breaker === "closed" ? "ok" : "bad")),
    h("dt", {}, "In flight"), h("dd", {}, `${health.in_flight ?? "—"} of ${health.max_in_flight ?? "—"}`),
    h("dt", {}, "Latency (recent mean)"), h("dd", {}, Number.isFinite(health.latency_ms) ? `${fmtNum(health.latency_ms, 1)} ms` : "—"),
    h("dt", {}, "Failures in a row"), h("dd", {}, fmtNum(health.consecutive_failures)),
    h("dt", {}, "Success (last 100 attempts)"), h("dd", { id: "success-ratio" }, "…"));
  layout("subscriptions", s.id, kept, out,
    h("div", { class: "actions" },
      link(`#/subscriptions/${s.id}/edit`, "Edit"),
      act(s.enabled === false ? "Enable" : "Disable", async () => {
        // Asked first: what comes for a disabled subscription is dead-lettered at once.
        if (s.enabled !== false && !confirm(`Disable ${s.id}? Deliveries that come for it are dead-lettered until it is enabled again (replayable).`)) return;
        await api("PATCH", `/v1/subscriptions/${s.id}`, { enabled: s.enabled === false });
        flash = shown;
        await route();
      }),
      act("Rotate secret", async () => {
        const single = s.signature && s.signature.scheme === "hmac";
        if (!confirm(single
          ? "Rotate the signing secret? Its hmac header carries one signature: the new secret signs at once, and receivers holding the old one fail until they have the new."
          : "Rotate the signing secret? The old one keeps signing for the overlap period.")) return;
        const r = await api("POST", `/v1/subscriptions/${s.id}/rotate-secret`, {});
        shown = { title: `New signing secret of ${s.id}`, secret: r.secret, warnings: r.warnings };
        kept.replaceChildren(secretBox(shown.title, shown.secret),
          ...(r.warnings || []).map((w) => h("div", { class: "alert warn", role: "status", "data-warning": "" }, w)));
        out.replaceChildren();
      }),
      act("Send test event", async () => {
        const r = await api("POST", `/v1/subscriptions/${s.id}/test`);
        out.replaceChildren(h("div", { class: "alert " + (r.delivered ? "ok" : "error"), role: "status", "data-test-result": "" },
          r.delivered ? `Test delivered: HTTP ${r.status ?? "ok"} in ${r.latency_ms} ms.`
            : `Test failed${r.status ? `: HTTP ${r.status}` : ""}${r.error ? ` — ${r.error}` : ""}.`));
      }),
      link(`#/dlq?subscription=${encodeURIComponent(s.id)}`, "Dead letters"),
      act("Delete", async () => {
        if (!confirm(`Delete ${s.id}? Its pending deliveries are dropped.`)) return;
        await api("DELETE", `/v1/subscriptions/${s.id}`);
        location.hash = "#/subscriptions";
      }, "danger")),
    h("div", { class: "panel" }, facts),
    h("div", { class: "panel" }, recover),
    ordered ? h("h2", {}, "Keys held up") : null, ordered ? blockedBox : null, ordered ? moreBlocked : null,
    h("h2", {}, "Recent attempts"), attemptsBox, moreAttempts);
  if (ordered) blockedPages.page().catch((e) => blockedBox.replaceChildren(errorBox(e)));
  // The ratio is of the newest page; "Load more" goes back further.
  let rated = false;
  const attempts = pager("/v1/attempts", () => ({ subscription: s.id, limit: 100 }), (loaded, next, _, added) => {
    if (!rated) {
      rated = true;
      const ok = loaded.filter((a) => a.outcome === "delivered").length;
      document.getElementById("success-ratio").textContent = loaded.length ? `${fmtNum((ok / loaded.length) * 100, 1)} % of ${loaded.length}` : "no attempts yet";
    }
    drawAttempts(attemptsBox, loaded, added, true);
    moreAttempts.replaceChildren(next ? h("button", { type: "button", onclick: () => attempts.page().catch(failed) }, "Load more") : "");
  });
  const failed = (e) => moreAttempts.replaceChildren(errorBox(e));
  try {
    await attempts.page();
  } catch (e) {
    attemptsBox.replaceChildren(errorBox(e));
  }
}

// A page's attempts added under those drawn: drawn anew, the responses opened in them closed.
function drawAttempts(box, loaded, added, showEvent) {
  const rows = box.querySelector("tbody");
  if (rows && added.length < loaded.length) rows.append(...attemptsTable(added, showEvent).querySelectorAll("tbody > tr"));
  else box.replaceChildren(attemptsTable(loaded, showEvent));
}

function attemptsTable(items, showEvent) {
  return table(["When", showEvent ? "Event" : "Subscription", "#", "Outcome", "Status", "Duration", "Detail"], items.map((a) => {
    const response = a.response
      ? h("details", {}, h("summary", {}, "Response"),
        h("pre", {}, Object.entries(a.response.headers || {}).map(([k, v]) => `${k}: ${v}`).join("\n")),
        a.response.body_encoding === "base64" ? h("div", { class: "muted" }, "Not text: the body's bytes in base64") : "",
        h("pre", { "data-response-body": "" }, a.response.body || ""))
      : "";
    return h("tr", { "data-attempt": a.id, "data-outcome": a.outcome },
      h("td", {}, fmtTime(a.at)),
      h("td", {}, showEvent ? link(eventHref(a.event_id, a.tenant), a.event_id) : link(`#/subscriptions/${a.subscription}`, a.subscription),
        h("div", { class: "muted" }, a.event)),
      h("td", { class: "num" }, a.attempt),
      h("td", {}, outcomeBadge(a.outcome), a.next_attempt_at ? h("div", { class: "muted" }, "next " + fmtTime(a.next_attempt_at)) : ""),
      h("td", { class: "num" }, a.status ?? "—"),
      h("td", { class: "num" }, `${a.duration_ms} ms`),
      h("td", {}, a.error ? h("div", { class: "wrap" }, a.error) : "", response));
  }), "No attempts on record yet.");
}

// ---------- Events and attempts ----------

// Event ids are unique within a tenant: the admin names the tenant (default: "default"); a
// tenant key or portal link is its own tenant.
const eventHref = (id, tenant) =>
  `#/events/${encodeURIComponent(id)}` + (session.role === "admin" && tenant ? `?tenant=${encodeURIComponent(tenant)}` : "");

async function events(id) {
  if (id) return eventDetail(id);
  const find = h("input", { id: "event-id", type: "search", placeholder: "evt_… or your own id", required: true });
  const type = h("input", { id: "event-type", type: "text", placeholder: "any type" });
  const admin = session.role === "admin";
  const tenant = h("input", { id: "event-tenant", type: "text", value: hashParams().get("tenant") || "", placeholder: "default" });
  const list = h("div", {});
  const search = h("form", { class: "row panel", role: "search", onsubmit: (ev) => {
    ev.preventDefault();
    if (find.value.trim()) location.hash = eventHref(find.value.trim(), tenant.value.trim() || "default");
  } }, h("label", { for: "event-id" }, "Find an event by id", find),
  admin ? h("label", { for: "event-tenant" }, "Tenant", tenant) : null,
  h("button", { class: "primary", type: "submit" }, "Find"));
  const filter = h("form", { class: "row", onsubmit: (ev) => { ev.preventDefault(); reload().catch(refused); } },
    h("label", { for: "event-type" }, "Type", type), h("button", { type: "submit" }, "Filter"));
  tenant.addEventListener("change", () => reload().catch(refused));
  const more = h("div", {});
  const refused = unreadList(list, more);
  layout("events", "Events", search, h("h2", {}, "Recent events"), filter, list, more);
  // A page of a rare type may be empty and still say where to go on (see `pager`).
  const { page, reload } = pager("/v1/events", () => ({
    type: type.value.trim(), limit: 50, tenant: admin ? tenant.value.trim() : undefined,
  }), (loaded, next, used) => {
    list.replaceChildren(table(["Accepted", "Event", "Type", "Tenant"], loaded.map((e) =>
      h("tr", { "data-event": e.id },
        h("td", {}, fmtTime(e.accepted_at)),
        h("td", {}, link(eventHref(e.id, e.tenant), e.id)),
        h("td", {}, e.type), h("td", { class: "mono" }, e.tenant))),
    next ? "None found yet: “Load more” looks further." : used.type ? "No event of this type on record." :
      // The admin reads one tenant's events at a time: say whose list is empty.
      admin ? `No events of tenant “${used.tenant || "default"}” on record: name another tenant above.` :
      "No events on record yet. Events published from now on show up here."));
    more.replaceChildren(next ? h("button", { type: "button", onclick: () => page().catch(failed) }, "Load more") : "");
  });
  const failed = (e) => more.replaceChildren(errorBox(e));
  await reload();
}

async function eventDetail(id) {
  const tenant = session.role === "admin" ? hashParams().get("tenant") || undefined : undefined;
  let e;
  try {
    e = await api("GET", `/v1/events/${encodeURIComponent(id)}` + q({ tenant }));
  } catch (err) {
    if (err.status !== 404) throw err;
    layout("events", "Event not found", h("div", { class: "alert error", role: "alert" },
      `No event ${id} is on record for you.`), link("#/events", "Back to events"));
    return;
  }
  const out = h("div", {});
  const attempts = h("div", {});
  const more = h("div", {});
  const deliveries = h("div", {});
  // Queued, not sent: the rows below show what became of it. None queued (every subscription
  // it matched since deleted or disabled) is said as such, not as a success.
  const resend = (subscription) => async () => {
    try {
      const r = await api("POST", `/v1/events/${encodeURIComponent(e.id)}/resend`, { subscription, tenant });
      out.replaceChildren(r.queued
        ? h("div", { class: "alert ok", role: "status", "data-resend-result": "" }, `Queued again for ${r.queued} subscription(s).`)
        : h("div", { class: "alert warn", role: "status", "data-resend-result": "" },
          "Nothing was queued: every subscription this event matched is deleted or disabled."));
      if (r.queued) await refresh();
    } catch (err) { out.replaceChildren(errorBox(err)); }
  };
  const drawDeliveries = (list) => deliveries.replaceChildren(
    table(["Subscription", "State", "Attempts", "Last attempt", "Next attempt", ""], list.map((d) =>
      h("tr", { "data-delivery": d.subscription, "data-state": d.state },
        h("td", {}, link(`#/subscriptions/${d.subscription}`, d.subscription)),
        h("td", {}, stateBadge(d.state)),
        h("td", { class: "num" }, d.attempts),
        h("td", {}, fmtTime(d.last_attempt_at)),
        h("td", {}, fmtTime(d.next_attempt_at)),
        h("td", {}, h("button", { type: "button", onclick: resend(d.subscription) }, "Resend")))),
    "This event matched no subscription."));
  drawDeliveries(e.deliveries);
  layout("events", e.id, out,
    h("div", { class: "panel" }, h("dl", { class: "facts" },
      h("dt", {}, "Type"), h("dd", {}, e.type),
      h("dt", {}, "Tenant"), h("dd", { class: "mono" }, e.tenant),
      h("dt", {}, "Accepted"), h("dd", {}, fmtTime(e.accepted_at))),
    lazyJson("Data", e.data)),
    h("div", { class: "actions" }, h("button", { type: "button", onclick: resend() }, "Resend to every subscription")),
    h("h2", {}, "Deliveries"), deliveries,
    h("h2", {}, "Attempts"), attempts, more);
  // After a resend: the deliveries' states and the attempts as they are now.
  const refresh = async () => {
    drawDeliveries((await api("GET", `/v1/events/${encodeURIComponent(e.id)}` + q({ tenant }))).deliveries);
    await reload();
  };
  const { page, reload } = pager("/v1/attempts", () => ({ event: e.id, tenant, limit: 100 }), (loaded, next, _, added) => {
    drawAttempts(attempts, loaded, added, false);
    more.replaceChildren(next ? h("button", { type: "button", onclick: () => page().catch(failed) }, "Load more") : "");
  });
  const failed = (err) => more.replaceChildren(errorBox(err));
  await page();
}

// Bytes of a large JSON value drawn at first: an event's data may be megabytes, and drawn
// whole (on every visit, opened or not) it froze the tab.
const DRAWN_AT_FIRST = 256 << 10;

/** `value` as JSON under a `summary`, drawn when first opened, its first part at first. */
function lazyJson(summary, value) {
  const details = h("details", {}, h("summary", {}, summary));
  details.addEventListener("toggle", () => {
    if (!details.open || details.querySelector("pre")) return;
    const text = JSON.stringify(value, null, 2) ?? "null";
    const pre = h("pre", { "data-event-data": "" }, text.length > DRAWN_AT_FIRST ? text.slice(0, DRAWN_AT_FIRST) + "\n…" : text);
    details.append(pre);
    if (text.length > DRAWN_AT_FIRST) {
      const all = h("button", { type: "button", onclick: () => { pre.textContent = text; all.remove(); } },
        `Show all (${fmtNum(text.length / 1024)} KiB)`);
      details.append(all);
    }
  });
  return details;
}

// ---------- Dead letters ----------

async function deadLetters() {
  const params = hashParams();
  const subscription = h("input", { id: "dlq-subscription", type: "text", value: params.get("subscription") || "", placeholder: "any" });
  const tenant = h("input", { id: "dlq-tenant", type: "text", placeholder: "any" });
  const out = h("div", {});
  const list = h("div", {});
  const actions = h("div", { class: "actions" });
  const filter = h("form", { class: "row panel", onsubmit: (ev) => { ev.preventDefault(); reload().catch(refused); } },
    h("label", { for: "dlq-subscription" }, "Subscription", subscription),
    session.role === "admin" ? h("label", { for: "dlq-tenant" }, "Tenant", tenant) : null,
    h("button", { type: "submit" }, "Filter"));
  layout("dlq", "Dead letters", filter, out, actions, list);
  const report = (r) => out.replaceChildren(h("div", { class: "alert ok", role: "status", "data-replay-report": "" },
    `Replayed ${r.replayed.length}` + (r.skipped.length ? `; skipped ${r.skipped.length} (${[...new Set(r.skipped.map((s) => s.reason.replace("_", " ")))].join(", ")})` : "") + "."));
  const more = h("div", {});
  list.after(more);
  const refused = unreadList(list, more, actions);
  // What is ticked, kept while pages are added (each redraw builds the rows anew: ticks made
  // before "Load more" were lost, and a replay took only those made after); a reload (a new
  // filter, a replay done) starts again.
  const chosen = new Map();
  // A page may end short of its limit and still say where to go on: the API looks at so many
  // records a page (see `pager`).
  const { page, reload: reloadPages } = pager("/v1/dlq", () => ({
    subscription: subscription.value.trim(), tenant: tenant.value.trim(), limit: 500,
  }), (loaded, next, used) => {
    list.replaceChildren(table(["", "Event", "Subscription", "Attempts", "Last error", "Last attempt"], loaded.map((d) => {
      const box = h("input", { type: "checkbox", value: d.id, "aria-label": `Select ${d.event_id}`, checked: chosen.has(d.id),
        onchange: (ev) => { if (ev.target.checked) chosen.set(d.id, d); else chosen.delete(d.id); } });
      return h("tr", { "data-dead-letter": d.id },
        h("td", {}, box),
        h("td", {}, link(eventHref(d.event_id, d.tenant), d.event_id), h("div", { class: "muted" }, d.event)),
        h("td", {}, link(`#/subscriptions/${d.subscription}`, d.subscription)),
        h("td", { class: "num" }, d.attempts),
        h("td", { class: "wrap" }, d.last_status ? `HTTP ${d.last_status} · ` : "", d.last_error),
        h("td", {}, fmtTime(d.last_attempt_at)));
    }), next ? "None found yet: “Load more” looks further." :
      "No dead letters. Deliveries that exhaust their retries are parked here."));
    more.replaceChildren(next ? h("button", { type: "button", onclick: () => page().catch(failed) }, "Load more") : "");
    const replay = async (body) => {
      try { report(await api("POST", "/v1/dlq/replay", body)); await reload(); } catch (e) { out.replaceChildren(errorBox(e)); }
    };
    actions.replaceChildren(
      h("button", { type: "button", class: "primary", disabled: !loaded.length, onclick: () => {
        const picked = [...chosen.values()];
        if (!picked.length) return out.replaceChildren(errorBox({ message: "Select the dead letters to replay first." }));
        // Entries of one subscription are looked for in its partition alone.
        const subs = [...new Set(picked.map((d) => d.subscription))];
        return replay({ ids: picked.map((d) => d.id), subscription: subs.length === 1 ? subs[0] : undefined });
      } }, "Replay selected"),
      // The subscription whose list is shown, not what has been typed since; offered while
      // more may follow too (the first pages looked at can be empty).
      used.subscription ? h("button", { type: "button", disabled: !loaded.length && !next, onclick: () => {
        if (confirm(`Replay every dead letter of ${used.subscription}?`)) return replay({ subscription: used.subscription });
      } }, "Replay all of this subscription") : "");
  });
  const failed = (e) => more.replaceChildren(errorBox(e));
  const reload = () => { chosen.clear(); return reloadPages(); };
  await reload();
}

// ---------- Edge devices ----------

async function edgeDevices() {
  const out = h("div", {});
  const list = h("div", {});
  const name = h("input", { id: "edge-name", type: "text", required: true, maxlength: 200 });
  const tenant = h("input", { id: "edge-tenant", type: "text", placeholder: "default" });
  const create = h("form", { class: "row panel", onsubmit: async (ev) => {
    ev.preventDefault();
    try {
      const d = await api("POST", "/v1/edge-devices", { name: name.value, tenant: tenant.value.trim() || undefined });
      out.replaceChildren(secretBox(`Token of edge device ${d.id}`, d.token));
      name.value = "";
      await load();
    } catch (e) { out.replaceChildren(errorBox(e)); }
  } }, h("label", { for: "edge-name" }, "Device name", name), h("label", { for: "edge-tenant" }, "Tenant", tenant),
  h("button", { class: "primary", type: "submit" }, "Create device"));
  layout("edge", "Edge devices", create, out, list);
  async function load() {
    const r = await api("GET", "/v1/edge-devices");
    list.replaceChildren(table(["Device", "Tenant", "Created", "Agent", ""], r.items.map((d) =>
      h("tr", { "data-device": d.id },
        h("td", {}, h("strong", {}, d.name), h("div", { class: "mono muted" }, d.id)),
        h("td", { class: "mono" }, d.tenant),
        h("td", {}, fmtTime(d.created_at)),
        h("td", {}, d.connected ? badge("connected", "ok") : badge("not connected", "")),
        h("td", {}, h("button", { type: "button", class: "danger", onclick: async () => {
          // The name is the tenant's: quoted on one line, so it cannot write the question.
          if (!confirm(`Delete edge device ${JSON.stringify(d.name)} (${d.id})? Its token stops working and its agent is disconnected.`)) return;
          try { await api("DELETE", `/v1/edge-devices/${d.id}`); await load(); } catch (e) { out.replaceChildren(errorBox(e)); }
        } }, "Delete")))),
    "No edge devices. An edge device delivers from inside a customer's network."));
  }
  await load();
}

// ---------- Event types: the catalogue (the admin edits it; tenants read what they can subscribe to) ----------

async function eventTypes() {
  const admin = session.role === "admin";
  const out = h("div", {});
  const list = h("div", {});
  const forms = [];
  if (admin) {
    const name = h("input", { id: "et-name", type: "text", required: true, maxlength: 255, placeholder: "order.created" });
    const description = h("input", { id: "et-description", type: "text", maxlength: 4096 });
    const schema = h("textarea", { id: "et-schema", spellcheck: "false", placeholder: '{"type": "object", "required": ["id"]}' });
    const example = h("textarea", { id: "et-example", spellcheck: "false", placeholder: '{"id": 1001}' });
    const validate = h("input", { id: "et-validate", type: "checkbox" });
    // Text that is not JSON is named like the API names a bad field.
    const parsed = (el, field) => {
      if (!el.value.trim()) return undefined;
      try { return JSON.parse(el.value); } catch (e) { throw Object.assign(new Error(`not JSON (${e.message})`), { field }); }
    };
    forms.push(h("form", { class: "stack panel", onsubmit: async (ev) => {
      ev.preventDefault();
      try {
        const body = { name: name.value.trim(), description: description.value,
          schema: parsed(schema, "schema"), example: parsed(example, "example"), validate: validate.checked };
        const t = await api("POST", "/v1/event-types", body);
        out.replaceChildren(h("div", { class: "alert ok", role: "status" }, `Event type ${t.name} added`));
        ev.target.reset();
        await load();
      } catch (e) { out.replaceChildren(errorBox(e)); }
    } },
    h("div", { class: "row" }, h("label", { for: "et-name" }, "Name", name), h("label", { for: "et-description" }, "Description", description)),
    h("label", { for: "et-schema" }, "JSON Schema of data (optional)", schema),
    h("label", { for: "et-example" }, "Example data (optional; must fit the schema)", example),
    h("label", { for: "et-validate", class: "check" }, validate, "Refuse events whose data does not fit the schema"),
    h("div", {}, h("button", { class: "primary", type: "submit" }, "Add event type"))));
  }
  layout("event-types", "Event types", ...forms, out, list);

  async function load() {
    const { items } = await api("GET", "/v1/event-types");
    const json = (v) => h("pre", {}, JSON.stringify(v, null, 2));
    const act = (label, run) => h("button", { type: "button", onclick: async () => {
      try { await run(); await load(); } catch (e) { out.replaceChildren(errorBox(e)); }
    } }, label);
    list.replaceChildren(table(["Event type", "Schema", "Example", ...(admin ? [""] : [])], items.map((t) =>
      h("tr", { "data-event-type": t.name },
        h("td", {}, h("strong", { class: "mono" }, t.name), " ",
          t.deprecated ? badge("deprecated", "warn") : "", t.validate ? badge("validated", "ok") : "",
          h("div", { class: "muted" }, t.description || "")),
        h("td", {}, t.schema ? h("details", {}, h("summary", {}, "Schema"), json(t.schema)) : h("span", { class: "muted" }, "none")),
        h("td", {}, t.example !== undefined ? json(t.example) : h("span", { class: "muted" }, "none")),
        ...(admin ? [h("td", {}, h("div", { class: "actions" },
          act(t.deprecated ? "Undeprecate" : "Deprecate",
            () => api("PATCH", `/v1/event-types/${encodeURIComponent(t.name)}`, { deprecated: !t.deprecated })),
          h("button", { type: "button", class: "danger", onclick: async () => {
            if (!confirm(`Remove ${t.name} from the catalogue? Subscriptions and events naming it are not touched.`)) return;
            try { await api("DELETE", `/v1/event-types/${encodeURIComponent(t.name)}`); await load(); } catch (e) { out.replaceChildren(errorBox(e)); }
          } }, "Remove")))] : []))),
    admin ? "No event types yet: add the first one above." : "No event types are published here yet."));
  }
  await load();
}

// ---------- start ----------

// A portal link carries its token in the fragment: keep it for this tab, then take it out of
// the address bar and history at once. Only the portal signs in so: a console link with a key
// in it would sign the visitor in as whoever made the link (a login forgery). Only a portal
// link (`hp.`, a week at most) signs in so: an address carrying a tenant's API key or the
// admin token would sign the visitor in as that key's owner unnoticed. Taken at every change
// of address, not only when the page loads: a link opened where the portal already shows (an
// embedding app switching its iframe to another organisation's link, a link pasted into the
// tab) changes only the fragment, and the page went on as the tenant before.
function takeLinkToken() {
  const m = location.hash.match(/(?:^#|&)token=([^&]+)/);
  if (!m) return;
  let token = "";
  try { token = decodeURIComponent(m[1]); } catch { /* a damaged link: no token */ }
  if (PORTAL && token.startsWith("hp.")) {
    closeSignInOver();
    session.token = token;
    session.role = null;
    flash = null;
    stored.set(session.token);
  }
  history.replaceState(null, "", location.pathname + "#/subscriptions");
}

(function start() {
  takeLinkToken();
  window.addEventListener("hashchange", () => { takeLinkToken(); route(); });
  route();
})();

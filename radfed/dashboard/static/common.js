/* radfed dashboard: helpers shared by the pages.
 * Text from the store is untrusted: it only ever reaches the page through textContent or
 * attribute values, never as HTML. */
"use strict";

const RF = {};

/** An element; `text` children become text nodes, never HTML. */
RF.el = function (tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "className") node.className = value;
    else if (key === "text") node.textContent = String(value);
    else if (key.startsWith("on") || key === "style") throw new Error("not allowed: " + key);
    else node.setAttribute(key, String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
};

/** An SVG element with the given attributes (values as text). */
RF.svg = function (tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key.startsWith("on") || key === "style") throw new Error("not allowed: " + key);
    node.setAttribute(key, String(value));
  }
  return node;
};

RF.clear = function (node) {
  while (node.firstChild) node.removeChild(node.firstChild);
  return node;
};

RF.byId = (id) => document.getElementById(id);

RF.setText = function (id, text) {
  const node = RF.byId(id);
  if (node && node.textContent !== String(text)) node.textContent = String(text);
  return node;
};

/** A number for people: `digits` decimals (3), a real minus sign, "–" when missing. */
RF.num = function (value, digits) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (typeof value !== "number") return String(value);
  return value.toFixed(digits === undefined ? 3 : digits).replace("-", "−");
};

/** A count (cases, rounds): as it is, "–" when missing. */
RF.count = function (value) {
  return value === null || value === undefined ? "–" : String(value);
};

/** A signed difference with its interval: "−0.315 [−0.445, −0.171]". */
RF.interval = function (d) {
  if (!d || d.value === null || d.value === undefined) return "–";
  const sign = d.value > 0 ? "+" : "";
  const body = sign + RF.num(d.value);
  if (d.low === null || d.low === undefined || d.high === null || d.high === undefined) {
    return body + " (no interval)";
  }
  return body + " [" + RF.num(d.low) + ", " + RF.num(d.high) + "]";
};

/** A stored time (ISO 8601) in the reader's time zone, "2026-12-06 12:12:10". */
RF.time = function (iso, withSeconds) {
  if (!iso) return "–";
  const t = new Date(iso);
  if (Number.isNaN(t.getTime())) return String(iso);
  const pad = (n) => String(n).padStart(2, "0");
  const day = t.getFullYear() + "-" + pad(t.getMonth() + 1) + "-" + pad(t.getDate());
  const clock = pad(t.getHours()) + ":" + pad(t.getMinutes());
  return day + " " + clock + (withSeconds ? ":" + pad(t.getSeconds()) : "");
};

/** A CSS class for a free-text state ("within margin" -> "within-margin"). */
RF.slug = (text) => String(text || "").toLowerCase().replace(/[^a-z0-9]+/g, "-");

RF.badge = function (text, kind) {
  return RF.el("span", { className: "badge " + RF.slug(kind || text), text: text });
};

/** JSON from the dashboard's own API; the session cookie goes with it. */
RF.getJson = async function (url) {
  const response = await fetch(url, {
    credentials: "same-origin",
    cache: "no-store",
    headers: { Accept: "application/json" },
  });
  if (!response.ok) {
    let message = "HTTP " + response.status;
    try {
      const body = await response.json();
      if (body && body.error) message = body.error;
    } catch (ignored) {
      /* not JSON */
    }
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return response.json();
};

/** Take ?token= out of the address bar once the page has its session cookie. */
// obj[key] for the object's own keys only: a site named "constructor" or "__proto__" must
// not reach Object.prototype (the API's objects are keyed by names sites choose).
RF.own = function (obj, key) {
  return obj != null && Object.hasOwn(obj, key) ? obj[key] : undefined;
};

RF.forgetToken = function () {
  const url = new URL(window.location.href);
  if (url.searchParams.has("token")) {
    url.searchParams.delete("token");
    window.history.replaceState(null, "", url.pathname + url.search + url.hash);
  }
};

RF.problem = function (message) {
  const box = RF.byId("problem");
  if (!box) return;
  box.classList.toggle("hidden", !message);
  box.textContent = message || "";
};

RF.live = function (text, live) {
  const node = RF.setText("live", text);
  if (node) node.classList.toggle("live", Boolean(live));
};

/** Verdict counts in words, the held-out verdicts of the bias report. */
RF.verdictWords = function (counts) {
  if (!counts || Object.keys(counts).length === 0) return "no report yet";
  const f = counts.flagged || 0;
  const i = counts.inconclusive || 0;
  const w = counts["within margin"] || 0;
  return f + " flagged, " + i + " inconclusive, " + w + " within margin";
};

RF.pageRunId = () => document.body.dataset.runId;

RF.runHref = (id) => "/runs/" + encodeURIComponent(id);
RF.apiRun = (id) => "/api/runs/" + encodeURIComponent(id);

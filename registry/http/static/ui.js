// Shared helpers of the registry's pages: JSON fetches, CSRF-carrying requests,
// local times with UTC on hover, and safe DOM building (text only, never HTML).
"use strict";
const FF = (() => {
  const csrf = () => (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  class ApiError extends Error {
    constructor(status, message, field) { super(message); this.status = status; this.field = field; }
  }
  async function answer(r) {
    let body = null;
    try { body = await r.json(); } catch (e) { body = null; }
    if (!r.ok) {
      const err = body && body.error ? body.error : {};
      const hint = r.status === 401 ? " (sign in to see this)" : "";
      throw new ApiError(r.status, (err.message || r.statusText) + hint, err.field);
    }
    return body;
  }
  async function getJson(url) {
    return answer(await fetch(url, { cache: "no-store", credentials: "same-origin" }));
  }
  // A state-changing API call: the session's CSRF token rides in the header.
  async function send(method, url, body) {
    const opts = { method, credentials: "same-origin", headers: { "X-CSRF-Token": csrf() } };
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    return answer(await fetch(url, opts));
  }
  const pad = (n) => String(n).padStart(2, "0");
  const utc = (t) => new Date(t * 1000).toISOString().slice(0, 19).replace("T", " ") + " UTC";
  function local(t) {
    const d = new Date(t * 1000);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }
  // <time> in the viewer's timezone, the UTC value in its title (hover) and datetime.
  function time(t) {
    if (t == null) return document.createTextNode("-");
    const el = document.createElement("time");
    el.dateTime = new Date(t * 1000).toISOString();
    el.title = utc(t);
    el.textContent = local(t);
    return el;
  }
  function localizeTimes(root) {
    (root || document).querySelectorAll("time[data-ts]").forEach((el) => {
      const t = Number(el.dataset.ts);
      el.title = utc(t);
      el.textContent = local(t);
    });
  }
  // el("td", {className: "num"}, "text", node, ...): strings become text nodes.
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "dataset") Object.assign(e.dataset, v);
      else if (k in e) e[k] = v;
      else e.setAttribute(k, v);
    }
    for (const c of children) {
      if (c == null) continue;
      e.appendChild(typeof c === "object" ? c : document.createTextNode(String(c)));
    }
    return e;
  }
  const chip = (v) => el("span", { className: "chip " + String(v) }, v);
  // Fill a <tbody> with one row per item; cols: functions item -> text | node, or
  // [function, "num"] for a right-aligned cell.
  function fill(body, rows, cols, empty) {
    if (typeof body === "string") body = document.getElementById(body);
    const out = rows.map((r) => el("tr", {}, ...cols.map((c) => {
      const [get, cls] = Array.isArray(c) ? c : [c, ""];
      const v = get(r);
      return el("td", { className: cls || "" }, v == null || v === "" ? "-" : v);
    })));
    if (!out.length) out.push(el("tr", {}, el("td", { colSpan: cols.length, className: "empty" }, empty)));
    body.replaceChildren(...out);
  }
  // Run fn now and every ms; the status element says when it last worked.
  function poll(fn, ms, statusId) {
    const status = document.getElementById(statusId || "refresh");
    async function tick() {
      try {
        await fn();
        if (status) { status.className = "status"; status.textContent = "updated " + new Date().toLocaleTimeString(); }
      } catch (e) {
        if (status) { status.className = "status failed"; status.textContent = "refresh failed: " + e.message; }
      } finally {
        setTimeout(tick, ms);
      }
    }
    tick();
  }
  const fmt = (n, digits) => n == null ? "-" : Number(n).toLocaleString(undefined, { maximumFractionDigits: digits == null ? 0 : digits });
  const q = (params) => new URLSearchParams(Object.entries(params).filter(([, v]) => v != null && v !== "")).toString();
  const VEHICLES = ["bicycle", "car", "motorcycle", "bus", "truck"];
  document.addEventListener("DOMContentLoaded", () => localizeTimes());
  return { ApiError, getJson, send, time, localizeTimes, el, chip, fill, poll, fmt, q, utc, local, VEHICLES, csrf };
})();

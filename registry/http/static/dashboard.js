// Dashboard: counts today / last hour / a chosen range, flow over time, class mix,
// speeds, busiest lines and zones (GET /api/series), and fleet health (GET
// /api/devices, /api/rollouts, /api/drift/verdicts); re-read when the live stream
// (/api/live, Server-Sent Events) says something changed, else polled every 2 s and 5 s.
// Each number's element carries the API URL it came from (data-source).
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const MIN = 60, HOUR = 3600, DAY = 86400;
  let range = null;  // {from, to} epoch seconds, or null: the last hour, moving
  let chart = null;

  const span = () => range || { from: Date.now() / 1000 - HOUR, to: Date.now() / 1000 };
  // The flow chart's bucket, and a coarser one for per-line tables (which would
  // otherwise ask for more points than the API gives at fleet scale).
  const flowStep = (s) => (s <= 6 * HOUR ? "minute" : s <= 14 * DAY ? "hour" : "day");
  const tableStep = (s) => (s <= 7 * DAY ? "hour" : "day");
  const series = (params) => "/api/series?" + FF.q(params);
  const split = (res) => {  // people and vehicles from a group=class answer
    let people = 0, vehicles = 0;
    for (const s of res.series) {
      const n = s.total.in + s.total.out;
      if (s.key.class === "person") people += n; else if (FF.VEHICLES.includes(s.key.class)) vehicles += n;
    }
    return [people, vehicles];
  };
  // One poll asks each distinct URL once (the hour tile, the range tile and the class
  // table share theirs while the range is the last hour).
  let asked = new Map();
  const once = (url) => { if (!asked.has(url)) asked.set(url, FF.getJson(url)); return asked.get(url); };
  async function tile(url, ids) {
    const [p, v] = split(await once(url));
    $(ids[0]).textContent = FF.fmt(p); $(ids[0]).dataset.source = url; $(ids[0]).dataset.value = p;
    $(ids[1]).textContent = FF.fmt(v); $(ids[1]).dataset.source = url; $(ids[1]).dataset.value = v;
  }

  async function counts() {
    const now = Math.floor(Date.now() / 1000);
    const midnight = new Date(); midnight.setHours(0, 0, 0, 0);
    const { from, to } = span();
    const rf = Math.floor(from), rt = Math.ceil(to);
    const step = flowStep(rt - rf), tstep = tableStep(rt - rf);
    const rangeUrl = series({ kind: "lines", step: "minute", from: rf, to: rt, group: "class" });
    const classUrl = rt - rf <= 2 * DAY ? rangeUrl : series({ kind: "lines", step: tstep, from: rf, to: rt, group: "class" });
    asked = new Map();
    const [, , , flow, classes, lines, zones, speeds] = await Promise.all([
      tile(series({ kind: "lines", step: "hour", from: Math.floor(midnight / 1000), to: now, group: "class" }), ["people-today", "vehicles-today"]),
      tile(series({ kind: "lines", step: "minute", from: now - HOUR, to: now, group: "class" }), ["people-hour", "vehicles-hour"]),
      tile(classUrl, ["people-range", "vehicles-range"]),
      FF.getJson(series({ kind: "lines", step, from: rf, to: rt })),
      once(classUrl),
      FF.getJson(series({ kind: "lines", step: tstep, from: rf, to: rt, group: "device,camera,line" })),
      FF.getJson(series({ kind: "zones", step: tstep, from: rf, to: rt, group: "device,camera,zone" })),
      FF.getJson(series({ kind: "speeds", step: tstep, from: rf, to: rt, group: "device,camera,line" })),
    ]);
    document.querySelectorAll(".range-label").forEach((e) => { e.textContent = range ? `${FF.local(rf)} – ${FF.local(rt)}` : "last hour"; });
    $("flow-step").textContent = step;
    drawFlow(flow, step);
    const total = classes.series.reduce((a, s) => a + s.total.in + s.total.out, 0) || 1;
    FF.fill("classes", classes.series.filter((s) => s.total.in + s.total.out).sort((a, b) => (b.total.in + b.total.out) - (a.total.in + a.total.out)), [
      (s) => s.key.class, [(s) => FF.fmt(s.total.in), "num"], [(s) => FF.fmt(s.total.out), "num"],
      (s) => FF.el("div", { className: "bar", style: `width:${(100 * (s.total.in + s.total.out)) / total}%`, title: `${Math.round((100 * (s.total.in + s.total.out)) / total)}%` }),
    ], "nothing counted in this range");
    const devLink = (k) => FF.el("a", { href: "/devices/" + encodeURIComponent(k.device) }, k.device);
    FF.fill("busiest-lines", lines.series.filter((s) => s.total.in + s.total.out).sort((a, b) => (b.total.in + b.total.out) - (a.total.in + a.total.out)).slice(0, 10), [
      (s) => devLink(s.key), (s) => s.key.camera, (s) => s.key.line, [(s) => FF.fmt(s.total.in), "num"], [(s) => FF.fmt(s.total.out), "num"],
    ], "no line crossings in this range");
    FF.fill("busiest-zones", zones.series.filter((s) => s.total.entries).sort((a, b) => b.total.entries - a.total.entries).slice(0, 10), [
      (s) => devLink(s.key), (s) => s.key.camera, (s) => s.key.zone, [(s) => FF.fmt(s.total.entries), "num"], [(s) => FF.fmt(s.total.peak_occupancy), "num"],
    ], "no zone entries in this range");
    FF.fill("speeds", speeds.series.filter((s) => s.total.n), [
      (s) => devLink(s.key), (s) => s.key.camera, (s) => s.key.line, [(s) => FF.fmt(s.total.n), "num"],
      [(s) => FF.fmt(s.total.mean_kmh, 1), "num"], [(s) => FF.fmt(s.total.p85_kmh, 1), "num"],
    ], "no speeds measured in this range");
  }

  function drawFlow(res, step) {
    const pts = res.series.length ? res.series[0].points : [];
    const data = [pts.map((p) => p.t), pts.map((p) => p.in + p.out)];
    const box = $("flow");
    box.dataset.points = pts.length;
    box.dataset.total = data[1].reduce((a, b) => a + b, 0);
    if (typeof uPlot === "undefined") { box.textContent = "chart library missing"; return; }
    const dark = matchMedia("(prefers-color-scheme: dark)").matches;
    const opts = {
      width: Math.max(300, box.clientWidth), height: 220,
      series: [{}, { label: "per " + step, stroke: dark ? "#7fb0ff" : "#1f5fcf", fill: dark ? "rgba(127,176,255,.15)" : "rgba(31,95,207,.1)" }],
      axes: [{ stroke: dark ? "#a3acb9" : "#5b6472" }, { stroke: dark ? "#a3acb9" : "#5b6472" }],
    };
    if (chart && chart.__step === step) chart.setData(data);
    else { if (chart) chart.destroy(); chart = new uPlot(opts, data, box); chart.__step = step; }
  }

  async function fleet() {
    const d = await FF.getJson("/api/devices");
    const by = (p) => d.devices.filter((x) => x.presence === p).length;
    $("n-online").textContent = by("online"); $("n-stale").textContent = by("stale");
    $("n-offline").textContent = by("offline"); $("n-unknown").textContent = by("unknown");
    const versions = new Map();
    for (const dev of d.devices) for (const c of (dev.reported && dev.reported.cameras) || []) {
      const k = c.model != null ? `${c.model} v${c.version}` : (c.file || "config model");
      versions.set(k, (versions.get(k) || 0) + 1);
    }
    FF.fill("versions", [...versions.entries()].sort((a, b) => b[1] - a[1]), [(e) => e[0], [(e) => e[1], "num"]], "no device reported its models yet");
    FF.fill("devices", d.devices, [
      (r) => FF.el("a", { href: "/devices/" + encodeURIComponent(r.device) }, r.device), (r) => FF.chip(r.presence),
      (r) => FF.time(r.last_seen), (r) => r.agent_version, [(r) => r.bins, "num"], [(r) => r.gaps, "num"],
      [(r) => r.dead_letters, "num"], [(r) => models(r.reported), "wrap"],
    ], "no devices yet");
    const ev = await FF.getJson(DASHBOARD.urls.events);
    FF.fill("events", ev.events, [(r) => FF.time(r.ts), (r) => r.device, (r) => r.camera, (r) => FF.chip(r.severity), (r) => r.type, [(r) => r.message, "wrap"]], "no events yet");
    // Rollouts and drift verdicts need a signed-in viewer; anonymous readers see why not.
    try {
      const r = await FF.getJson("/api/rollouts?limit=100");
      $("n-rollouts").textContent = r.rollouts.filter((x) => ["running", "paused", "aborting"].includes(x.state)).length;
    } catch (e) { $("n-rollouts").textContent = "–"; $("n-rollouts").title = e.message; }
    try {
      const v = await FF.getJson("/api/drift/verdicts?limit=200");
      const latest = new Map();
      for (const x of v.verdicts) if (!latest.has(x.device + "/" + x.camera)) latest.set(x.device + "/" + x.camera, x.verdict);
      $("n-drift").textContent = [...latest.values()].filter((x) => !["ok", "not_judged"].includes(x)).length;
    } catch (e) { $("n-drift").textContent = "–"; $("n-drift").title = e.message; }
  }
  // What each camera runs, as web.camera_models writes it.
  const models = (rep) => !rep || !rep.cameras.length ? "-" : rep.cameras.map((c) => {
    const runs = c.model != null ? c.model + (c.version != null ? " v" + c.version : "") : (c.file || "config model");
    return c.camera + ": " + runs + (c.update != null && c.update !== "activated" ? " (update " + c.update + ")" : "");
  }).join("; ");

  const toInput = (t) => { const d = new Date(t * 1000 - new Date().getTimezoneOffset() * 60000); return d.toISOString().slice(0, 16); };
  const fromInput = (v) => new Date(v).getTime() / 1000;  // datetime-local is local time
  $("range").addEventListener("submit", (e) => {
    e.preventDefault();
    const f = fromInput($("range-from").value), t = fromInput($("range-to").value);
    if (!(t > f)) { $("refresh").textContent = "the range's end must be after its start"; return; }
    range = { from: f, to: t };
    counts().catch(() => {});
  });
  $("range-reset").addEventListener("click", () => { range = null; counts().catch(() => {}); });
  const s = span(); $("range-from").value = toInput(s.from); $("range-to").value = toInput(s.to);

  // -- live updates ----------------------------------------------------------------
  // Server-Sent Events (GET /api/live) say when bins arrive or the fleet changes, and
  // the page re-reads the API at once; while the stream is open it also re-reads
  // every 30 s (presence turning stale is the clock's doing, not an event). Without
  // a stream (the registry refused it: too many open; a proxy that buffers; no
  // EventSource) the page polls every 2 s and 5 s and tries a stream again in 30 s.
  // The registry ends each stream after a while; EventSource reconnects by itself.
  const SLOW = 30000, RETRY_STREAM = 30000;
  const live = { open: false, events: 0 };
  const loops = {};
  function loop(name, fn, fastMs, statusId) {
    const status = $(statusId);
    let timer = null, running = false, again = false;
    async function tick() {
      clearTimeout(timer);
      if (running) { again = true; return; }  // one refresh at a time; one more after it
      running = true;
      try {
        await fn();
        if (status) { status.className = "status"; status.textContent = "updated " + new Date().toLocaleTimeString() + (live.open ? " (live)" : ""); }
      } catch (e) {
        if (status) { status.className = "status failed"; status.textContent = "refresh failed: " + e.message; }
      } finally {
        running = false;
        if (again) { again = false; tick(); } else timer = setTimeout(tick, live.open ? SLOW : fastMs);
      }
    }
    loops[name] = tick;
    tick();
  }
  function mode(open) {
    if (live.open === open) return;
    live.open = open;
    document.body.dataset.live = open ? "sse" : "polling";
    if (!open) { loops.counts(); loops.fleet(); }  // back to the short polls now
  }
  function connect() {
    if (!window.EventSource) { mode(false); return; }
    const es = new EventSource("/api/live");
    // After a reconnect, what changed while it was down has no event: re-read once.
    es.addEventListener("hello", () => { mode(true); loops.counts(); loops.fleet(); });
    const on = (name, what) => es.addEventListener(name, () => {
      live.events += 1;
      document.body.dataset.liveEvents = live.events;
      loops[what]();
    });
    on("bins", "counts");
    on("fleet", "fleet");
    es.onerror = () => {
      if (es.readyState === EventSource.CLOSED) {  // refused or not a stream: poll, retry later
        mode(false);
        setTimeout(connect, RETRY_STREAM);
      }
      // CONNECTING: the stream ended (its lifetime) or dropped; EventSource reconnects
      // after the retry the registry announced, and "hello" says when it is back.
    };
  }
  document.body.dataset.live = "polling";
  loop("counts", counts, 2000, "refresh");
  loop("fleet", fleet, 5000, "fleet-refresh");
  connect();
})();

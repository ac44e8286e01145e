// One device: record, health, cameras with their deployments (and a rollback for
// operators), counts and speeds over time, drift and shadow comparison; all from the API.
"use strict";
(() => {
  const id = DEVICE.id, enc = encodeURIComponent(id);
  const $ = (x) => document.getElementById(x);
  let chart = null;
  const notice = (text, ok) => $("notice").replaceChildren(FF.el("p", { className: ok ? "message" : "error", role: ok ? "status" : "alert" }, text));
  const kv = (body, pairs) => FF.fill(body, pairs.filter(([, v]) => v != null && v !== ""), [(p) => FF.el("th", {}, p[0]), (p) => p[1]], "nothing reported yet");
  const soft = async (fn, body, cols) => { try { await fn(); } catch (e) { FF.fill(body, [], Array(cols).fill(() => ""), e.message); } };

  async function record() {
    // The fleet list has every record field and is readable wherever the dashboard is.
    const list = await FF.getJson("/api/devices");
    const mine = list.devices.find((d) => d.device === id);
    if (!mine) throw new Error("the registry no longer knows " + id);
    const dev = mine;
    kv("record", [["name", dev.name], ["state", FF.chip(dev.presence)], ["last seen", FF.time(dev.last_seen)],
      ["agent", dev.agent_version], ["site", dev.site], ["tags", (dev.tags || []).join(", ")],
      ["location", dev.location ? `${dev.location.latitude}, ${dev.location.longitude}` : null],
      ["hardware", dev.hardware ? Object.entries(dev.hardware).map(([k, v]) => `${k}: ${v}`).join("; ") : null],
      ["bins", mine.bins], ["gaps", mine.gaps], ["dead letters", mine.dead_letters]]);
    const h = mine.last_health || {};
    const sys = h.system || {};
    const pairs = [["time", h.ts != null ? FF.time(h.ts) : null], ["outbox depth", h.outbox_depth], ["outbox dropped", h.outbox_dropped],
      ["temperature °C", sys.soc_temp_c], ["load (1 min)", sys.load_1m], ["CPU %", sys.cpu_percent], ["error", h.error]];
    for (const c of h.cameras || []) pairs.push([`camera ${c.camera}`, `${c.state}, ${FF.fmt(c.fps, 1)} fps, inference ${FF.fmt(c.inference_ms, 1)} ms (p95 ${FF.fmt(c.inference_p95_ms, 1)}), dropped ${c.dropped_frames}`]);
    kv("health", pairs);
    return mine;
  }

  async function cameras(mine) {
    const reported = new Map(((mine.reported && mine.reported.cameras) || []).map((c) => [c.camera, c]));
    let deps = [];
    try { deps = (await FF.getJson(`/api/devices/${enc}/deployments`)).deployments; } catch (e) { /* anonymous */ }
    let history = [];
    if (DEVICE.can_operate) {
      try { history = (await FF.getJson("/api/audit?" + FF.q({ target: "device:" + id, limit: 100 }))).entries; } catch (e) { /* role */ }
    }
    const names = [...new Set([...reported.keys(), ...deps.map((d) => d.camera)])].sort();
    FF.fill("cameras", names, [
      (c) => c, (c) => (reported.get(c) || {}).model, [(c) => (reported.get(c) || {}).version, "num"], (c) => (reported.get(c) || {}).file,
      (c) => (reported.get(c) || {}).update,
      (c) => { const d = deps.find((x) => x.camera === c); return d ? `${d.model} v${d.version}` : "-"; },
      (c) => rollbackButton(c, deps.find((x) => x.camera === c), history),
    ], "no cameras reported yet");
    FF.fill("history", history.filter((e) => e.action.startsWith("deployment") || e.action.startsWith("drift") || e.action.startsWith("rollout") || e.action.startsWith("shadow")), [
      (e) => FF.time(e.ts), (e) => e.actor, (e) => e.action, (e) => e.target,
      (e) => e.details.model ? `${e.details.old || "-"} → ${e.details.model}/v${e.details.version}` : "", [(e) => e.reason, "wrap"],
    ], DEVICE.can_operate ? "no deployments yet" : "operators see the model history");
  }

  // Roll back: deploy the version this camera ran before its current deployment.
  function rollbackButton(camera, dep, history) {
    if (!DEVICE.can_operate || !dep) return "";
    const last = history.find((e) => e.action === "deployment.set" && e.target === `device:${id}/camera:${camera}` && e.details.old);
    if (!last) return "";
    const [model, v] = last.details.old.split("/v");
    const b = FF.el("button", { type: "button", className: "rollback" }, `Roll back to ${model} v${v}`);
    b.addEventListener("click", async () => {
      if (!confirm(`Deploy ${model} v${v} to ${id}/${camera} again?`)) return;
      try {
        await FF.send("POST", `/api/devices/${enc}/deployments`, { camera, model, version: Number(v), reason: "rollback from the web UI" });
        notice(`Rolled ${id}/${camera} back to ${model} v${v}.`, true);
        refresh();
      } catch (e) { notice("Not rolled back: " + e.message, false); }
    });
    return b;
  }

  async function counts() {
    const now = Math.floor(Date.now() / 1000);
    const s = await FF.getJson("/api/series?" + FF.q({ kind: "lines", step: "minute", from: now - 6 * 3600, to: now, device: id, group: "class" }));
    const ts = [...new Set(s.series.flatMap((x) => x.points.map((p) => p.t)))].sort((a, b) => a - b);
    const data = [ts, ...s.series.map((x) => { const m = new Map(x.points.map((p) => [p.t, p.in + p.out])); return ts.map((t) => m.get(t) ?? 0); })];
    const box = $("counts-chart");
    if (chart) chart.destroy();
    const colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"];
    chart = new uPlot({ width: Math.max(300, box.clientWidth), height: 220,
      series: [{}, ...s.series.map((x, i) => ({ label: x.key.class, stroke: colours[i % colours.length] }))] }, data, box);
    const per = await FF.getJson("/api/series?" + FF.q({ kind: "lines", step: "minute", from: now - 6 * 3600, to: now, device: id, group: "camera,line,class" }));
    FF.fill("line-totals", per.series, [(x) => x.key.camera, (x) => x.key.line, (x) => x.key.class, [(x) => FF.fmt(x.total.in), "num"], [(x) => FF.fmt(x.total.out), "num"]], "nothing counted in the last 6 hours");
    const sp = await FF.getJson("/api/series?" + FF.q({ kind: "speeds", step: "hour", from: now - 86400, to: now, device: id, group: "camera,line" }));
    FF.fill("speeds", sp.series.filter((x) => x.total.n), [(x) => x.key.camera, (x) => x.key.line, [(x) => FF.fmt(x.total.n), "num"],
      [(x) => FF.fmt(x.total.mean_kmh, 1), "num"], [(x) => FF.fmt(x.total.p85_kmh, 1), "num"], [(x) => FF.fmt(x.total.max_kmh, 1), "num"]], "no speeds in the last 24 hours");
  }

  async function drift() {
    const v = await FF.getJson("/api/drift/verdicts?" + FF.q({ device: id, limit: 200 }));
    FF.fill("verdicts", v.verdicts.slice(0, 20), [(x) => FF.time(x.start), (x) => x.camera, (x) => x.model, (x) => FF.chip(x.verdict), [(x) => x.reason, "wrap"]], "no verdicts yet");
    const w = await FF.getJson("/api/drift?" + FF.q({ device: id, limit: 200 }));
    dpfCharts(w.drift, v.verdicts);
    const box = $("drift-hist");
    if (!w.drift.length) { box.replaceChildren(FF.el("p", { className: "empty" }, "no drift windows yet")); return; }
    const current = w.drift[0].model;
    const baseModel = v.verdicts.length ? v.verdicts[0].baseline_model : null;
    const pool = (rows) => rows.reduce((acc, r) => acc.map((a, i) => a + r.confidence_hist[i]), Array(10).fill(0));
    const now = pool(w.drift.filter((r) => r.model === current).slice(0, 10));
    const baseRows = w.drift.filter((r) => baseModel ? r.model === baseModel : r.model !== current);
    const base = baseRows.length ? pool(baseRows) : null;
    const norm = (h) => { const s = h.reduce((a, b) => a + b, 0) || 1; return h.map((x) => x / s); };
    const n = norm(now), b = base ? norm(base) : null;
    const rows = n.map((x, i) => FF.el("tr", {}, FF.el("td", {}, `${(i / 10).toFixed(1)}–${((i + 1) / 10).toFixed(1)}`),
      FF.el("td", { style: "width:40%" }, FF.el("div", { className: "bar", style: `width:${100 * x}%`, title: `now ${(100 * x).toFixed(1)}%` })),
      FF.el("td", { style: "width:40%" }, b ? FF.el("div", { className: "bar", style: `width:${100 * b[i]}%;opacity:.45`, title: `baseline ${(100 * b[i]).toFixed(1)}%` }) : "-")));
    box.replaceChildren(FF.el("table", {}, FF.el("thead", {}, FF.el("tr", {}, FF.el("th", {}, "confidence"), FF.el("th", {}, `now (${current || "model"})`), FF.el("th", {}, `baseline (${baseModel || (base ? "earlier windows" : "none yet")})`))), FF.el("tbody", {}, ...rows)));
  }

  // -- charts over time (uPlot) ------------------------------------------------------
  const COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"];
  const plots = {};
  // One chart in box (replacing what it showed); a box whose series have no value
  // says so in words instead. data-points: the values drawn (the tests read it).
  function plot(key, box, series, data, extra) {
    if (plots[key]) { plots[key].destroy(); delete plots[key]; }
    const values = data.slice(1).reduce((n, col) => n + col.filter((v) => v != null).length, 0);
    box.dataset.points = values;
    if (!values) { box.replaceChildren(FF.el("p", { className: "empty" }, "nothing reported in this range")); return; }
    box.replaceChildren();
    plots[key] = new uPlot({ width: Math.max(260, box.clientWidth), height: 160, legend: { show: series.length > 2 }, series, ...(extra || {}) }, data, box);
  }

  async function health() {
    const span = Number($("health-range").value), now = Math.floor(Date.now() / 1000);
    const url = `/api/devices/${enc}/health?` + FF.q({ from: now - span, to: now, points: 300 });
    const h = await FF.getJson(url);
    const cams = Object.keys(h.cameras);
    const perCamera = (f) => [h.t, ...cams.map((c) => h.cameras[c][f])];
    const camSeries = [{}, ...cams.map((c, i) => ({ label: c, stroke: COLOURS[i % COLOURS.length], width: 1.5 }))];
    plot("fps", $("health-fps"), camSeries, perCamera("fps"));
    plot("latency", $("health-latency"), camSeries, perCamera("inference_ms"));
    plot("temperature", $("health-temperature"), [{}, { label: "°C", stroke: COLOURS[3] }], [h.t, h.temperature_c]);
    plot("outbox", $("health-outbox"), [{}, { label: "messages", stroke: COLOURS[4] }], [h.t, h.outbox_depth]);
    const src = $("health-source");
    src.dataset.source = url;
    src.textContent = `${h.beats.reduce((a, b) => a + b, 0)} health beats in ${h.t.length} buckets of ${Math.round(h.step_s)} s`;
  }

  // Detections per frame of each drift window, and the band the judge allowed: it
  // compares log((n + 0.5) / (expected + 0.5)) with its threshold, so the bounds on
  // a window's detections are (expected + 0.5) * e^±threshold - 0.5, where the
  // expected count comes back from the verdict's own statistics.
  function dpfCharts(windows, verdicts) {
    const box = $("drift-dpf");
    for (const k of Object.keys(plots)) if (k.startsWith("dpf:")) { plots[k].destroy(); delete plots[k]; }
    const cams = [...new Set(windows.map((w) => w.camera))].sort();
    if (!cams.length) { box.replaceChildren(FF.el("p", { className: "empty" }, "no drift windows yet")); return; }
    box.replaceChildren();
    for (const cam of cams) {
      const ws = windows.filter((w) => w.camera === cam && w.frames > 0).sort((a, b) => a.start - b.start);
      const judged = new Map(verdicts.filter((v) => v.camera === cam).map((v) => [v.start, v]));
      const band = ws.map((w) => {
        const v = judged.get(w.start);
        const st = v && v.statistics, thr = v && v.thresholds && v.thresholds.dpf_log_ratio;
        if (thr == null || st.dpf_log_ratio == null || !st.frames) return null;
        const expected = (st.detections + 0.5) * Math.exp(-st.dpf_log_ratio);  // expected + 0.5
        return [(expected - 0.5) / st.frames, (expected * Math.exp(thr) - 0.5) / st.frames, Math.max(0, expected * Math.exp(-thr) - 0.5) / st.frames];
      });
      const col = (i) => band.map((b) => b ? b[i] : null);
      const el = FF.el("div", { className: "chart small", role: "img", "aria-label": `Detections per frame of camera ${cam}'s drift windows with the judge's thresholds`,
        dataset: { camera: cam, windows: ws.length, thresholds: band.filter((b) => b).length } });
      box.append(FF.el("p", { className: "muted" }, `camera ${cam}`), el);
      plots["dpf:" + cam] = new uPlot({ width: Math.max(260, box.clientWidth), height: 180,
        series: [{}, { label: "detections/frame", stroke: COLOURS[0], width: 1.5, points: { show: true, size: 5 } },
          { label: "expected", stroke: COLOURS[2], dash: [6, 4], spanGaps: false },
          { label: "threshold above", stroke: COLOURS[3], dash: [3, 3] },
          { label: "threshold below", stroke: COLOURS[3], dash: [3, 3] }] },
      [ws.map((w) => w.start), ws.map((w) => w.detections / w.frames), col(0), col(1), col(2)], el);
    }
  }

  async function shadow() {
    const s = await FF.getJson("/api/shadow?" + FF.q({ device: id, limit: 20 }));
    const name = (m) => m ? (m.model || m.file || "") + (m.version != null ? " v" + m.version : "") : "-";
    FF.fill("shadow", s.windows, [(x) => FF.time(x.start), (x) => x.camera, (x) => name(x.active), (x) => name(x.candidate),
      [(x) => `${x.boxes_active}/${x.boxes_candidate}`, "num"], [(x) => x.agreement == null ? "-" : (100 * x.agreement).toFixed(1) + "%", "num"]],
      s.requests.length ? "shadow requested; no window yet" : "no shadow comparison");
  }

  async function refresh() {
    const mine = await record();
    await Promise.all([
      soft(() => cameras(mine), "cameras", 7), soft(counts, "line-totals", 5),
      soft(drift, "verdicts", 5), soft(shadow, "shadow", 6),
      health().catch((e) => { $("health-source").textContent = "health: " + e.message; }),
    ]);
  }
  $("health-range").addEventListener("change", () => health().catch((e) => notice("health: " + e.message)));
  FF.poll(refresh, 10000);
})();

// Fleet map (Leaflet): a circle per device with a location, coloured by status, model
// version, rollout wave or drift state. Tiles only when the registry config names a
// tile URL; without them (or when they fail to load) the markers stand on a plain
// background with a scale bar, which is what an air-gapped site sees.
"use strict";
(() => {
  const box = document.getElementById("map");
  const map = L.map(box, { preferCanvas: false, worldCopyJump: true }).setView([20, 0], 2);
  L.control.scale({ imperial: false }).addTo(map);
  if (box.dataset.tiles) {
    L.tileLayer(box.dataset.tiles, { maxZoom: 19, attribution: box.dataset.attribution || "" }).addTo(map);
  }
  const layer = L.layerGroup().addTo(map);
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
  const FIXED = { online: "#16a34a", stale: "#d97706", offline: "#dc2626", unknown: "#6b7280", ok: "#16a34a", not_judged: "#6b7280",
    breach: "#dc2626", model_drift: "#dc2626", environment: "#d97706", none: "#9ca3af", "no rollout": "#9ca3af", canary: "#9333ea" };
  let fitted = false;
  const state = { devices: [], waves: new Map(), drift: new Map() };

  function colourOf(value, seen) {
    if (FIXED[value]) return FIXED[value];
    if (!seen.has(value)) seen.set(value, PALETTE[seen.size % PALETTE.length]);
    return seen.get(value);
  }
  function valueOf(dev, by) {
    if (by === "status") return dev.presence;
    if (by === "version") {
      const cams = (dev.reported && dev.reported.cameras) || [];
      const v = cams.filter((c) => c.model != null).map((c) => `${c.model} v${c.version}`);
      return v.length ? [...new Set(v)].join(", ") : "none";
    }
    if (by === "wave") {
      const w = state.waves.get(dev.device);
      return w == null ? "no rollout" : w === 0 ? "canary" : "wave " + w;
    }
    return state.drift.get(dev.device) || "not_judged";
  }

  async function popup(dev) {
    const now = Math.floor(Date.now() / 1000);
    const body = FF.el("div", {}, FF.el("strong", {}, dev.name || dev.device), " ", FF.chip(dev.presence));
    try {
      const s = await FF.getJson("/api/series?" + FF.q({ kind: "lines", step: "minute", from: now - 3600, to: now, device: dev.device }));
      const pts = s.series.length ? s.series[0].points : [];
      const last = pts.length ? pts[pts.length - 1] : null;
      body.append(FF.el("div", {}, `last hour: ${FF.fmt(s.total.in)} in, ${FF.fmt(s.total.out)} out`),
        FF.el("div", {}, "flow, latest minute: " + (last ? FF.fmt(last.in + last.out) + " / min" : "-")));
    } catch (e) { body.append(FF.el("div", { className: "error" }, e.message)); }
    body.append(FF.el("div", {}, FF.el("a", { href: "/devices/" + encodeURIComponent(dev.device) }, "Open device page")));
    return body;
  }

  function draw() {
    const by = document.getElementById("colour-by").value;
    const seen = new Map(), legend = new Map();
    layer.clearLayers();
    const placed = state.devices.filter((d) => d.location);
    for (const dev of placed) {
      const v = valueOf(dev, by), colour = colourOf(v, seen);
      legend.set(v, colour);
      const m = L.circleMarker([dev.location.latitude, dev.location.longitude], {
        radius: 9, color: "#111", weight: 1, fillColor: colour, fillOpacity: 0.9, className: "device-marker",
      }).addTo(layer);
      m.bindTooltip(`${dev.name || dev.device}: ${v}`);
      m.bindPopup(() => { const holder = FF.el("div", {}, "loading…"); popup(dev).then((b) => holder.replaceChildren(b)); return holder; });
      m.on("dblclick", () => { location.href = "/devices/" + encodeURIComponent(dev.device); });
      if (m.getElement()) m.getElement().setAttribute("data-device", dev.device);
    }
    document.getElementById("legend").replaceChildren(...[...legend.entries()].map(([v, c]) =>
      FF.el("span", {}, FF.el("i", { style: "background:" + c }), v)));
    const missing = state.devices.length - placed.length;
    document.getElementById("unplaced").textContent = missing ? `${missing} device(s) have no location (set one with PATCH /api/devices/<id>).` : "";
    if (!fitted && placed.length) {
      map.fitBounds(L.latLngBounds(placed.map((d) => [d.location.latitude, d.location.longitude])).pad(0.3), { maxZoom: 15 });
      fitted = true;
    }
  }

  async function refresh() {
    const d = await FF.getJson("/api/devices");
    state.devices = d.devices;
    try {  // rollout waves and drift need a signed-in viewer
      const r = await FF.getJson("/api/rollouts?limit=20");
      const waves = new Map();
      for (const ro of r.rollouts.filter((x) => ["running", "paused", "aborting"].includes(x.state))) {
        const full = await FF.getJson("/api/rollouts/" + ro.id);
        for (const w of full.waves) for (const dev of w.devices) waves.set(dev.device, w.wave);
      }
      state.waves = waves;
      const v = await FF.getJson("/api/drift/verdicts?limit=500");
      const drift = new Map();
      for (const x of v.verdicts) if (!drift.has(x.device)) drift.set(x.device, x.verdict);
      state.drift = drift;
    } catch (e) { /* anonymous: status and version only */ }
    draw();
  }
  document.getElementById("colour-by").addEventListener("change", draw);
  FF.poll(refresh, 5000);
})();

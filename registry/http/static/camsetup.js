// Camera set-up on the device page: the calibration snapshot with the camera's lines
// and zones drawn over it (SVG), draggable end points and corners, add/remove, an arrow
// showing which way is "in", and Save, which pushes the geometry as the camera's
// desired state (PUT .../geometry; the agent applies it and reports it back).
"use strict";
(() => {
  const id = DEVICE.id, enc = encodeURIComponent(id);
  const $ = (x) => document.getElementById(x);
  const NS = "http://www.w3.org/2000/svg";
  const svg = $("setup-svg");
  if (!svg) return;
  let camera = null, setup = null, geo = { lines: [], zones: [] }, dirty = false, selected = null;
  let shownSnapshot = null, size = [960, 540], objectUrl = null, nameFor = null;
  const base = () => `/api/devices/${enc}/cameras/${encodeURIComponent(camera)}`;
  const say = (text, ok) => $("setup-notice").replaceChildren(FF.el("p", { className: ok ? "message" : "error", role: ok ? "status" : "alert" }, text));
  const node = (tag, attrs) => {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    return e;
  };
  const copy = (g) => ({ lines: (g.lines || []).map((l) => ({ name: l.name, points: l.points.map((p) => [...p]) })),
    zones: (g.zones || []).map((z) => ({ name: z.name, points: z.points.map((p) => [...p]) })),
    homography: g.homography ? { image: g.homography.image.map((p) => [...p]), ground: g.homography.ground.map((p) => [...p]) } : null });
  // The points a handle moves: a line's or zone's, or the homography's image points.
  const pts = (kind, i) => kind === "homography" ? geo.homography.image : geo[kind][i].points;

  // -- drawing ---------------------------------------------------------------------
  function draw() {
    const [w, h] = size;
    svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
    const keep = [...svg.children].filter((c) => c.id === "setup-image");
    svg.replaceChildren(...keep);
    const r = Math.max(w, h) / 120, stroke = Math.max(w, h) / 400;
    geo.zones.forEach((z, i) => {
      const sel = selected && selected.kind === "zones" && selected.i === i;
      const poly = node("polygon", { points: z.points.map((p) => p.join(",")).join(" "), class: "zone" + (sel ? " selected" : ""), "stroke-width": stroke });
      poly.addEventListener("pointerdown", () => select("zones", i));
      svg.appendChild(poly);
      svg.appendChild(label(z.name, z.points[0], r));
      z.points.forEach((p, j) => svg.appendChild(handle("zones", i, j, p, r)));
    });
    if (geo.homography) {
      // The speed calibration: four image points with their ground metres (read-only).
      const h = geo.homography;
      svg.appendChild(node("polygon", { points: h.image.map((p) => p.join(",")).join(" "), class: "homography", "stroke-width": stroke }));
      h.image.forEach((p, j) => {
        svg.appendChild(label(`H${j + 1} (${h.ground[j][0]}, ${h.ground[j][1]} m)`, p, r * 0.8));
        svg.appendChild(handle("homography", 0, j, p, r));
      });
    }
    geo.lines.forEach((l, i) => {
      const sel = selected && selected.kind === "lines" && selected.i === i;
      const [a, b] = l.points;
      const line = node("line", { x1: a[0], y1: a[1], x2: b[0], y2: b[1], class: "line" + (sel ? " selected" : ""), "stroke-width": stroke * 1.5, "data-name": l.name });
      line.addEventListener("pointerdown", () => select("lines", i));
      svg.appendChild(line);
      // "in" is crossing from the left of A->B to its right (image y down): normal (-dy, dx).
      const dx = b[0] - a[0], dy = b[1] - a[1], len = Math.hypot(dx, dy) || 1, k = r * 5 / len;
      const mx = (a[0] + b[0]) / 2, my = (a[1] + b[1]) / 2;
      svg.appendChild(node("line", { x1: mx, y1: my, x2: mx - dy * k, y2: my + dx * k, class: "in-arrow", "stroke-width": stroke, "marker-end": "url(#setup-arrow)" }));
      svg.appendChild(label("in", [mx - dy * k, my + dx * k], r * 0.8));
      svg.appendChild(label(l.name, [mx + dy * k * 0.6, my - dx * k * 0.6], r));
      svg.appendChild(label("A", a, r * 0.8));
      svg.appendChild(label("B", b, r * 0.8));
      l.points.forEach((p, j) => svg.appendChild(handle("lines", i, j, p, r)));
    });
    const defs = node("defs", {});
    const marker = node("marker", { id: "setup-arrow", viewBox: "0 0 10 10", refX: 8, refY: 5, markerWidth: 5, markerHeight: 5, orient: "auto-start-reverse" });
    marker.appendChild(node("path", { d: "M 0 0 L 10 5 L 0 10 z", class: "in-arrow-head" }));
    defs.appendChild(marker);
    svg.appendChild(defs);
    const shape = selected ? geo[selected.kind][selected.i] : null;
    // A redraw (a snapshot arriving, a poll) must not overwrite a name being typed:
    // the field is refilled only when the selection changed or it is not in use.
    const key = selected ? `${selected.kind}/${selected.i}` : "";
    if (key !== nameFor || document.activeElement !== $("setup-name")) {
      $("setup-name").value = shape ? shape.name : "";
      nameFor = key;
    }
    $("setup-name").disabled = $("setup-remove").disabled = !shape || !DEVICE.can_operate;
  }
  function label(text, p, r) {
    const t = node("text", { x: p[0] + r, y: p[1] - r, class: "setup-label", "font-size": r * 2.4 });
    t.textContent = text;
    return t;
  }
  function handle(kind, i, j, p, r) {
    const c = node("circle", { cx: p[0], cy: p[1], r, class: "handle", tabindex: DEVICE.can_operate ? 0 : -1,
      "data-kind": kind, "data-index": i, "data-point": j, "aria-label": kind === "homography" ? `homography point ${j + 1}` : `${geo[kind][i].name} point ${j + 1}` });
    if (DEVICE.can_operate) c.addEventListener("pointerdown", (ev) => drag(ev, kind, i, j));
    return c;
  }
  function select(kind, i) { selected = { kind, i }; draw(); }
  function drag(ev, kind, i, j) {
    ev.preventDefault();
    ev.stopPropagation();
    if (kind === "homography") draw(); else select(kind, i);
    const m = svg.getScreenCTM().inverse();
    const move = (e) => {
      const pt = new DOMPoint(e.clientX, e.clientY).matrixTransform(m);
      pts(kind, i)[j] = [Math.round(Math.min(size[0], Math.max(0, pt.x))), Math.round(Math.min(size[1], Math.max(0, pt.y)))];
      dirty = true;
      draw();
      state();
    };
    const up = () => { window.removeEventListener("pointermove", move); window.removeEventListener("pointerup", up); };
    window.addEventListener("pointermove", move);
    window.addEventListener("pointerup", up);
  }

  // -- state -------------------------------------------------------------------------
  function state() {
    const s = setup ? setup.state : "none";
    const text = dirty ? "edited, not saved" : { applied: "applied", pending: "pending (the device has not reported it yet)", none: "as configured on the device" }[s];
    $("setup-state").replaceChildren(FF.chip(dirty ? "edited" : s), " ", text);
    $("setup-state").dataset.state = dirty ? "edited" : s;
  }
  async function loadSnapshot() {
    const snap = setup && setup.snapshot;
    const info = $("setup-snapshot");
    if (!snap) { info.textContent = "no snapshot yet: images never leave the device unasked"; return; }
    if (snap.state === "requested") { info.replaceChildren("snapshot asked ", FF.time(snap.requested_at), ", waiting for the device"); return; }
    info.replaceChildren(`snapshot ${snap.width}×${snap.height} taken `, FF.time(snap.taken_at));
    const key = `${camera}/${snap.request_id}`;
    if (shownSnapshot === key) return;
    shownSnapshot = key;  // before the fetch: a second refresh must not load it again
    try {
      const r = await fetch(base() + "/snapshot", { credentials: "same-origin", cache: "no-store" });
      if (!r.ok) throw new Error(r.status === 401 ? "sign in to see the snapshot" : `snapshot: ${r.status}`);
      if (objectUrl) URL.revokeObjectURL(objectUrl);
      objectUrl = URL.createObjectURL(await r.blob());
      size = [snap.width, snap.height];
      const img = $("setup-image");
      img.setAttribute("href", objectUrl);
      img.setAttribute("width", snap.width);
      img.setAttribute("height", snap.height);
      img.setAttribute("data-request", snap.request_id);
      draw();
    } catch (e) { shownSnapshot = null; info.textContent = e.message; }
  }
  let epoch = 0;  // bumped by a save: an answer to a request sent before it is stale
  async function refresh() {
    if (!camera) return;
    const asked = epoch;
    const got = await FF.getJson(base() + "/setup");
    if (asked !== epoch) return;
    setup = got;
    if (!dirty) {
      geo = copy(setup.desired || setup.reported || setup.configured || {});
      if (selected && !geo[selected.kind][selected.i]) selected = null;
      draw();
    }
    state();
    await loadSnapshot();
  }
  async function cameras() {
    if (camera) return;  // the list is read until the device announced a camera
    const list = await FF.getJson("/api/devices");
    const mine = list.devices.find((d) => d.device === id) || {};
    const names = (mine.cameras || []).map((c) => c.camera).sort();
    const sel = $("setup-camera");
    if (sel.options.length !== names.length) {
      sel.replaceChildren(...names.map((n) => FF.el("option", { value: n }, n)));
      if (!camera && names.length) camera = names[0];
      sel.value = camera || "";
    }
    if (!names.length) $("setup-state").textContent = "the device has announced no camera yet";
  }

  // -- actions -----------------------------------------------------------------------
  const unique = (kind, stem) => { let n = 1; while (geo[kind].some((x) => x.name === `${stem}-${n}`)) n++; return `${stem}-${n}`; };
  function add(kind) {
    const [w, h] = size;
    const shape = kind === "lines"
      ? { name: unique("lines", "line"), points: [[Math.round(w * 0.3), Math.round(h / 2)], [Math.round(w * 0.7), Math.round(h / 2)]] }
      : { name: unique("zones", "zone"), points: [[w * 0.4, h * 0.4], [w * 0.6, h * 0.4], [w * 0.6, h * 0.6], [w * 0.4, h * 0.6]].map((p) => p.map(Math.round)) };
    geo[kind].push(shape);
    dirty = true;
    select(kind, geo[kind].length - 1);
    state();
  }
  function bind() {
    $("setup-camera").addEventListener("change", (e) => { camera = e.target.value; dirty = false; selected = null; shownSnapshot = null; refresh(); });
    if (!DEVICE.can_operate) return;
    $("setup-add-line").addEventListener("click", () => add("lines"));
    $("setup-add-zone").addEventListener("click", () => add("zones"));
    $("setup-remove").addEventListener("click", () => {
      if (!selected) return;
      geo[selected.kind].splice(selected.i, 1);
      selected = null;
      dirty = true;
      draw();
      state();
    });
    $("setup-name").addEventListener("change", (e) => {
      if (!selected) return;
      geo[selected.kind][selected.i].name = e.target.value.trim();
      dirty = true;
      draw();
      state();
    });
    $("setup-reset").addEventListener("click", () => { dirty = false; selected = null; refresh(); });
    $("setup-snapshot-request").addEventListener("click", async () => {
      try {
        await FF.send("POST", base() + "/snapshot/request");
        say("snapshot asked; the device sends one frame", true);
        refresh();
      } catch (e) { say(e.message); }
    });
    $("setup-save").addEventListener("click", async () => {
      try {
        epoch++;
        const saved = await FF.send("PUT", base() + "/geometry", geo);
        epoch++;
        setup = saved;
        dirty = false;
        say(`geometry sent as desired state version ${setup.desired_version}`, true);
        state();
      } catch (e) { say(e.message); }  // the registry's message names the field
    });
  }
  bind();
  FF.poll(async () => { await cameras(); await refresh(); }, 2000, "setup-refresh");
})();

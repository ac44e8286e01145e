// Rollouts: each rollout's summary, waves and per-device states with their reasons;
// operators get pause, resume and abort (POST /api/rollouts/<id>/...).
"use strict";
(() => {
  const box = document.getElementById("rollouts");
  const notice = (text, ok) => document.getElementById("notice").replaceChildren(FF.el("p", { className: ok ? "message" : "error", role: ok ? "status" : "alert" }, text));
  const ACTIVE = ["running", "paused", "aborting"];

  function action(r, verb) {
    const b = FF.el("button", { type: "button", className: verb === "abort" ? "" : "primary", dataset: { action: verb, rollout: r.id } }, verb[0].toUpperCase() + verb.slice(1));
    b.addEventListener("click", async () => {
      const reason = verb === "abort" ? prompt(`Abort rollout ${r.id}: every moved device goes back. Reason?`, "") : "";
      if (reason === null) return;
      try {
        await FF.send("POST", `/api/rollouts/${r.id}/${verb}`, reason ? { reason } : undefined);
        notice(`Rollout ${r.id}: ${verb} done.`, true);
        refresh();
      } catch (e) { notice(`Rollout ${r.id} not changed: ${e.message}`, false); }
    });
    return b;
  }

  function card(r) {
    const buttons = [];
    if (ROLLOUTS.can_operate && ACTIVE.includes(r.state)) {
      if (r.state === "running") buttons.push(action(r, "pause"));
      if (r.state === "paused") buttons.push(action(r, "resume"));
      if (r.state !== "aborting") buttons.push(action(r, "abort"));
    }
    const waves = r.waves.map((w) => FF.el("div", {},
      FF.el("h3", { style: "font-size:.9rem;margin:.6rem 0 .2rem" }, w.canary ? "Canary" : "Wave " + w.wave, " ", FF.chip(w.state)),
      w.devices.length ? FF.el("table", {}, FF.el("thead", {}, FF.el("tr", {}, ...["device", "state", "previous", "moved", "activated", "shadow agreement", "reason"].map((h) => FF.el("th", {}, h)))),
        FF.el("tbody", {}, ...w.devices.map((d) => FF.el("tr", { dataset: { device: d.device } },
          FF.el("td", {}, FF.el("a", { href: "/devices/" + encodeURIComponent(d.device) }, d.device)), FF.el("td", {}, FF.chip(d.state)),
          FF.el("td", {}, d.previous ? `${d.previous.model} v${d.previous.version}` : "-"), FF.el("td", {}, FF.time(d.moved_at)),
          FF.el("td", {}, FF.time(d.activated_at)), FF.el("td", {}, d.shadow_agreement == null ? "-" : (100 * d.shadow_agreement).toFixed(1) + "%"),
          FF.el("td", { className: "wrap" }, d.reason || "-"))))) : FF.el("p", { className: "empty" }, "no devices")));
    return FF.el("section", { className: "card", id: "rollout-" + r.id, dataset: { state: r.state } },
      FF.el("h2", {}, `Rollout ${r.id}: ${r.model} v${r.version} (${r.ref}) on camera ${r.camera} `, FF.chip(r.state)),
      FF.el("p", { className: "muted" }, `by ${r.created_by}, `, FF.time(r.created_at), r.reason ? ` · reason: ${r.reason}` : "",
        ` · failures: ${Object.entries(r.failures).map(([k, v]) => `${k} ${v}`).join(", ")}`),
      FF.el("div", { className: "inline" }, ...buttons), ...waves);
  }

  async function refresh() {
    const state = document.getElementById("state-filter").value;
    const list = await FF.getJson("/api/rollouts?" + FF.q({ state, limit: 20 }));
    const full = await Promise.all(list.rollouts.map((r) => FF.getJson("/api/rollouts/" + r.id)));
    box.replaceChildren(...(full.length ? full.map(card) : [FF.el("p", { className: "empty" }, "no rollouts yet")]));
  }
  document.getElementById("state-filter").addEventListener("change", () => refresh().catch((e) => notice(e.message, false)));
  FF.poll(refresh, 3000);
})();

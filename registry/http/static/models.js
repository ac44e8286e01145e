// Models page: upload with progress (drag and drop), alias moves, deploys and rollouts
// through the REST API (the session's CSRF token in a header), "deployed on" from the
// devices' reported state, and the audit trail.
"use strict";
(() => {
  const notice = (text, ok) => {
    const box = document.getElementById("notice");
    box.replaceChildren(FF.el("p", { className: ok ? "message" : "error", role: ok ? "status" : "alert" }, text));
  };

  async function deployedOn() {
    const where = new Map();  // "model/version" -> ["device/camera", ...]
    const d = await FF.getJson("/api/devices");
    for (const dev of d.devices) {
      for (const cam of (dev.reported && dev.reported.cameras) || []) {
        if (cam.model == null) continue;
        const key = cam.model + "/" + cam.version;
        if (!where.has(key)) where.set(key, []);
        where.get(key).push(dev.device + "/" + cam.camera);
      }
    }
    document.querySelectorAll("tr[data-model]").forEach((tr) => {
      const list = where.get(tr.dataset.model + "/" + tr.dataset.version) || [];
      tr.querySelector(".deployed").textContent = list.length ? list.join(", ") : "-";
    });
  }

  async function auditTrail() {
    const a = await FF.getJson("/api/audit?limit=25");
    FF.fill("audit", a.entries, [(r) => FF.time(r.ts), (r) => r.actor, (r) => r.action, (r) => r.target, (r) => r.reason], "nothing yet");
  }

  function upload(form) {
    const drop = document.getElementById("drop"), file = document.getElementById("file");
    drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault(); drop.classList.remove("over");
      if (e.dataTransfer.files.length) file.files = e.dataTransfer.files;
    });
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      const bar = document.getElementById("upload-progress");
      const xhr = new XMLHttpRequest();
      xhr.open("POST", form.action);
      bar.hidden = false; bar.value = 0;
      xhr.upload.onprogress = (ev) => { if (ev.lengthComputable) bar.value = (100 * ev.loaded) / ev.total; };
      xhr.onload = () => {
        // The answer is the models page with the result: show it in place.
        const doc = new DOMParser().parseFromString(xhr.responseText, "text/html");
        const main = doc.querySelector("main");
        if (main) { document.querySelector("main").replaceWith(main); init(); }
        else notice("upload answered " + xhr.status, false);
      };
      xhr.onerror = () => notice("upload failed: the registry did not answer", false);
      xhr.send(new FormData(form));
    });
  }

  function actions() {
    document.getElementById("alias-form").addEventListener("submit", async (e) => {
      e.preventDefault();
      const f = new FormData(e.target);
      try {
        await FF.send("PUT", `/api/models/${encodeURIComponent(f.get("model"))}/aliases/${encodeURIComponent(f.get("alias"))}`,
          { version: Number(f.get("version")), reason: f.get("reason") });
        location.reload();
      } catch (err) { notice("Alias not moved: " + err.message, false); }
    });
    document.getElementById("deploy-form").addEventListener("submit", async (e) => {
      e.preventDefault();
      const f = new FormData(e.target);
      const ref = String(f.get("ref")).trim();
      const which = /^\d+$/.test(ref) ? { version: Number(ref) } : { alias: ref };
      const who = String(f.get("who") || "").split(",").map((s) => s.trim()).filter(Boolean);
      const body = { model: f.get("model"), camera: f.get("camera"), reason: f.get("reason"), ...which };
      try {
        if (f.get("target") === "device") {
          if (who.length !== 1) throw new Error("name exactly one device to deploy to");
          await FF.send("POST", `/api/devices/${encodeURIComponent(who[0])}/deployments`, body);
          notice(`Deployed ${body.model} ${ref} to ${who[0]}/${body.camera}.`, true);
        } else {
          const targets = f.get("target") === "fleet" ? { all: true } : f.get("target") === "group" ? { groups: who } : { devices: who };
          const plan = { canary: { count: Number(f.get("canary")) }, waves: Number(f.get("waves")) };
          const r = await FF.send("POST", "/api/rollouts", { ...body, targets, plan });
          location.href = "/rollouts#rollout-" + r.id;
        }
      } catch (err) { notice("Not deployed: " + err.message, false); }
    });
  }

  function init() {
    FF.localizeTimes();
    const status = document.getElementById("refresh");
    deployedOn().then(() => { status.textContent = "updated " + new Date().toLocaleTimeString(); })
      .catch((e) => { status.className = "status failed"; status.textContent = "deployments unknown: " + e.message; });
    if (MODELS_PAGE.can_operate) {
      upload(document.getElementById("upload"));
      actions();
      auditTrail().catch((e) => notice("audit trail: " + e.message, false));
    }
  }
  init();
})();

// Events page: device events (GET /api/events), the audit trail (GET /api/audit,
// operators) and dead letters (GET /api/dead-letters), filtered by device, text and
// severity; polled every 5 s.
"use strict";
(() => {
  const val = (id) => document.getElementById(id).value.trim();
  const has = (text, ...fields) => !text || fields.some((f) => f != null && String(f).toLowerCase().includes(text.toLowerCase()));
  async function refresh() {
    const device = val("f-device"), text = val("f-text"), severity = val("f-severity");
    const ev = await FF.getJson("/api/events?" + FF.q({ device, limit: 200 }));
    FF.fill("events", ev.events.filter((r) => (!severity || r.severity === severity) && has(text, r.type, r.message, r.camera, r.device)), [
      (r) => FF.time(r.ts), (r) => r.device, (r) => r.camera, (r) => FF.chip(r.severity), (r) => r.type, [(r) => r.message, "wrap"],
    ], "no events match");
    if (EVENTS.can_audit) {
      const a = await FF.getJson("/api/audit?" + FF.q({ limit: 200, target: device ? "device:" + device : "" }));
      FF.fill("audit", a.entries.filter((r) => has(text, r.action, r.target, r.reason, r.actor)), [
        (r) => FF.time(r.ts), (r) => r.actor, (r) => FF.chip(r.action), (r) => r.target, [(r) => r.reason, "wrap"],
      ], "no audit entries match");
    }
    const d = await FF.getJson("/api/dead-letters?" + FF.q({ device, limit: 100 }));
    FF.fill("dead", d.dead_letters.filter((r) => has(text, r.topic, r.reason, r.device)), [
      (r) => FF.time(r.received_at), (r) => r.device, (r) => r.topic, [(r) => r.reason, "wrap"],
    ], "no dead letters match");
  }
  document.getElementById("filters").addEventListener("submit", (e) => { e.preventDefault(); refresh().catch(() => {}); });
  FF.poll(refresh, 5000);
})();

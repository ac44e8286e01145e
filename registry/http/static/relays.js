// Relays page: the cloud comparison (GET /api/relays/report), the outboxes
// (GET /api/relays) and, for operators, the parked messages (GET /api/relays/parked)
// with a requeue button per relay (POST /api/relays/<relay>/requeue); polled every 5 s.
"use strict";
(() => {
  const notice = (text, ok) => document.getElementById("notice").replaceChildren(FF.el("p", { className: ok ? "message" : "error", role: ok ? "status" : "alert" }, text));
  const ms = (v) => v == null ? "-" : FF.fmt(v, v >= 10 ? 0 : 1);
  const usd = (v) => v == null ? "-" : "$" + Number(v).toLocaleString(undefined, { minimumFractionDigits: 2, maximumFractionDigits: 2 });
  const age = (s) => !s ? "-" : s < 120 ? `${s.toFixed(0)} s` : s < 7200 ? `${(s / 60).toFixed(0)} min` : `${(s / 3600).toFixed(1)} h`;
  const hours = () => document.getElementById("hours").value;

  function requeueButton(relay, parked) {
    if (!RELAYS.can_operate || !parked) return null;
    const b = FF.el("button", { type: "button", className: "primary", dataset: { requeue: relay } }, `Requeue ${parked} parked`);
    b.addEventListener("click", async () => {
      const reason = prompt(`Send ${relay}'s ${parked} parked messages again. Reason (the cause is fixed)?`, "");
      if (reason === null) return;
      try {
        const r = await FF.send("POST", `/api/relays/${encodeURIComponent(relay)}/requeue`, { reason });
        notice(`${relay}: ${r.requeued} messages requeued.`, true);
        refresh();
      } catch (e) { notice(`${relay}: nothing requeued: ${e.message}`, false); }
    });
    return b;
  }

  async function refresh() {
    const h = hours();
    const rep = await FF.getJson("/api/relays/report?" + FF.q({ hours: h }));
    const body = document.getElementById("report");
    body.dataset.source = "/api/relays/report?" + FF.q({ hours: h });
    FF.fill(body, rep.relays, [
      (r) => FF.el("strong", {}, r.relay), [(r) => FF.fmt(r.messages), "num"], [(r) => FF.fmt(r.publishes), "num"],
      [(r) => FF.fmt(r.bytes), "num"], [(r) => FF.fmt(r.units), "num"], [(r) => FF.fmt(r.failures), "num"],
      [(r) => FF.fmt(r.retries), "num"], [(r) => FF.fmt(r.parked), "num"], [(r) => ms(r.latency_ms.p50), "num"],
      [(r) => ms(r.latency_ms.p95), "num"], [(r) => ms(r.latency_ms.p99), "num"],
      [(r) => usd(r.monthly.usd), "num"], [(r) => usd(r.monthly_doubled.usd), "num"], [(r) => usd(r.monthly.unpacked_usd), "num"],
    ], "no relay forwarded anything in this period");
    body.querySelectorAll("tr").forEach((tr, i) => { if (rep.relays[i]) tr.dataset.relay = rep.relays[i].relay; });
    document.getElementById("advice").replaceChildren(...rep.relays.map((r) => FF.el("li", { dataset: { relay: r.relay } },
      FF.el("strong", {}, r.service), ": ", r.advice,
      r.monthly.tier ? ` (now ${r.monthly.tier.tier} ×${r.monthly.tier.units}` + (r.monthly_doubled.tier ? `, doubled ${r.monthly_doubled.tier.tier} ×${r.monthly_doubled.tier.units})` : ")") : "",
      FF.el("span", { className: "muted" }, ` · prices: ${r.price_source}, as of ${r.price_as_of}`))));
    const st = await FF.getJson("/api/relays?" + FF.q({ hours: h }));
    const ob = document.getElementById("outboxes");
    FF.fill(ob, st.relays, [
      (r) => r.relay, (r) => r.running ? "yes" : "no", (r) => r.state ? FF.chip(r.state.circuit === "closed" ? "ok" : r.state.circuit) : "-",
      [(r) => FF.fmt(r.queued), "num"], [(r) => FF.fmt(r.parked), "num"], [(r) => age(r.oldest_queued_s), "num"],
      [(r) => (r.state && r.state.last_error) || "", "wrap"], (r) => requeueButton(r.relay, r.parked),
    ], "no relay is configured or has messages");
    ob.querySelectorAll("tr").forEach((tr, i) => { if (st.relays[i]) tr.dataset.relay = st.relays[i].relay; });
    if (RELAYS.can_operate) {
      const p = await FF.getJson("/api/relays/parked?limit=200");
      FF.fill("parked", p.parked, [
        (r) => r.relay, (r) => r.msg_id, [(r) => FF.fmt(r.size), "num"], [(r) => r.attempts, "num"],
        (r) => FF.time(r.parked_at), [(r) => r.reason, "wrap"],
      ], "nothing is parked");
    }
  }
  document.getElementById("hours").addEventListener("change", () => refresh().catch((e) => notice(e.message, false)));
  FF.poll(refresh, 5000);
})();

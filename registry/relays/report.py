"""The relay comparison: per cloud what was forwarded, how well, and what it costs.

`build_report` reads the relays' hourly usage (`flowfleet.registry.relays.usage`) over a
period and estimates each cloud's monthly bill for the fleet's current volume from the
versioned price table (``prices.toml`` beside this module: each price with its source
and the date it was read), the bill if the fleet doubles, and which tier or packing
setting costs least. Estimates scale the period's volume to a 30.44-day month.

Packing matters because every cloud bills per message-size unit: the report also
prices the same device messages sent one per cloud message (``unpacked``), using the
period's average message size.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import tomllib

from . import usage

PRICES = Path(__file__).with_name("prices.toml")
MONTH_S = 30.44 * 86400
GIB = 1024**3
TIB = 1024**4


def load_prices(path: Path = PRICES) -> dict[str, Any]:
    with open(path, "rb") as fh:
        return tomllib.load(fh)


def aws_bill(units_per_month: float, prices: dict) -> float:
    """USD for ``units_per_month`` metered messages (5 KB units), tiered, plus one
    connection held all month."""
    left, usd, floor = units_per_month, 0.0, 0.0
    for tier in prices["tiers"]:
        take = max(0.0, min(left, tier["upto"] - floor))
        usd += take / 1e6 * tier["usd_per_million"]
        left -= take
        floor = tier["upto"]
        if left <= 0:
            break
    minutes = MONTH_S / 60
    return usd + minutes / 1e6 * prices["usd_per_million_connection_minutes"]


def azure_options(blocks_per_day: float, prices: dict) -> list[dict]:
    """Every tier that can carry ``blocks_per_day`` (4 KB blocks), cheapest first, with
    the units it needs and its monthly price."""
    out = []
    for tier in prices["tiers"]:
        block = tier.get("unit_bytes", prices["unit_bytes"])
        need = blocks_per_day * (prices["unit_bytes"] / block)  # F1 meters 0.5 KB
        units = max(1, math.ceil(need / tier["messages_per_day"]))
        if units > tier["max_units"]:
            continue
        out.append(
            {"tier": tier["tier"], "units": units, "usd": units * tier["usd_per_unit_month"]}
        )
    return sorted(out, key=lambda o: (o["usd"], o["tier"]))


def gcp_bill(billed_bytes_per_month: float, prices: dict) -> float:
    """USD for the month's billed bytes (publish plus each subscription's delivery)."""
    total = billed_bytes_per_month * (1 + prices["subscriptions"])
    return max(0.0, total - prices["free_gib_per_month"] * GIB) / TIB * prices["usd_per_tib"]


def _estimate(cloud: str, s: dict, scale: float, prices: dict) -> dict:
    """Monthly bill of ``cloud`` for the period's volume times ``scale`` (per month),
    packed as it was and unpacked (one device message per cloud message)."""
    p = prices[cloud]
    publishes = s["publishes"] * scale
    messages = s["messages"] * scale
    avg_cloud = s["bytes"] / s["publishes"] if s["publishes"] else 0.0
    # An unpacked message is about a packed one's share of its bytes.
    avg_single = s["bytes"] / s["messages"] if s["messages"] else 0.0
    if cloud == "aws":
        packed = aws_bill(s["units"] * scale, p)
        unpacked = aws_bill(messages * max(1, math.ceil(avg_single / p["unit_bytes"])), p)
        return {"usd": round(packed, 2), "unpacked_usd": round(unpacked, 2)}
    if cloud == "azure":
        per_day = s["units"] * scale / (MONTH_S / 86400)
        single = messages * max(1, math.ceil(avg_single / p["unit_bytes"])) / (MONTH_S / 86400)
        options = azure_options(per_day, p)
        unpacked = azure_options(single, p)
        return {
            "usd": options[0]["usd"] if options else None,
            "tier": options[0] if options else None,
            "unpacked_usd": unpacked[0]["usd"] if unpacked else None,
            "tiers": options[:4],
        }
    billed = publishes * max(avg_cloud, p["min_billed_bytes"])
    unpacked = messages * max(avg_single, p["min_billed_bytes"])
    return {"usd": round(gcp_bill(billed, p), 2), "unpacked_usd": round(gcp_bill(unpacked, p), 2)}


def build_report(
    since: float,
    until: float,
    prices: dict | None = None,
    quotas: dict[str, dict | None] | None = None,
) -> dict[str, Any]:
    """The report over [since, until) (epoch seconds): per relay the usage, latency
    percentiles and the monthly estimates (now and with twice the fleet); with
    ``quotas`` (relay -> `DailyQuota.status` plus ``held``) each relay's daily quota."""
    prices = prices or load_prices()
    used = usage.summary(since, until)
    relays = []
    for cloud in ("aws", "azure", "gcp"):
        s = used.get(cloud)
        if s is None:
            continue
        start = max(since, s["first_hour"])
        span = max(1.0, min(until, s["last_hour"] + 3600) - start)
        scale = MONTH_S / span
        entry = {
            "relay": cloud,
            "service": prices[cloud]["name"],
            "price_source": prices[cloud]["source"],
            "price_as_of": prices[cloud]["as_of"],
            "span_s": round(span, 1),
            **{
                k: s[k]
                for k in (
                    "messages",
                    "publishes",
                    "bytes",
                    "units",
                    "failures",
                    "retries",
                    "parked",
                )
            },
            "latency_ms": s["latency_ms"],
            "monthly": _estimate(cloud, s, scale, prices),
            "monthly_doubled": _estimate(cloud, s, 2 * scale, prices),
        }
        if (quotas or {}).get(cloud):
            entry["quota"] = quotas[cloud]
        entry["advice"] = _advice(cloud, entry)
        relays.append(entry)
    return {
        "since": since,
        "until": until,
        "price_table_version": prices["version"],
        "relays": relays,
    }


def _advice(cloud: str, entry: dict) -> str:
    m = entry["monthly"]
    if m.get("usd") is None:
        return "volume beyond every tier in the price table"
    parts = []
    if m.get("unpacked_usd") is not None and m["unpacked_usd"] > m["usd"]:
        parts.append(f"packing saves ${m['unpacked_usd'] - m['usd']:.2f}/month")
    elif m.get("unpacked_usd") is not None and m["unpacked_usd"] < m["usd"]:
        parts.append("sending unpacked would cost less")
    if cloud == "azure" and m.get("tier"):
        t = m["tier"]
        parts.append(f"cheapest tier {t['tier']} x{t['units']}")
        doubled = entry["monthly_doubled"].get("tier")
        if doubled and (doubled["tier"], doubled["units"]) != (t["tier"], t["units"]):
            parts.append(f"doubled fleet: {doubled['tier']} x{doubled['units']}")
    if cloud == "gcp":
        parts.append("packing beyond 1,000 bytes saves requests, not bytes")
    return "; ".join(parts) or "current settings are the cheapest in the table"


def render_text(report: dict) -> str:
    """The report as a fixed-width table (the CLI's default output)."""
    rows = [
        (
            "relay",
            "msgs",
            "cloud msgs",
            "bytes",
            "units",
            "fail",
            "retry",
            "parked",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "$/month",
            "x2 fleet",
        )
    ]

    def ms(v):
        return "-" if v is None else f"{v:.0f}" if v >= 10 else f"{v:.1f}"

    def usd(v):
        return "-" if v is None else f"{v:,.2f}"

    for r in report["relays"]:
        lat = r["latency_ms"]
        rows.append(
            (
                r["relay"],
                str(r["messages"]),
                str(r["publishes"]),
                str(r["bytes"]),
                str(r["units"]),
                str(r["failures"]),
                str(r["retries"]),
                str(r["parked"]),
                ms(lat["p50"]),
                ms(lat["p95"]),
                ms(lat["p99"]),
                usd(r["monthly"].get("usd")),
                usd(r["monthly_doubled"].get("usd")),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    for r in report["relays"]:
        lines.append(
            f"{r['relay']}: {r['advice']} (prices: {r['service']}, {r['price_source']}, "
            f"as of {r['price_as_of']})"
        )
    for r in report["relays"]:
        q = r.get("quota")
        if q:
            held = q.get("held")
            lines.append(
                f"{r['relay']}: daily quota {q['tier']} x{q['units']} = {q['blocks_per_day']:,} "
                f"blocks, {q['used_today']:,} used today"
                + (", messages held in the outbox until 00:00 UTC" if held else "")
            )
    if not report["relays"]:
        lines.append("no relay forwarded anything in this period")
    return "\n".join(lines)

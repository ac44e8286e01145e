"""Dashboard server time (issue 17's goal: under 300 ms with 1,000 devices and 30 days
of minute bins); not a test.

    .venv/bin/python benchmarks/bench_dashboard.py [--devices 1000] [--days 30]
        [--raw-days 1] [--rounds 5] [--db PATH --keep | --db PATH --no-fill]
        [--json FILE]

Fills a SQLite registry database the way ingest leaves it: ``line_rollup`` for
``--devices`` devices over ``--days`` days (one camera, 2 lines, 1 class; minute, hour
and day buckets, by `bench_series.fill`), and the raw ``count_bin`` rows of the last
``--raw-days`` days (one per device and minute; ``/api/devices`` reads their per-device
counters, which the fill back-fills as migration 20 does). Then
times, through the Flask app with a viewer token, every request the open dashboard
makes: the page itself, one 2-second poll of its counts (6 distinct ``/api/series``
queries: today, the last hour (also the default range and the class mix), the flow
chart, busiest lines and zones, speeds) and one 5-second poll of the fleet
(``/api/devices``, events, rollouts, drift verdicts). "Now" is the end of the filled
data (a UTC midnight), so "today" is the filled last day. Server time is the time
from request to the full response body, per request and per poll (the requests of a
poll summed, as if served one after another).

Prints a table and writes JSON (default benchmarks/results/dashboard.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

import peewee as pw
from bench_series import DAY, fill, machine, stored

from flowfleet.registry.fleet import counters
from flowfleet.registry.http import auth
from flowfleet.registry.http.web import create_app
from flowfleet.registry.store import db as regdb

HOUR = 3600


def fill_raw_bins(db: pw.Database, devices: int, days: int, end: float) -> float:
    """One raw count bin per device and minute for the last ``days`` days before
    ``end``; returns seconds taken. Generated in SQL like the rollups."""
    t0 = time.perf_counter()
    minutes = int(days * 1440)
    payload = '{"kind":"counts","lines":[]}'
    ids = [d for (d,) in regdb.Device.select(regdb.Device.id).order_by(regdb.Device.id).tuples()]
    with db.atomic():
        db.execute_sql("CREATE TEMP TABLE bench_rawd (i INTEGER PRIMARY KEY, id VARCHAR(64))")
        db.cursor().executemany("INSERT INTO bench_rawd VALUES (?, ?)", list(enumerate(ids)))
        db.execute_sql("CREATE TEMP TABLE bench_rawm (m INTEGER PRIMARY KEY)")
        db.cursor().executemany("INSERT INTO bench_rawm VALUES (?)", [(m,) for m in range(minutes)])
        db.execute_sql(
            "INSERT INTO count_bin (device, seq, window_start, window_end, received_at, payload) "
            "SELECT d.id, m.m + 1, ? + 60 * m.m, ? + 60 * m.m + 60, ? + 60 * m.m + 61, ? "
            "FROM bench_rawd d CROSS JOIN bench_rawm m ORDER BY m.m, d.i",
            (end - minutes * 60, end - minutes * 60, end - minutes * 60, payload),
        )
        db.execute_sql("DROP TABLE bench_rawd")
        db.execute_sql("DROP TABLE bench_rawm")
        # Ingest keeps the per-device counters /api/devices reads; rows inserted here
        # bypass it, so count them the way migration 20 does for an older database.
        counters.backfill(db)
    return time.perf_counter() - t0


def old_counts() -> tuple[dict, dict, dict]:
    """The queries /api/devices ran on every request before migration 20 (copied from
    registry/http/web.py as it was): every raw bin and beat counted per device."""
    cb, hb, dl = regdb.CountBin, regdb.HealthBeat, regdb.DeadLetter
    bins = {
        d: (n, top)
        for d, n, top in cb.select(cb.device, pw.fn.COUNT(cb.id), pw.fn.MAX(cb.seq))
        .group_by(cb.device)
        .tuples()
    }
    beats = {
        d: (n, top)
        for d, n, top in hb.select(hb.device, pw.fn.COUNT(hb.id), pw.fn.MAX(hb.seq))
        .group_by(hb.device)
        .tuples()
    }
    dead = dict(
        dl.select(dl.device, pw.fn.COUNT(dl.id))
        .where(dl.device.is_null(False))
        .group_by(dl.device)
        .tuples()
    )
    return bins, beats, dead


def series_urls(now: float) -> list[str]:
    """The /api/series requests of one dashboard poll (static/dashboard.js) with its
    default range, the last hour, ending at ``now``."""
    today = now - DAY
    hour = now - HOUR

    def q(**kw) -> str:
        return "/api/series?" + urlencode(kw)

    return [
        q(kind="lines", step="hour", **{"from": int(today), "to": int(now)}, group="class"),
        # the last hour, the range and the class mix: one URL, asked once per poll
        q(kind="lines", step="minute", **{"from": int(hour), "to": int(now)}, group="class"),
        q(kind="lines", step="minute", **{"from": int(hour), "to": int(now)}),
        q(
            kind="lines",
            step="hour",
            **{"from": int(hour), "to": int(now)},
            group="device,camera,line",
        ),
        q(
            kind="zones",
            step="hour",
            **{"from": int(hour), "to": int(now)},
            group="device,camera,zone",
        ),
        q(
            kind="speeds",
            step="hour",
            **{"from": int(hour), "to": int(now)},
            group="device,camera,line",
        ),
    ]


FLEET_URLS = [
    "/api/devices",
    "/api/events?limit=10",
    "/api/rollouts?limit=100",
    "/api/drift/verdicts?limit=200",
]


def timed_get(client, url: str, headers: dict) -> float:
    t = time.perf_counter()
    resp = client.get(url, headers=headers)
    body = resp.get_data()  # the whole body: JSON serialisation included
    ms = (time.perf_counter() - t) * 1000
    if resp.status_code != 200:
        raise SystemExit(f"{url}: {resp.status_code} {body[:300]!r}")
    return ms


def summary(times: list[float]) -> dict:
    times = sorted(times)
    return {
        "n": len(times),
        "p50_ms": round(statistics.median(times), 1),
        "max_ms": round(times[-1], 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--db", help="a SQLite path (default: a temporary file)")
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--days", type=int, default=30, help="days of minute/hour/day rollups")
    ap.add_argument("--raw-days", type=float, default=1.0, help="days of raw count bins")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/dashboard.json"))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--no-fill", action="store_true", help="time a database filled earlier")
    args = ap.parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.db:
            path = Path(args.db)
        else:
            tmp = tempfile.mkdtemp(prefix="bench_dashboard_")
            path = Path(tmp) / "dashboard.sqlite"
            if not args.keep:
                stack.callback(shutil.rmtree, tmp, True)
        return run(args, path)


def run(args, path: Path) -> int:
    print("machine:", machine(), flush=True)
    db = regdb.open_database(path, backup=False)
    fill_times: dict = {}
    if args.no_fill:
        latest = regdb.LineRollup.select(pw.fn.MAX(regdb.LineRollup.bucket)).scalar()
        end = float((int(latest) // DAY + 1) * DAY)
    else:
        end = float((int(time.time()) // DAY) * DAY)
        t = time.perf_counter()
        _, fill_times = fill(db, args.devices, args.days, 2, 1, end)
        fill_times["raw_bins_s"] = round(fill_raw_bins(db, args.devices, args.raw_days, end), 1)
        fill_times["total_s"] = round(time.perf_counter() - t, 1)
        print("fill:", fill_times, flush=True)
    raw = regdb.CountBin.select().count()
    size = stored(db)
    with db.connection_context():
        if not regdb.User.select().where(regdb.User.name == "bench").exists():
            auth.create_user("bench", "viewer", actor="bench")
        token, _ = auth.create_token("bench", actor="bench")
    headers = {"Authorization": f"Bearer {token}"}
    app = create_app(db)
    client = app.test_client()
    now = end
    # The page, then polls; the first round warms the page cache and is reported apart.
    rounds = []
    per_url: dict[str, list[float]] = {}
    for r in range(args.rounds + 1):
        page = timed_get(client, "/", headers)
        counts = [timed_get(client, u, headers) for u in series_urls(now)]
        fleet = [timed_get(client, u, headers) for u in FLEET_URLS]
        if r == 0:
            cold = {"page_ms": round(page, 1), "counts_ms": round(sum(counts), 1)}
            cold["fleet_ms"] = round(sum(fleet), 1)
            continue
        rounds.append({"page": page, "counts": sum(counts), "fleet": sum(fleet)})
        for u, ms in zip(series_urls(now) + FLEET_URLS, counts + fleet, strict=True):
            key = u.split("?")[0] + ("?" + u.split("?")[1][:60] if "?" in u else "")
            per_url.setdefault(key, []).append(ms)
        per_url.setdefault("/ (page)", []).append(page)
    # Side by side: what /api/devices computed per request before migration 20 (every
    # raw bin and beat counted), against reading the counters ingest keeps.
    raw_counting, kept = [], []
    with db.connection_context():
        for _ in range(args.rounds):
            t = time.perf_counter()
            old_counts()
            raw_counting.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            counters.read()
            kept.append((time.perf_counter() - t) * 1000)
    results = {
        "database": regdb.describe(db),
        "machine": machine(),
        "devices": regdb.Device.select().count(),
        "days_of_rollups": args.days,
        "raw_count_bins": raw,
        "line_rollup": size,
        "fill": fill_times,
        "cold_first_round": cold,
        "warm": {
            "page": summary([r["page"] for r in rounds]),
            "counts_poll": summary([r["counts"] for r in rounds]),
            "fleet_poll": summary([r["fleet"] for r in rounds]),
            "page_plus_both_polls": summary([r["page"] + r["counts"] + r["fleet"] for r in rounds]),
        },
        "per_request": {k: summary(v) for k, v in per_url.items()},
        "device_counters": {
            "counted_from_raw_tables": summary(raw_counting),
            "read_from_device_counters": summary(kept),
        },
    }
    rows = size["rows"]
    print(
        f"\n{results['database']}: {results['devices']} devices, line_rollup "
        f"{sum(rows.values()):,} rows ({rows['minute']:,} minute), {raw:,} raw count bins, "
        f"{size['database_bytes'] / 2**30:.2f} GiB"
    )
    print("cold first round:", cold)
    print(f"{'what (warm)':<70} {'n':>3} {'p50 ms':>8} {'max ms':>8}")
    rows_out = list(results["warm"].items()) + list(results["per_request"].items())
    rows_out += list(results["device_counters"].items())
    for name, s in rows_out:
        print(f"{name:<70} {s['n']:>3} {s['p50_ms']:>8} {s['max_ms']:>8}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

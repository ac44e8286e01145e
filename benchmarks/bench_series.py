"""Series query benchmark (issue 15's goal); not a test.

    .venv/bin/python benchmarks/bench_series.py [--db URL] [--devices 1000] [--days 30]
        [--queries 200] [--json FILE]

Fills the rollup tables the way ingest would leave them for ``--devices`` devices with
one camera, one line and one class over ``--days`` days (a minute bucket for every
minute, an hour and a day bucket for every hour and day; generated in SQL, so the
fill takes minutes at the full size, not the hours that ingesting 43 million bins
would), then times the queries the dashboard makes through
`flowfleet.registry.fleet.series.query`:

1. a day of minute buckets for one device (random device and day), the goal being
   p95 under 50 ms with 1,000 devices x 30 days stored;
2. a day of hour buckets for the whole fleet, one series per device;
3. 30 days of day buckets for the whole fleet (one series).

Prints a table and writes JSON (default benchmarks/results/series.json).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from flowfleet.registry.fleet import series
from flowfleet.registry.store import db as regdb

DAY = 86400


def fill(db, devices: int, days: int, end: float) -> int:
    """Rollup rows for ``devices`` x ``days`` ending at ``end`` (a UTC midnight)."""
    start = end - days * DAY
    postgres = isinstance(db, regdb.pw.PostgresqlDatabase)
    with db.atomic():
        regdb.Device.insert_many(
            [{"id": f"cam-{i:04d}", "first_seen": start} for i in range(devices)]
        ).execute()
    total = 0
    steps = (("m", 60, days * 1440), ("h", 3600, days * 24), ("d", DAY, days))
    bar = tqdm(total=devices * len(steps), desc="filling rollups", unit="device-step")
    for code, size, n in steps:
        for i in range(devices):
            device = f"cam-{i:04d}"
            if postgres:
                sql = (
                    "INSERT INTO line_rollup (device, camera, line, class, step, bucket, bins, "
                    "count_in, count_out) SELECT %s, 'front', 'door', 'person', %s, "
                    "%s + g * %s, 1, (g * 7) %% 5, (g * 3) %% 4 FROM generate_series(0, %s) g"
                )
                db.execute_sql(sql, (device, code, start, size, n - 1))
            else:
                sql = (
                    "WITH RECURSIVE g(x) AS (SELECT 0 UNION ALL SELECT x + 1 FROM g WHERE x < ?) "
                    "INSERT INTO line_rollup (device, camera, line, class, step, bucket, bins, "
                    "count_in, count_out) SELECT ?, 'front', 'door', 'person', ?, ? + x * ?, 1, "
                    "(x * 7) % 5, (x * 3) % 4 FROM g"
                )
                with db.atomic():
                    db.execute_sql(sql, (n - 1, device, code, start, size))
            total += n
            bar.update()
    bar.close()
    return total


def timed(fn, n: int) -> dict:
    times = []
    for _ in tqdm(range(n), desc=fn.__name__, unit="query", leave=False):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return {
        "n": n,
        "p50_ms": round(statistics.median(times), 2),
        "p95_ms": round(times[int(0.95 * (n - 1))], 2),
        "max_ms": round(times[-1], 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--db", help="a PostgreSQL URL, or a SQLite path (default: a temp file)")
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/series.json"))
    args = ap.parse_args(argv)
    url = args.db or str(Path(tempfile.mkdtemp()) / "series.sqlite")
    db = regdb.open_database(url)
    end = float((int(time.time()) // DAY) * DAY)
    t = time.perf_counter()
    rows = fill(db, args.devices, args.days, end)
    fill_s = time.perf_counter() - t
    buckets = series.Buckets()
    rng = random.Random(1)

    def device_day_minutes():
        day = end - rng.randrange(args.days) * DAY
        q = series.Query(
            step="minute", start=day - DAY, end=day, device=f"cam-{rng.randrange(args.devices):04d}"
        )
        assert len(series.query(db, q, buckets)["series"][0]["points"]) == 1440

    def fleet_day_hours_by_device():
        q = series.Query(step="hour", start=end - DAY, end=end, group=("device",))
        assert len(series.query(db, q, buckets)["series"]) == args.devices

    def fleet_month_days():
        q = series.Query(step="day", start=end - args.days * DAY, end=end)
        series.query(db, q, buckets)

    results = {
        "database": regdb.describe(db),
        "devices": args.devices,
        "days": args.days,
        "rollup_rows": rows,
        "fill_s": round(fill_s, 1),
        "queries": {
            "device_day_of_minutes": timed(device_day_minutes, args.queries),
            "fleet_day_of_hours_by_device": timed(fleet_day_hours_by_device, 10),
            "fleet_month_of_days": timed(fleet_month_days, 10),
        },
    }
    print(
        f"{results['database']}: {rows:,} rollup rows ({args.devices} devices x {args.days} "
        f"days), filled in {fill_s:.0f} s"
    )
    print(f"{'query':<32} {'n':>5} {'p50 ms':>9} {'p95 ms':>9} {'max ms':>9}")
    for name, r in results["queries"].items():
        print(f"{name:<32} {r['n']:>5} {r['p50_ms']:>9} {r['p95_ms']:>9} {r['max_ms']:>9}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

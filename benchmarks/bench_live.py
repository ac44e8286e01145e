"""What an open live stream and the health series cost the registry; not a test.

    .venv/bin/python benchmarks/bench_live.py [--devices 1000] [--days 31] [--rounds 50]
        [--json FILE]

Fills a SQLite registry database the way ingest leaves it: ``--devices`` devices with
their counters (`DeviceCounters`) and reported states, and, for one device, a health
beat a minute for ``--days`` days (two cameras and the system figures, as an agent
sends them). Then, in one process on the same database, times:

* one tick of a live stream (`fleet.live.markers`, what ``/api/live`` does every
  0.5 s per open stream) against one ``/api/devices`` answer (`queries.devices`, what
  the dashboard's fleet poll asks every 5 s without a stream): the ratio says what a
  stream's ticks cost next to the polling it replaces;
* ``/api/devices/<id>/health`` (`fleet.health_series`, 300 points) over the last day
  and over the whole ``--days`` (the longest range the API allows), and that month
  again with every beat's JSON parsed (no sampling): what sampling the means saves;
  then the last day again without migration 24's ``(device, ts)`` index.

Prints a table and writes JSON (default benchmarks/results/live.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_series import machine

from flowfleet.contract import CameraHealth, Health, SystemHealth
from flowfleet.registry.fleet import live
from flowfleet.registry.fleet.health_series import health_series
from flowfleet.registry.http.queries import devices as devices_query
from flowfleet.registry.store import db as regdb
from flowfleet.registry.store.counters_tables import DeviceCounters

END = float(int(time.time()) // 86400 * 86400)


def fill(db, n_devices: int, days: int) -> dict:
    t0 = time.perf_counter()
    ids = [f"dev-{i:05d}" for i in range(n_devices)]
    reported = json.dumps({"cameras": [{"camera": "front", "model": "yolo", "version": 1}]})
    with db.atomic():
        regdb.Device.insert_many(
            [{"id": d, "first_seen": END - 86400, "last_seen": END, "state": "online"} for d in ids]
        ).execute()
        DeviceCounters.insert_many(
            [{"device": d, "bins": 1440, "bin_seq_max": 1440, "last_bin_at": END} for d in ids]
        ).execute()
        regdb.ReportedState.insert_many(
            [{"device": d, "ts": END, "received_at": END, "payload": reported} for d in ids]
        ).execute()
    beats = []
    for i in range(int(days * 1440)):
        ts = END - days * 86400 + 60 * i
        beat = Health(
            device=ids[0],
            seq=i + 1,
            ts=ts,
            uptime_s=60.0 * i + 1,
            outbox_depth=i % 7,
            system=SystemHealth(soc_temp_c=50 + i % 10, load_1m=1.5, cpu_percent=40.0),
            cameras=tuple(
                CameraHealth(camera=c, state="running", fps=9.5, inference_ms=80.0, frames=i)
                for c in ("front", "back")
            ),
        )
        beats.append(
            {"device": ids[0], "seq": i + 1, "ts": ts, "received_at": ts, "payload": beat.to_json()}
        )
    with db.atomic():
        for k in range(0, len(beats), 2000):
            regdb.HealthBeat.insert_many(beats[k : k + 2000]).execute()
    return {"devices": n_devices, "beats": len(beats), "fill_s": round(time.perf_counter() - t0, 1)}


def timed(fn, rounds: int) -> dict:
    fn()  # warm
    ms = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t0) * 1000)
    return {"p50_ms": round(statistics.median(ms), 2), "max_ms": round(max(ms), 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--days", type=int, default=31)
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "live.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        db = regdb.open_database(Path(tmp) / "live.sqlite")
        with db.connection_context():
            filled = fill(db, args.devices, args.days)
            device = "dev-00000"
            rows = {
                "live tick (markers)": timed(live.markers, args.rounds),
                "/api/devices (devices())": timed(devices_query, max(5, args.rounds // 5)),
                "health, last day (300 points)": timed(
                    lambda: health_series(device, END - 86400, END, 300), args.rounds
                ),
                f"health, {args.days} days (300 points)": timed(
                    lambda: health_series(device, END - args.days * 86400, END, 300),
                    max(3, args.rounds // 10),
                ),
                f"health, {args.days} days, every beat parsed": timed(
                    lambda: health_series(device, END - args.days * 86400, END, 300, sample=10**9),
                    max(3, args.rounds // 10),
                ),
            }
            # The same last day without migration 24's (device, ts) index.
            db.execute_sql("DROP INDEX health_beat_device_ts")
            rows["health, last day, no (device, ts) index"] = timed(
                lambda: health_series(device, END - 86400, END, 300), args.rounds
            )
        db.close()
    tick = rows["live tick (markers)"]["p50_ms"]
    poll = rows["/api/devices (devices())"]["p50_ms"]
    # A stream ticks 10 times in the 5 s between two fleet polls.
    month = rows[f"health, {args.days} days (300 points)"]["p50_ms"]
    every = rows[f"health, {args.days} days, every beat parsed"]["p50_ms"]
    ratios = {
        "10 ticks / one /api/devices": round(10 * tick / poll, 3),
        "health month: sampled / every beat": round(month / every, 3),
        "health day: index / no index": round(
            rows["health, last day (300 points)"]["p50_ms"]
            / rows["health, last day, no (device, ts) index"]["p50_ms"],
            3,
        ),
    }
    print(f"{'what':40} {'p50 ms':>9} {'max ms':>9}")
    for name, r in rows.items():
        print(f"{name:40} {r['p50_ms']:>9.2f} {r['max_ms']:>9.2f}")
    for name, r in ratios.items():
        print(f"{name:40} {r:>9.3f}")
    out = {"filled": filled, "rows": rows, "ratios": ratios, "machine": machine()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

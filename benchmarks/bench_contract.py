"""parse_payload throughput on count bins (the registry's ingest parses every message).

Prints messages per second for a typical bin (one camera, two lines and one zone, three
classes: 6 line rows, 3 zone rows) and a large one (4 cameras x 5 lines x 6 classes =
120 line rows, 24 zone rows), median of ``--rounds`` timed runs of ``--n`` parses each.

    .venv/bin/python benchmarks/bench_contract.py --rounds 7 --n 20000
"""

from __future__ import annotations

import argparse
import statistics
import time

from flowfleet.contract import CountBin, LineCount, ZoneCount, parse_payload

CLASSES = ("person", "bicycle", "car", "motorcycle", "bus", "truck")


def make_bin(cameras: int, lines: int, zones: int, classes: int) -> bytes:
    start = float(int(time.time()) // 60 * 60 - 60)
    line_rows = [
        LineCount(camera=f"cam{c}", line=f"line{n}", class_=k, in_=7 + n, out=5)
        for c in range(cameras)
        for n in range(lines)
        for k in CLASSES[:classes]
    ]
    zone_rows = [
        ZoneCount(
            camera=f"cam{c}",
            zone=f"zone{n}",
            class_=k,
            entries=4,
            exits=3,
            peak_occupancy=2,
            dwell_s_sum=61.5,
            dwell_n=3,
        )
        for c in range(cameras)
        for n in range(zones)
        for k in CLASSES[:classes]
    ]
    return CountBin(
        device="lobby-cam",
        seq=42,
        start=start,
        end=start + 60,
        lines=tuple(line_rows),
        zones=tuple(zone_rows),
    ).to_json()


def rate(raw: bytes, n: int, rounds: int, **kwargs) -> float:
    for _ in range(min(n, 1000)):  # warm up
        parse_payload("counts", raw, device="lobby-cam", **kwargs)
    results = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            parse_payload("counts", raw, device="lobby-cam", **kwargs)
        results.append(n / (time.perf_counter() - t0))
    return statistics.median(results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--now", action="store_true", help="pass now= (receive-time check)")
    args = ap.parse_args()
    kwargs = {"now": time.time()} if args.now else {}
    for label, raw, n in (
        ("typical bin (6 line rows, 3 zone rows)", make_bin(1, 2, 1, 3), args.n),
        ("large bin (120 line rows, 24 zone rows)", make_bin(4, 5, 1, 6), args.n // 10),
    ):
        r = rate(raw, n, args.rounds, **kwargs)
        print(f"{label}: {len(raw)} bytes, {r:,.0f} parses/s ({1e6 / r:.1f} us each)")


if __name__ == "__main__":
    main()

"""Registry benchmarks (issue 5's performance goals); not a test.

    .venv/bin/python benchmarks/bench_registry.py [--db URL] [--json FILE]

Prints a table and writes JSON (default benchmarks/results/registry.json).

1. Registering a 4 MB model (hash, sniff and parse, sign, store, commit): the sample
   TFLite model padded to 4 MiB with random bytes (a FlatBuffer ignores trailing
   bytes), so every run registers new content. Median and p95 of 20.
2. Model list and version queries with 1,000 versions of one model, through the
   Flask app with a token (auth included): ``GET /api/models``,
   ``GET /api/models/m/versions?limit=100``, ``GET /api/models/m/versions/500``.
   p95 of 200 each.
3. Artifact download throughput of a 64 MiB artifact through the registry's own
   HTTP server (waitress, as `run_registry` serves it) compared with
   Python's ``http.server`` serving the same file, alternating; the median of 9
   per-round ratios.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import statistics
import tempfile
import threading
import time
import urllib.request
from functools import partial
from pathlib import Path

from flowfleet.data import models_dir
from flowfleet.registry.catalog.artifacts import LocalStore
from flowfleet.registry.catalog.keys import KeyRing
from flowfleet.registry.catalog.modelreg import MIB, ModelRegistry
from flowfleet.registry.http import auth
from flowfleet.registry.http.server import HttpServer
from flowfleet.registry.http.web import create_app
from flowfleet.registry.store import db as regdb

SAMPLE = "yolov8n_full_integer_quant.tflite"
QUERIES = (
    ("list_models", "/api/models"),
    ("list_versions_100", "/api/models/many/versions?limit=100"),
    ("get_version", "/api/models/many/versions/500"),
)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def bench_register(reg: ModelRegistry, work: Path, n: int = 20) -> dict[str, float]:
    base = (models_dir() / SAMPLE).read_bytes()
    times = []
    for i in range(n):
        path = work / f"m{i}.tflite"
        path.write_bytes(base + os.urandom(4 * MIB - len(base)))
        t = time.perf_counter()
        with reg.db.connection_context():
            _, created = reg.add_version(path, name="bench", filename=path.name, actor="bench")
        times.append((time.perf_counter() - t) * 1000)
        assert created
    return {"median_ms": statistics.median(times), "p95_ms": _pct(times, 0.95)}


def bench_queries(reg: ModelRegistry, client, headers, n: int = 200) -> dict[str, float]:
    with reg.db.connection_context(), reg.db.atomic():
        model = regdb.RegistryModel.create(
            name="many", created_at=0, created_by="bench", last_version=1000
        )
        rows = [
            {
                "model": model.id,
                "version": v,
                "sha256": f"{v:064x}",
                "size": 1,
                "runtime": "tflite",
                "filename": "x.tflite",
                "metadata": json.dumps({"inputs": [{"shape": [1, 640, 640, 3]}]}),
                "manifest": "{}",
                "created_at": v,
                "created_by": "bench",
            }
            for v in range(1, 1001)
        ]
        for i in range(0, len(rows), 100):
            regdb.ModelVersion.insert_many(rows[i : i + 100]).execute()
    out = {}
    for label, url in QUERIES:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            resp = client.get(url, headers=headers)
            times.append((time.perf_counter() - t) * 1000)
            assert resp.status_code == 200, resp.get_json()
        out[f"{label}_p95_ms"] = _pct(times, 0.95)
        out[f"{label}_median_ms"] = statistics.median(times)
    return out


def _serve(server) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


def _fetch(url: str, headers: dict[str, str]) -> float:
    req = urllib.request.Request(url, headers=headers)
    t = time.perf_counter()
    total = 0
    with urllib.request.urlopen(req) as resp:
        while block := resp.read(MIB):
            total += len(block)
    return total / MIB / (time.perf_counter() - t)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def bench_download(reg: ModelRegistry, app, headers, work: Path, rounds: int = 9) -> dict:
    base = (models_dir() / SAMPLE).read_bytes()
    path = work / "big.tflite"
    path.write_bytes(base + os.urandom(64 * MIB - len(base)))
    with reg.db.connection_context():
        v, _ = reg.add_version(path, name="big", filename=path.name, actor="bench")
    static_dir = work / "static"
    static_dir.mkdir()
    os.link(reg.store.path(v.sha256), static_dir / "big.tflite")
    ours = HttpServer(app, "127.0.0.1", 0)
    plain = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(_Quiet, directory=str(static_dir))
    )
    _serve(ours), _serve(plain)
    try:
        url_ours = f"http://127.0.0.1:{ours.port}/api/models/big/versions/1/artifact"
        url_plain = f"http://127.0.0.1:{plain.server_port}/big.tflite"
        a, b = [], []
        for _ in range(rounds):
            a.append(_fetch(url_ours, headers))
            b.append(_fetch(url_plain, {}))
        return {
            "registry_MiB_s": statistics.median(a),
            "http_server_MiB_s": statistics.median(b),
            # Per-round ratios (side by side), then the median: robust to a busy machine.
            "ratio": statistics.median(x / y for x, y in zip(a, b, strict=True)),
        }
    finally:
        ours.shutdown()
        plain.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", help="database URL (default: a temporary SQLite file)")
    parser.add_argument(
        "--json",
        type=Path,
        default=Path("benchmarks/results/registry.json"),
        help="write the results as JSON here (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        db = regdb.open_database(args.db or work / "bench.db")
        reg = ModelRegistry(
            db, LocalStore(work / "artifacts"), KeyRing(work / "keys"), max_upload_bytes=128 * MIB
        )
        reg.start()
        with db.connection_context():
            auth.create_user("bench", "viewer", actor="bench")
            token, _ = auth.create_token("bench", actor="bench")
        headers = {"Authorization": f"Bearer {token}"}
        app = create_app(db, registry=reg)
        results = {
            "database": "postgresql" if isinstance(db, regdb.pw.PostgresqlDatabase) else "sqlite",
            "register_4MiB": bench_register(reg, work),
            "queries_1000_versions": bench_queries(reg, app.test_client(), headers),
            "download_64MiB": bench_download(reg, app, headers, work),
        }
    print_table(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


def print_table(results: dict) -> None:
    reg = results["register_4MiB"]
    q = results["queries_1000_versions"]
    d = results["download_64MiB"]
    rows = [("register a 4 MiB model, median / p95", "< 100 ms", _ms_pair(reg))]
    rows += [
        (f"GET {url}, p95", "< 20 ms", f"{q[f'{label}_p95_ms']:.1f} ms") for label, url in QUERIES
    ]
    rows.append(("download 64 MiB, registry / http.server", ">= 0.80", f"{d['ratio']:.2f}"))
    print(f"database: {results['database']}")
    width = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{width}}  {'goal':<9}  result")
    for name, goal, value in rows:
        print(f"{name:<{width}}  {goal:<9}  {value}")


def _ms_pair(stats: dict) -> str:
    return f"{stats['median_ms']:.0f} / {stats['p95_ms']:.0f} ms"


if __name__ == "__main__":
    raise SystemExit(main())

"""Cloud relays: what they cost ingest, and how fast each forwards; not a test.

    .venv/bin/python benchmarks/bench_relays.py [--bins 20000] [--devices 200]
        [--rounds 3] [--relay-messages 20000] [--relays gcp,azure,aws]
        [--aws-connections 4] [--pg URL] [--json FILE]

Prints two tables and writes JSON (default benchmarks/results/relays.json).

1. Ingest slowdown: the same ``--bins`` count bins (from ``--devices`` devices, as
   bench_ingest.py makes them) stored by `Ingestor.handle_batch` in batches of 500
   into a fresh SQLite database (and PostgreSQL with ``--pg``), without relays and
   with all three relays routed (aws, azure, gcp: three outbox rows per bin, in the
   same transaction). Only the storing is timed: the MQTT side is the same either
   way, so this is the harshest view of the cost. The two alternate in each round;
   the median ratio over rounds is reported.
2. Forwarding rate per relay to its local endpoint (the ones the tests use: the
   Pub/Sub emulator; Mosquitto TLS laid out like IoT Hub with the SAS token as
   password; Mosquitto requiring client certificates for AWS IoT Core):
   ``--relay-messages`` bins ingested with the relay routed, then forwarded by one
   `RelayRunner` until its outbox is empty (reading each payload back from the count
   bins, as in the registry), with packing as given; the latency therefore includes
   the time the backlog waited; beside it the rate one connection may reach
   under the cloud's documented limit at that packing. AWS also runs with
   ``--aws-connections`` connections (IoT Core's limits are per connection), and
   reports each connection's measured publishes/s and KB/s beside the limit.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/relay_endpoints.py: the local endpoints

from bench_ingest import make_bins  # noqa: E402

from flowfleet.contract import Topics  # noqa: E402
from flowfleet.registry.fleet.ingest import STORED, Ingestor  # noqa: E402
from flowfleet.registry.relays import outbox  # noqa: E402
from flowfleet.registry.relays.job import RelayRunner  # noqa: E402
from flowfleet.registry.relays.outbox import Route  # noqa: E402
from flowfleet.registry.store import db as regdb  # noqa: E402
from flowfleet.registry.testing import fresh_database, release, temporary_postgres  # noqa: E402

TOPICS = Topics()
ROUTES = tuple(Route(name, ("counts",)) for name in ("aws", "azure", "gcp"))


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ingest_once(url: str, bins, routes) -> tuple[float, float]:
    """(wall, CPU) seconds `handle_batch` takes to store ``bins`` into the emptied
    database. CPU time of this process is the steadier measure on a shared machine
    (SQLite runs in-process; on PostgreSQL it misses the server's share)."""
    fresh_database(url)
    db = regdb.open_database(url)
    ingestor = Ingestor(db, TOPICS, relay_routes=routes)
    t = time.time()
    items = [(topic, payload, t) for topic, payload in bins]
    took = cpu = 0.0
    with db.connection_context():
        for i in range(0, len(items), 500):
            began, began_cpu = time.perf_counter(), time.process_time()
            outcomes = ingestor.handle_batch(items[i : i + 500])
            took += time.perf_counter() - began
            cpu += time.process_time() - began_cpu
            assert set(outcomes) == {STORED}, set(outcomes)
        queued = ingestor.relays_queued
    assert queued == len(bins) * len(routes), queued
    release()
    return took, cpu


def bench_ingest(urls: dict[str, str], bins, rounds: int) -> list[dict]:
    rows = []
    for name, url in urls.items():
        plain, relayed = [], []
        for r in range(rounds):
            order = [(), ROUTES] if r % 2 == 0 else [ROUTES, ()]
            for routes in order:
                (relayed if routes else plain).append(ingest_once(url, bins, routes))
            progress(
                f"ingest {name} round {r + 1}: wall {plain[-1][0]:.2f}s / {relayed[-1][0]:.2f}s, "
                f"cpu {plain[-1][1]:.2f}s / {relayed[-1][1]:.2f}s"
            )
        wall = [b[0] / a[0] for a, b in zip(plain, relayed, strict=True)]
        cpu = [b[1] / a[1] for a, b in zip(plain, relayed, strict=True)]
        rows.append(
            {
                "database": name,
                "bins": len(bins),
                "plain_bins_per_s": round(len(bins) / statistics.median(p[0] for p in plain)),
                "relayed_bins_per_s": round(len(bins) / statistics.median(p[0] for p in relayed)),
                "slowdown_wall_median": round(statistics.median(wall) - 1, 4),
                "slowdown_cpu_median": round(statistics.median(cpu) - 1, 4),
                "wall_ratios": [round(x, 4) for x in wall],
                "cpu_ratios": [round(x, 4) for x in cpu],
            }
        )
    return rows


# -- forwarding ---------------------------------------------------------------------


def _queue(url: str, relay: str, bins) -> None:
    """Ingest ``bins`` into the emptied database with ``relay`` routed: the outbox holds
    references and the relay reads each payload back, as in the registry."""
    fresh_database(url)
    db = regdb.open_database(url)
    ingestor = Ingestor(db, TOPICS, relay_routes=(Route(relay, ("counts",)),))
    t = time.time()
    items = [(topic, payload, t) for topic, payload in bins]
    with db.connection_context():
        for i in range(0, len(items), 500):
            assert set(ingestor.handle_batch(items[i : i + 500])) == {STORED}


def _drain(db, runner) -> tuple[float, int]:
    began = time.perf_counter()
    forwarded = 0
    while True:
        result = runner.run_once()
        forwarded += result.forwarded
        if result.error:
            raise RuntimeError(f"{runner.name}: {result.error}")
        if result.taken == 0:
            with db.connection_context():
                if not outbox.due(runner.name, 1):
                    break
    return time.perf_counter() - began, forwarded


def bench_forwarding(
    bins, workdir: Path, aws_connections: int = 4, relays: tuple[str, ...] = ("gcp", "azure", "aws")
) -> list[dict]:
    from flowfleet.registry.relays import usage
    from flowfleet.registry.relays.aws import IotCoreRelay
    from flowfleet.registry.relays.azure import (
        API_VERSION,
        ConnectionString,
        IotHubRelay,
        sas_token,
    )
    from flowfleet.registry.relays.gcp import PubSubRelay
    from flowfleet.registry.relays.provision import provision_gcp
    from flowfleet.registry.relays.settings import AwsRelay, AzureRelay, GcpRelay
    from tests.relay_endpoints import PubSubEmulator, TlsBroker

    url = fresh_database(str(workdir / "forward.db"))
    db = regdb.open_database(url)
    rows = []

    emu = PubSubEmulator(workdir / "pubsub").start()
    key = base64.b64encode(b"flowfleet relay bench key 32 byt").decode()
    now = 1_900_000_000.0
    user = f"localhost/relay-1/?api-version={API_VERSION}"
    token = sas_token("localhost/devices/relay-1", key, int(now) + 3600)
    hub = TlsBroker(workdir / "iothub", users={user: token}).start()
    iot = TlsBroker(workdir / "iotcore", client_certs=True).start()
    try:
        cases = []
        for units in (1, 4):
            s = GcpRelay(
                project="flowfleet-bench",
                topic=f"bench-{units}",
                emulator_host=emu.host,
                pack_units=units,
                batch_max=2000,
            )
            provision_gcp(s, f"bench-{units}")
            cases.append(("gcp", s, PubSubRelay(s), "no per-connection publish limit"))
        conn = ConnectionString.parse(f"HostName=localhost;DeviceId=relay-1;SharedAccessKey={key}")
        for units in (1, 2):
            s = AzureRelay(
                connection_string_env="UNUSED",
                port=hub.tls_port,
                ca_file=str(hub.ca.cert),
                pack_units=units,
                batch_max=2000,
            )
            relay = IotHubRelay(s, clock=lambda: now, connection=conn)
            cases.append(("azure", s, relay, "S1: 100 sends/s per hub"))
        cert = iot.client_cert("relay-aws")
        for units, conns in ((1, 1), (4, 1), (1, aws_connections), (4, aws_connections)):
            s = AwsRelay(
                endpoint="localhost",
                port=iot.tls_port,
                client_id="relay-aws",
                cert_file=str(cert.cert),
                key_file=str(cert.key),
                ca_file=str(iot.ca.cert),
                pack_units=units,
                batch_max=2000,
                connections=conns,
            )
            cases.append(("aws", s, IotCoreRelay(s), "100 publishes/s and 512 KB/s per connection"))
        for name, s, relay, limit in cases:
            if name not in relays:
                continue
            _queue(url, name, bins)
            db = regdb.open_database(url)
            runner = RelayRunner(db, relay, s, lease_s=60)
            try:
                took, forwarded = _drain(db, runner)
            finally:
                runner.stop()
            with db.connection_context():
                used = usage.summary(time.time() - 7200, time.time() + 1)[name]
            per_publish = used["messages"] / used["publishes"]
            publishes_per_s = {"aws": 100.0, "azure": 100.0}.get(name)
            limit_rate = round(publishes_per_s * per_publish) if publishes_per_s else None
            conns = getattr(s, "connections", 1)
            per_connection = None
            if name == "aws":  # and the SDK throttles to IoT Core's 512 KB/s per connection
                limit_rate = min(limit_rate, round(512 * 1024 / (used["bytes"] / forwarded)))
                per_connection = [
                    {
                        "client_id": c.client_id,
                        "publishes": c.publishes,
                        "publishes_per_s": round(c.publishes / took, 1),
                        "kb_per_s": round(c.bytes / 1024 / took, 1),
                    }
                    for c in relay.stats
                ]
            row = {
                "relay": name,
                "connections": conns,
                "per_connection": per_connection,
                "pack_units": s.pack_units,
                "messages": forwarded,
                "seconds": round(took, 2),
                "messages_per_s": round(forwarded / took),
                "cloud_messages": used["publishes"],
                "messages_per_cloud_message": round(per_publish, 1),
                "billing_units": used["units"],
                "documented_limit": limit,
                # one connection's documented limit at this packing (Azure: the hub's)
                "limit_messages_per_s": limit_rate,
                # what ``connections`` connections may use together (AWS: per connection)
                "limit_all_connections_messages_per_s": (
                    limit_rate * conns if limit_rate and name == "aws" else limit_rate
                ),
                "latency_ms": used["latency_ms"],
            }
            rows.append(row)
            progress(
                f"forward {name} x{s.pack_units} on {conns} connection(s): "
                f"{row['messages_per_s']} msg/s"
            )
    finally:
        iot.stop()
        hub.stop()
        emu.stop()
        release()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bins", type=int, default=20_000)
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--relay-messages", type=int, default=20_000)
    ap.add_argument("--relays", default="gcp,azure,aws", help="which relays' forwarding to measure")
    ap.add_argument(
        "--aws-connections", type=int, default=4, help="connections of the AWS multi-connection run"
    )
    ap.add_argument("--pg", metavar="URL", help="also on PostgreSQL (a scratch database there)")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/relays.json"))
    args = ap.parse_args(argv)
    now = time.time()
    bins = make_bins(args.bins, args.devices, now)
    with tempfile.TemporaryDirectory(prefix="bench-relays-") as tmp:
        work = Path(tmp)
        urls = {"sqlite": str(work / "ingest.db")}
        if args.pg:
            with temporary_postgres(args.pg) as pg:
                urls["postgresql"] = pg
                ingest = bench_ingest(urls, bins, args.rounds)
        else:
            ingest = bench_ingest(urls, bins, args.rounds)
        forward = (
            bench_forwarding(
                make_bins(args.relay_messages, 50, now),
                work,
                args.aws_connections,
                tuple(args.relays.split(",")),
            )
            if args.relay_messages
            else []
        )
    print("\nIngest with all three relays routed (storing only, batches of 500)")
    print(
        f"{'database':10} {'bins':>7} {'plain/s':>9} {'relayed/s':>10} {'wall +':>8} {'cpu +':>8}"
    )
    for r in ingest:
        print(
            f"{r['database']:10} {r['bins']:>7} {r['plain_bins_per_s']:>9} "
            f"{r['relayed_bins_per_s']:>10} {r['slowdown_wall_median']:>8.1%} "
            f"{r['slowdown_cpu_median']:>8.1%}"
        )
    print("\nForwarding to the local endpoints")
    print(
        f"{'relay':6} {'conns':>5} {'pack':>4} {'msgs':>6} {'msg/s':>7} {'cloud msgs':>10} "
        f"{'per msg':>7} {'units':>6} {'p50 ms':>7}  limit"
    )
    for r in forward:
        lim = r["limit_messages_per_s"]
        at = f" -> {lim} msg/s per connection at this packing" if lim else ""
        if lim and r["connections"] > 1:
            at += f", {r['limit_all_connections_messages_per_s']} on {r['connections']}"
        print(
            f"{r['relay']:6} {r['connections']:>5} {r['pack_units']:>4} {r['messages']:>6} "
            f"{r['messages_per_s']:>7} {r['cloud_messages']:>10} "
            f"{r['messages_per_cloud_message']:>7} {r['billing_units']:>6} "
            f"{r['latency_ms']['p50'] or 0:>7.0f}  {r['documented_limit']}{at}"
        )
        for c in r["per_connection"] or []:
            print(
                f"{'':14}{c['client_id']}: {c['publishes']} publishes, "
                f"{c['publishes_per_s']}/s, {c['kb_per_s']} KB/s (limit 100/s, 512 KB/s)"
            )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"ingest": ingest, "forward": forward}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

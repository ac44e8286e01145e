"""Ingest throughput against a bare MQTT subscriber, side by side; not a test.

    .venv/bin/python benchmarks/bench_ingest.py [--bins 20000] [--devices 200]
        [--rounds 3] [--pg URL] [--fleet 1000 --fleet-seconds 60] [--json FILE]
    .venv/bin/python benchmarks/bench_ingest.py --store-cpu [--bins 10000] [--batch-max 1000]

Prints a table and writes JSON (default benchmarks/results/ingest.json).

Every measurement drains the same backlog from a real Mosquitto started with the
project's generated config: ``--bins`` valid count bins from ``--devices`` devices
(two line rows, a zone row and a speed row each, as an agent sends them), published
at QoS 1 into the persistent session of a consumer that is offline, then the consumer
connects and the clock runs until it has everything. Consumers, alternated in each
round so that the machine's load hits them alike:

- ``bare``: a paho MQTT 5 subscriber that only counts messages (QoS 1, paho's
  automatic acknowledgement): the broker-and-client ceiling.
- ``ingest sqlite x1``: one `IngestWorker` on a fresh SQLite database (batched
  transactions, acks after commit); afterwards every bin must be stored exactly once.
- ``ingest pg x1`` / ``ingest pg x2`` (with ``--pg``): one worker, then two worker
  processes on a shared subscription, on a fresh PostgreSQL database.

The ratio of each ingest rate to the bare rate of the same round is reported, and the
median over rounds. For the bare subscriber and one worker storing on a thread, the
table also gives the CPU time the consumer's process spent per message while draining
(median over rounds), which moves much less with the machine's load than the rates;
the JSON keeps the 1-minute load average after each round. One worker is timed by its
own count of committed bins (a COUNT polled from this process would take CPU and the
GIL from the worker it times); two workers by polling the database.

``--fleet N`` adds the steady-state cost: the whole registry (`run_registry`, web
server included) in a child process while N simulated devices each send a count bin
every 10 s and a health beat every 30 s, for ``--fleet-seconds``; reports the
registry process's CPU use as a share of one core (from /proc).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from flowfleet.contract import CountBin, Health, LineCount, SpeedCount, Topics, ZoneCount
from flowfleet.mqtt import BrokerAddress, discard_session
from flowfleet.provisioning.mosquitto import Broker
from flowfleet.registry.fleet.worker import IngestWorker
from flowfleet.registry.store import db as regdb

TOPICS = Topics()


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_bins(n: int, devices: int, now: float) -> list[tuple[str, bytes]]:
    """``n`` valid count bins, round-robin over ``devices``, each device's seqs 1, 2, ..."""
    out = []
    for i in range(n):
        d, seq = f"bench-{i % devices:04d}", i // devices + 1
        start = now - 3600 + (seq % 50) * 60
        body = CountBin(
            device=d,
            seq=seq,
            start=start,
            end=start + 60,
            lines=(
                LineCount(camera="c", line="entry", class_="person", in_=seq % 7, out=seq % 5),
                LineCount(camera="c", line="entry", class_="car", in_=seq % 3, out=1),
            ),
            zones=(
                ZoneCount(
                    camera="c",
                    zone="plaza",
                    class_="person",
                    entries=3,
                    exits=2,
                    peak_occupancy=4,
                    dwell_s_sum=12.5,
                    dwell_n=2,
                ),
            ),
            speeds=(
                SpeedCount(
                    camera="c", line="entry", class_="car", n=2, mean_kmh=31.0, max_kmh=40.0
                ),
            ),
        )
        out.append((TOPICS.device(d, "counts"), body.to_json()))
    return out


def _client(client_id: str, clean: bool) -> mqtt.Client:
    return mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
    )


def _connect(client: mqtt.Client, broker: Broker, clean: bool) -> None:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    client.connect(broker.host, broker.port, clean_start=clean, properties=props)


def preload(broker: Broker, client_id: str, topic_filter: str, msgs) -> None:
    """Create ``client_id``'s persistent session subscribed to ``topic_filter``, leave,
    and publish ``msgs`` at QoS 1 so the broker queues them for it."""
    sub = _client(client_id, True)
    done = threading.Event()
    sub.on_subscribe = lambda *a: done.set()
    _connect(sub, broker, True)
    sub.loop_start()
    sub.subscribe(topic_filter, qos=1)
    done.wait(5)
    sub.disconnect()
    sub.loop_stop()
    pub = _client(f"pub-{client_id}", True)
    pub.max_inflight_messages_set(1000)
    _connect(pub, broker, True)
    pub.loop_start()
    infos = [pub.publish(t, p, qos=1) for t, p in msgs]
    for info in infos:
        info.wait_for_publish(60)
    pub.disconnect()
    pub.loop_stop()


def run_bare(broker: Broker, msgs, tag: str) -> float:
    """Messages per second a counting-only paho subscriber drains the backlog at."""
    client_id = f"bare-{tag}"
    preload(broker, client_id, TOPICS.all_devices(), msgs)
    got = 0
    done = threading.Event()

    def on_message(client, userdata, message):
        nonlocal got
        got += 1
        if got == len(msgs):
            done.set()

    sub = _client(client_id, False)
    sub.on_message = on_message
    t0, c0 = time.perf_counter(), time.process_time()
    _connect(sub, broker, False)
    sub.loop_start()
    if not done.wait(300):
        raise RuntimeError(f"bare subscriber got {got} of {len(msgs)}")
    elapsed = time.perf_counter() - t0
    LAST_CPU_US[0] = (time.process_time() - c0) * 1e6 / len(msgs)
    sub.disconnect()
    sub.loop_stop()
    return len(msgs) / elapsed


# CPU seconds per message the last run_bare / run_ingest spent in this process, in
# microseconds (None where the consumer runs in other processes): unlike the rates,
# hardly moved by what else the machine runs.
LAST_CPU_US: list[float | None] = [None]

# Messages per ingest transaction (the worker's batch_max; --batch-max).
BATCH_MAX = 1000


def _stored(url: str) -> int:
    db = regdb.open_database(url)
    return regdb.CountBin.select().count(db)


def _worker_process(url, address, client_id, shared, store, batch_max, stop):
    worker = IngestWorker(
        url, address, TOPICS, client_id=client_id, shared=shared, store=store, batch_max=batch_max
    )
    worker.start()
    stop.wait()
    worker.stop()


def run_ingest(
    broker: Broker, msgs, url: str, workers: int, tag: str, store: str = "thread"
) -> float:
    """Messages per second ``workers`` ingest workers (storing in ``store`` mode)
    drain the backlog at; checks that every bin is stored exactly once."""
    address = BrokerAddress(broker.host, broker.port)
    shared = workers > 1
    ids = [f"flowfleet-registry-{tag}-{k}" for k in range(1, workers + 1)]
    topic_filter = TOPICS.all_devices()
    if shared:
        topic_filter = f"$share/flowfleet-ingest/{topic_filter}"
        # Every member's session must exist before the backlog is published, or the
        # broker hands it all to the members that do.
        for cid in ids[1:]:
            preload(broker, cid, topic_filter, [])
    preload(broker, ids[0], topic_filter, msgs)
    regdb.open_database(url)  # migrate before the clock starts
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    procs = [
        ctx.Process(
            target=_worker_process, args=(url, address, cid, shared, store, BATCH_MAX, stop)
        )
        for cid in ids[1:]
    ]
    t0, c0 = time.perf_counter(), time.process_time()
    for p in procs:
        p.start()
    worker = IngestWorker(
        url, address, TOPICS, client_id=ids[0], shared=shared, store=store, batch_max=BATCH_MAX
    )
    worker.start()
    deadline = time.monotonic() + 600
    if workers == 1:
        # The worker's own count of committed bins: polling the database from this
        # process (COUNT every 20 ms) took CPU and the GIL from the worker it timed.
        while worker.outcomes["stored"] < len(msgs) and time.monotonic() < deadline:
            time.sleep(0.005)
    else:  # the other workers are processes of their own: ask the database
        while _stored(url) < len(msgs) and time.monotonic() < deadline:
            time.sleep(0.02)
    elapsed = time.perf_counter() - t0
    # This process's CPU only: the whole consumer when it is one worker storing on a
    # thread; not for worker or store processes of their own.
    alone = workers == 1 and store == "thread"
    LAST_CPU_US[0] = (time.process_time() - c0) * 1e6 / len(msgs) if alone else None
    stop.set()
    worker.stop()
    for p in procs:
        p.join(30)
    for cid in ids:  # or the next run's group would still hand them a share
        discard_session(address, cid)
    stored = _stored(url)
    if stored != len(msgs):
        raise RuntimeError(f"ingest stored {stored} of {len(msgs)} bins")
    return len(msgs) / elapsed


def store_cpu(msgs, url: str, batch_max: int) -> dict:
    """CPU time `Ingestor.handle_batch` spends per bin storing ``msgs`` in batches of
    ``batch_max`` on a fresh database, no broker involved: the writer thread's share of
    one worker's cost (the rest is paho receiving). Median over the batches after the
    first, which also warms the caches."""
    from flowfleet.registry.fleet.ingest import Ingestor

    db = regdb.open_database(url)
    ingestor = Ingestor(db, TOPICS)
    now = time.time()
    items = [(t, p, now) for t, p in msgs]
    per_bin = []
    for i in range(0, len(items), batch_max):
        part = items[i : i + batch_max]
        c0 = time.thread_time()
        outcomes = ingestor.handle_batch(part)
        per_bin.append((time.thread_time() - c0) * 1e6 / len(part))
        if set(outcomes) != {"stored"}:
            raise RuntimeError(f"store-cpu: outcomes {sorted(set(outcomes))}, want stored")
    return {"batches": len(per_bin), "cpu_us_per_bin": round(statistics.median(per_bin[1:]))}


def fresh_pg(base: str, name: str) -> str:
    import psycopg2

    conn = psycopg2.connect(base)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    return base.rsplit("/", 1)[0] + "/" + name


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _registry_process(db, host, port, ready):
    from flowfleet.registry.service import run_registry

    run_registry(db, BrokerAddress(host, port), http_port=0, on_ready=lambda url: ready.set())


def run_fleet(broker: Broker, devices: int, seconds: float, work: Path) -> dict:
    """CPU share of one core the registry uses while ``devices`` simulated devices
    send a bin every 10 s and a beat every 30 s."""
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(
        target=_registry_process,
        args=(str(work / "fleet.db"), broker.host, broker.port, ready),
    )
    proc.start()
    if not ready.wait(60):
        proc.terminate()
        raise RuntimeError("the registry did not start")
    pub = _client("fleet-sim", True)
    pub.max_inflight_messages_set(1000)
    _connect(pub, broker, True)
    pub.loop_start()
    names = [f"sim-{i:04d}" for i in range(devices)]
    seq = dict.fromkeys(names, 0)
    beat = dict.fromkeys(names, 0)
    sent = 0
    cpu0, t0 = _cpu_seconds(proc.pid), time.monotonic()
    tick = 0
    while time.monotonic() - t0 < seconds:
        now = time.time()
        # Each device sends its bin in its own second of the 10 s cycle (spread).
        for i, d in enumerate(names):
            if i % 10 == tick % 10:
                seq[d] += 1
                body = CountBin(
                    device=d,
                    seq=seq[d],
                    start=now - 10,
                    end=now,
                    lines=(LineCount(camera="c", line="entry", class_="person", in_=1, out=0),),
                )
                pub.publish(TOPICS.device(d, "counts"), body.to_json(), qos=1)
                sent += 1
            if i % 30 == tick % 30:
                beat[d] += 1
                body = Health(device=d, seq=beat[d], ts=now, uptime_s=tick)
                pub.publish(TOPICS.device(d, "health"), body.to_json(), qos=1)
                sent += 1
        tick += 1
        time.sleep(max(0.0, t0 + tick - time.monotonic()))
    cpu = _cpu_seconds(proc.pid) - cpu0
    wall = time.monotonic() - t0
    pub.disconnect()
    pub.loop_stop()
    proc.terminate()
    proc.join(30)
    return {
        "devices": devices,
        "seconds": round(wall, 1),
        "messages": sent,
        "cpu_share_of_one_core": round(cpu / wall, 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bins", type=int, default=20_000)
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pg", help="a PostgreSQL URL whose server may get scratch databases")
    ap.add_argument("--fleet", type=int, default=0, help="simulated devices for the CPU check")
    ap.add_argument("--fleet-seconds", type=float, default=60.0)
    ap.add_argument("--batch-max", type=int, default=1000, help="messages per transaction")
    ap.add_argument(
        "--store-cpu",
        action="store_true",
        help="only time Ingestor.handle_batch's CPU per bin on SQLite (no broker)",
    )
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/ingest.json"))
    args = ap.parse_args(argv)
    if args.store_cpu:
        with tempfile.TemporaryDirectory() as tmp:
            msgs = make_bins(args.bins, args.devices, time.time())
            out = store_cpu(msgs, str(Path(tmp) / "store.db"), args.batch_max)
        print(
            f"handle_batch, SQLite, {args.bins:,} bins in {out['batches']} batches: "
            f"{out['cpu_us_per_bin']} us CPU per bin (median over batches)"
        )
        return 0
    global BATCH_MAX
    BATCH_MAX = args.batch_max
    results: dict = {
        "bins": args.bins,
        "devices": args.devices,
        "rounds": [],
        "cpu_us_per_msg": [],
        "load": [],  # 1-minute load average after each round
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with Broker(work / "broker") as broker:
            for r in range(args.rounds):
                msgs = make_bins(args.bins, args.devices, time.time())
                row: dict[str, float] = {}
                progress(f"round {r + 1}/{args.rounds}: bare subscriber")
                cpu: dict[str, float | None] = {}
                row["bare"] = run_bare(broker, msgs, f"r{r}")
                cpu["bare"] = LAST_CPU_US[0]
                for store in ("thread", "process"):
                    progress(f"round {r + 1}/{args.rounds}: ingest, SQLite, one worker, {store}")
                    row[f"ingest sqlite x1 {store}"] = run_ingest(
                        broker, msgs, str(work / f"r{r}{store}.db"), 1, f"s{r}{store}", store
                    )
                    cpu[f"ingest sqlite x1 {store}"] = LAST_CPU_US[0]
                if args.pg:
                    for n in (1, 2):
                        progress(f"round {r + 1}/{args.rounds}: ingest, PostgreSQL, {n} worker(s)")
                        url = fresh_pg(args.pg, f"flowfleet_bench_ingest_{r}_{n}")
                        row[f"ingest pg x{n}"] = run_ingest(broker, msgs, url, n, f"p{r}{n}")
                        cpu[f"ingest pg x{n}"] = LAST_CPU_US[0]
                progress("  " + ", ".join(f"{k} {v:,.0f}/s" for k, v in row.items()))
                results["rounds"].append(row)
                results["cpu_us_per_msg"].append(cpu)
                results["load"].append(round(os.getloadavg()[0], 1))
            if args.fleet:
                progress(f"fleet: {args.fleet} devices for {args.fleet_seconds:.0f} s")
                results["fleet"] = run_fleet(broker, args.fleet, args.fleet_seconds, work)
    print_table(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def print_table(results: dict) -> None:
    rounds, cpus = results["rounds"], results.get("cpu_us_per_msg") or [{}] * len(results["rounds"])
    print(f"\n{results['bins']:,} count bins from {results['devices']} devices, QoS 1 backlog")
    if results.get("load"):
        print(f"load average after each round: {', '.join(map(str, results['load']))}")
    print(f"{'consumer':<28} {'msg/s (median)':>15} {'x bare (median)':>16} {'CPU us/msg':>11}")
    summary = {}
    for name in rounds[0]:
        rate = statistics.median(r[name] for r in rounds)
        ratio = statistics.median(r[name] / r["bare"] for r in rounds)
        summary[name] = {"rate": round(rate), "ratio_to_bare": round(ratio, 3)}
        spent = [c[name] for c in cpus if c.get(name) is not None]
        shown = "-"
        if spent:
            summary[name]["cpu_us_per_msg"] = round(statistics.median(spent))
            shown = f"{statistics.median(spent):,.0f}"
        print(f"{name:<28} {rate:>15,.0f} {ratio:>16.2f} {shown:>11}")
    results["summary"] = summary
    if "fleet" in results:
        f = results["fleet"]
        print(
            f"\nregistry with {f['devices']} devices (bin/10 s, beat/30 s): "
            f"{f['cpu_share_of_one_core'] * 100:.1f}% of one core over {f['seconds']} s"
        )


if __name__ == "__main__":
    sys.exit(main())

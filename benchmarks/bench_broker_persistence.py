"""Broker persistence: what each autosave setting costs and what it keeps; not a test.

    .venv/bin/python benchmarks/bench_broker_persistence.py [--seconds 3] [--rounds 6]

Prints a table and writes JSON (default benchmarks/results/broker_persistence.json).

Real mosquitto processes with the config `flowfleet.provisioning.mosquitto` generates
(no TLS or passwords: they cost per connection, not per message), one setting at a
time, side by side in one run:

- ``time``: ``autosave_interval 1``, ``autosave_on_changes false`` (save every second;
  Mosquitto 2.0 saves when more than one whole second has passed).
- ``changes N``: ``autosave_on_changes true``, ``autosave_interval N`` (save once N
  changes, such as messages queued for an offline client, have accumulated).

1. Publish rate: one paho publisher (QoS 1, 20 publishes in flight, as the agent's
   default ``outbox.inflight``; 512-byte payloads) for ``--seconds`` per setting,
   first with the persistent-session subscriber (client id ``registry``) online and
   acknowledging, then offline so every message is queued for it, with 0, 1,000 or
   10,000 messages already queued (written once with the ``time`` setting; the
   broker's persistence file is then copied into each run), because Mosquitto 2.0
   rewrites and fsyncs its whole persistence file on every save.
2. A fleet: ``--devices`` publishers with one message in flight each, 10,000 queued.
   Mosquitto reads one packet per client per pass of its main loop and saves at most
   once per pass, so many devices share a save where one publisher pays for each.
3. The agent's own outbox drain (`bench_agent_runtime.py`'s, agent defaults) of a
   2,000-message backlog, with the registry's session online, then offline.
4. Drain: the subscriber comes back to 1,000 and to 10,000 queued messages; the time
   until it has them all, and until the broker has processed all its PUBACKs (each
   one a change; measured by a QoS 1 publish sent after the last message arrived).
5. Loss: ``--rounds`` times: publish a burst of 5 messages, wait for every PUBACK,
   wait ``delay`` (0 and 0.3 s), SIGKILL the broker and restart it, with the
   subscriber offline and 0 or 10,000 messages queued before the first burst. Then
   the broker is restarted once more (``time`` setting: what is on disk is settled)
   and the subscriber collects what it kept; "lost" counts acknowledged messages it
   never delivered.

About five minutes on a 2-core VM.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from tqdm import tqdm

from flowfleet.provisioning.mosquitto import Broker, find_mosquitto, free_port

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_agent_runtime  # the agent's outbox drain, as measured there

TOPIC = "flowfleet/v1/devices/bench/counts"
SUBSCRIBER = "registry"
PAYLOAD_BYTES = 512
INFLIGHT = 20
BURST = 5
SETTINGS: dict[str, dict] = {
    "time": {"autosave_on_changes": False, "autosave_interval": 1},
    "changes 1": {"autosave_on_changes": True, "autosave_interval": 1},
    "changes 10": {"autosave_on_changes": True, "autosave_interval": 10},
    "changes 100": {"autosave_on_changes": True, "autosave_interval": 100},
}
QUEUES = (0, 1_000, 10_000)
DELAYS = (0.0, 0.3)


def payload(n: int) -> bytes:
    head = f"{n:010d}:".encode()
    return head + b"x" * (PAYLOAD_BYTES - len(head))


def _client(client_id: str) -> mqtt.Client:
    return mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)


def _connect(c: mqtt.Client, broker: Broker, clean: bool, timeout: float = 10.0) -> None:
    ready = threading.Event()
    c.on_connect = lambda *a: ready.set()
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0 if clean else 7 * 24 * 3600
    c.connect(broker.host, broker.port, clean_start=clean, properties=props)
    c.loop_start()
    if not ready.wait(timeout):
        raise SystemExit(f"could not connect to mosquitto on port {broker.port}")


def subscribe_offline(broker: Broker) -> None:
    """Create the subscriber's persistent session and leave it offline."""
    c = _client(SUBSCRIBER)
    _connect(c, broker, clean=False)
    done = threading.Event()
    c.on_subscribe = lambda *a: done.set()
    c.subscribe(TOPIC, qos=1)
    if not done.wait(10):
        raise SystemExit("no SUBACK")
    c.disconnect()
    c.loop_stop()


class Publisher:
    """QoS 1 publisher with at most ``INFLIGHT`` unacknowledged messages."""

    def __init__(self, broker: Broker) -> None:
        self.client = _client("bench-publisher")
        self.client.max_inflight_messages_set(INFLIGHT)
        self.slots = threading.Semaphore(INFLIGHT)
        self.sent: list[tuple[int, mqtt.MQTTMessageInfo]] = []
        self.last_ack = 0.0
        # No lock of ours around publish(): paho calls on_publish holding its own.
        self.client.on_publish = self._on_publish
        _connect(self.client, broker, clean=True)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self.last_ack = time.perf_counter()
        self.slots.release()

    @property
    def acked(self) -> set[int]:
        """Numbers of the messages the broker acknowledged."""
        return {n for n, info in self.sent if info.is_published()}

    def send(self, first: int, count: int, seconds: float) -> tuple[int, float]:
        """Publish up to ``count`` messages for up to ``seconds``; wait for their acks.
        Returns (acknowledged, seconds from the first publish to the last ack)."""
        start = time.perf_counter()
        deadline = start + seconds
        batch = []
        while len(batch) < count and time.perf_counter() < deadline:
            if not self.slots.acquire(timeout=0.1):
                continue
            n = first + len(batch)
            batch.append((n, self.client.publish(TOPIC, payload(n), qos=1)))
        self.sent += batch
        end = time.monotonic() + 30
        while not all(i.is_published() for _, i in batch) and time.monotonic() < end:
            time.sleep(0.005)
        acked = sum(i.is_published() for _, i in batch)
        return acked, max(1e-9, self.last_ack - start)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def written(broker: Broker) -> int | None:
    """Bytes the broker process has caused to be written to storage (Linux)."""
    try:
        text = Path(f"/proc/{broker.proc.pid}/io").read_text()
    except OSError:
        return None
    fields = dict(line.split(": ") for line in text.splitlines())
    return int(fields["write_bytes"])


def _diff(after: int | None, before: int | None) -> int | None:
    return None if after is None or before is None else after - before


def kill(broker: Broker) -> None:
    broker.proc.kill()
    broker.proc.wait()
    broker.proc = None


def prefill(work: Path, queued: int) -> Path:
    """A persistence file with ``queued`` messages waiting for the offline subscriber."""
    folder = work / f"prefill-{queued}"
    with Broker(folder, **SETTINGS["time"]) as broker:
        subscribe_offline(broker)
        pub = Publisher(broker)
        acked, _ = pub.send(0, queued, seconds=600)
        pub.close()
        assert acked == queued, f"prefill: {acked} of {queued} acknowledged"
    return folder / "mosquitto.db"  # written by the broker on SIGTERM


def _start(folder: Path, db: Path | None, setting: str) -> Broker:
    folder.mkdir(exist_ok=True)
    if db is not None:
        shutil.copy(db, folder / "mosquitto.db")
    return Broker(folder, port=free_port(), **SETTINGS[setting]).start()


class Subscriber:
    """The registry: resumes its persistent session and acknowledges what it gets."""

    def __init__(self, broker: Broker) -> None:
        self.got: set[int] = set()
        self.last = time.monotonic()
        self.client = _client(SUBSCRIBER)
        self.client.on_message = self._on_message
        _connect(self.client, broker, clean=False)

    def _on_message(self, client, userdata, message) -> None:
        head = message.payload.split(b":", 1)[0]
        if head.isdigit():  # ours; anything else is just acknowledged
            self.got.add(int(head))
        self.last = time.monotonic()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def bench_publish(work: Path, db: Path, queued: int, setting: str, seconds: float, online: bool):
    """Publish rate with the subscriber offline (queued) or online (acknowledging)."""
    mode = "online" if online else "offline"
    broker = _start(work / f"pub-{mode}-{queued}-{setting.replace(' ', '')}", db, setting)
    try:
        sub = Subscriber(broker) if online else None
        pub = Publisher(broker)
        before = written(broker)
        acked, elapsed = pub.send(queued, 1_000_000, seconds)
        wrote = _diff(written(broker), before)
        pub.close()
        if sub is not None:
            sub.close()
    finally:
        kill(broker)
    return {
        "acked": acked,
        "seconds": elapsed,
        "msg_per_s": acked / elapsed,
        "bytes_written": wrote,
        "bytes_per_msg": None if wrote is None else wrote / max(1, acked),
    }


class Fleet:
    """``n`` devices, each with one QoS 1 message in flight: the next publish goes out
    from the PUBACK callback of the previous one."""

    def __init__(self, broker: Broker, n: int) -> None:
        self.acked = 0
        self.stop_at = 0.0
        self.next = 10**9  # message numbers apart from everything else
        self._lock = threading.Lock()
        self.clients = []
        for i in range(n):
            c = _client(f"bench-device-{i}")
            c.on_publish = self._on_publish
            _connect(c, broker, clean=True)
            self.clients.append(c)

    def _number(self) -> int:
        with self._lock:
            self.next += 1
            return self.next

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        if time.perf_counter() >= self.stop_at:
            return
        self.acked += 1  # one paho thread per client; += on an int is atomic enough here
        client.publish(TOPIC, payload(self._number()), qos=1)

    def run(self, seconds: float) -> float:
        start = time.perf_counter()
        self.stop_at = start + seconds
        for c in self.clients:
            c.publish(TOPIC, payload(self._number()), qos=1)
        time.sleep(seconds + 0.2)
        return self.acked / seconds

    def close(self) -> None:
        for c in self.clients:
            c.disconnect()
            c.loop_stop()


def bench_fleet(work: Path, db: Path, queued: int, setting: str, seconds: float, n: int):
    broker = _start(work / f"fleet-{queued}-{setting.replace(' ', '')}", db, setting)
    try:
        fleet = Fleet(broker, n)
        rate = fleet.run(seconds)
        fleet.close()
    finally:
        kill(broker)
    return {"devices": n, "msg_per_s": rate}


def bench_drain(work: Path, db: Path, queued: int, setting: str, limit: float) -> dict:
    """The subscriber comes back to ``queued`` messages: how long until it has them,
    and until the broker has processed all its PUBACKs (each one a change)."""
    broker = _start(work / f"drain-{queued}-{setting.replace(' ', '')}", db, setting)
    try:
        start = time.monotonic()
        deadline = start + limit
        sub = Subscriber(broker)
        while len(sub.got) < queued and time.monotonic() < deadline:
            time.sleep(0.01)
        received_s = time.monotonic() - start
        # paho sent each PUBACK as the message arrived; the broker reads a client's
        # packets in order, so a publish sent now is acknowledged after all of them.
        marker = sub.client.publish("bench/marker", b"", qos=1)
        marker.wait_for_publish(timeout=max(0.1, deadline - time.monotonic()))
        acks_s = time.monotonic() - start if marker.is_published() else None
        wrote = written(broker)
        got = len(sub.got)
        sub.close()
    finally:
        kill(broker)
    return {
        "queued": queued,
        "delivered": got,
        "received_s": received_s,
        "acks_done_s": acks_s,
        "bytes_written": wrote,
    }


def bench_agent_drain(work: Path, db: Path, setting: str, online: bool, n: int) -> dict:
    """The agent's own outbox drain (`bench_agent_runtime.bench_drain`: defaults, 20 in
    flight, ``send_rate`` 5000/s) with the registry's session online or offline."""
    mode = "online" if online else "offline"
    folder = work / f"agent-{mode}-{setting.replace(' ', '')}"
    broker = _start(folder, db, setting)
    try:
        sub = Subscriber(broker) if online else None
        run = bench_agent_runtime.bench_drain(broker, folder, n, 20, 5000.0)
        if sub is not None:
            sub.close()
    finally:
        kill(broker)
    return {"messages": n, "msg_per_s": run["messages_per_s"]}


def bench_kill(work: Path, db: Path, queued: int, setting: str, delay: float, rounds: int):
    """Acknowledged messages lost when the broker is SIGKILLed ``delay`` after PUBACKs."""
    folder = work / f"kill-{queued}-{setting.replace(' ', '')}-{delay}"
    broker = _start(folder, db, setting)
    acked: set[int] = set()
    try:
        for r in range(rounds):
            pub = Publisher(broker)
            pub.send(queued + r * BURST, BURST, seconds=30)
            acked |= pub.acked
            time.sleep(delay)
            kill(broker)
            pub.close()
            broker.start()
        kill(broker)
        # What the last kill left on disk is settled; deliver it with the fast setting.
        broker = Broker(folder, port=broker.port, **SETTINGS["time"]).start()
        sub = Subscriber(broker)
        while time.monotonic() - sub.last < 1.0:
            time.sleep(0.05)
        sub.close()
    finally:
        broker.stop()
    return {"acked": len(acked), "delivered": len(sub.got & acked), "lost": len(acked - sub.got)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput run")
    parser.add_argument("--rounds", type=int, default=6, help="kills per loss run")
    parser.add_argument("--devices", type=int, default=50, help="publishers in the fleet run")
    parser.add_argument(
        "--agent-messages", type=int, default=2000, help="outbox backlog in the agent runs"
    )
    parser.add_argument(
        "--drain-limit", type=float, default=30.0, help="give up a drain run after this (s)"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=Path("benchmarks/results/broker_persistence.json"),
        help="write the results as JSON here (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    big = max(QUEUES)
    steps = len(QUEUES) + len(SETTINGS) * (len(QUEUES) + 6 + 2 * len(DELAYS))
    bar = tqdm(total=steps, desc="broker", unit="run", file=sys.stderr)
    results: dict = {
        "mosquitto": mosquitto_version(),
        "payload_bytes": PAYLOAD_BYTES,
        "inflight": INFLIGHT,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "drain_limit": args.drain_limit,
        "burst": BURST,
        "settings": SETTINGS,
        "db_bytes": {},
        "publish_online": {},
        "publish_offline": {},
        "fleet": {},
        "agent_drain": {},
        "drain": {},
        "kill": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-broker-") as tmp:
        work = Path(tmp)
        dbs = {}
        for queued in QUEUES:
            bar.set_postfix_str(f"prefill {queued}")
            dbs[queued] = prefill(work, queued)
            results["db_bytes"][str(queued)] = dbs[queued].stat().st_size
            bar.update()
        for setting in SETTINGS:
            bar.set_postfix_str(f"{setting}, online")
            run = bench_publish(work, dbs[0], 0, setting, args.seconds, online=True)
            results["publish_online"][setting] = run
            bar.update()
            for queued in QUEUES:
                bar.set_postfix_str(f"{setting}, {queued} queued")
                run = bench_publish(work, dbs[queued], queued, setting, args.seconds, online=False)
                results["publish_offline"].setdefault(setting, {})[str(queued)] = run
                bar.update()
            bar.set_postfix_str(f"{setting}, {args.devices} devices, {big} queued")
            run = bench_fleet(work, dbs[big], big, setting, args.seconds, args.devices)
            results["fleet"][setting] = run
            bar.update()
            for online in (True, False):
                bar.set_postfix_str(f"{setting}, agent drain, online={online}")
                run = bench_agent_drain(work, dbs[0], setting, online, args.agent_messages)
                results["agent_drain"].setdefault(setting, {})[str(online).lower()] = run
                bar.update()
            for queued in (QUEUES[1], big):
                bar.set_postfix_str(f"{setting}, drain {queued}")
                run = bench_drain(work, dbs[queued], queued, setting, args.drain_limit)
                results["drain"].setdefault(setting, {})[str(queued)] = run
                bar.update()
            for queued in (0, big):
                for delay in DELAYS:
                    bar.set_postfix_str(f"{setting}, kill +{delay}s, {queued} queued")
                    run = bench_kill(work, dbs[queued], queued, setting, delay, args.rounds)
                    results["kill"].setdefault(setting, {})[f"{queued}+{delay}"] = run
                    bar.update()
    bar.close()
    print_tables(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


def mosquitto_version() -> str:
    out = subprocess.run([find_mosquitto(), "-h"], capture_output=True, text=True)
    return (out.stdout or out.stderr).splitlines()[0].strip()


def _table(head: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        print("| " + " | ".join(cells) + " |")


def print_tables(results: dict) -> None:
    big = max(QUEUES)
    drains = (QUEUES[1], big)
    n = results["fleet"][next(iter(SETTINGS))]["devices"]
    print(f"{results['mosquitto']}; QoS 1, {PAYLOAD_BYTES}-byte payloads; rates from one")
    print(f"{results['seconds']:g} s run each; one publisher with {INFLIGHT} in flight, or")
    print(f"{n} publishers with 1 each; drain: until delivered / until its PUBACKs are")
    print(f"processed (limit {results['drain_limit']:g} s) / written meanwhile\n")
    head = ["setting", "msg/s, subscriber online"]
    head += [f"msg/s, offline, {q:,} queued" for q in QUEUES]
    head += [f"{n} devices, {big:,} queued, msg/s"]
    head += ["agent drain, registry online / offline, msg/s"]
    head += [f"KB written per msg, {big:,} queued"]
    head += [f"drain {q:,}: s / s / GB written" for q in drains]
    rows = []
    for setting in SETTINGS:
        off = results["publish_offline"][setting]
        row = [setting, f"{results['publish_online'][setting]['msg_per_s']:,.0f}"]
        row += [f"{off[str(q)]['msg_per_s']:,.0f}" for q in QUEUES]
        row += [f"{results['fleet'][setting]['msg_per_s']:,.0f}"]
        ag = results["agent_drain"][setting]
        row += [f"{ag['true']['msg_per_s']:,.0f} / {ag['false']['msg_per_s']:,.0f}"]
        per_msg = off[str(big)]["bytes_per_msg"]
        row += ["?" if per_msg is None else f"{per_msg / 1e3:,.0f}"]
        for q in drains:
            d = results["drain"][setting][str(q)]
            done = f"{d['acks_done_s']:.1f}" if d["acks_done_s"] is not None else "> limit"
            gb = "?" if d["bytes_written"] is None else f"{d['bytes_written'] / 1e9:.2f}"
            row += [f"{d['received_s']:.1f} / {done} / {gb}"]
        rows.append(row)
    _table(head, rows)
    print(f"\nacknowledged messages lost: {results['rounds']} x (burst of {results['burst']},")
    print("wait, SIGKILL, restart), subscriber offline throughout\n")
    keys = [(q, d) for q in (0, big) for d in DELAYS]
    head = ["setting"] + [f"{q:,} queued, kill +{d:g} s" for q, d in keys]
    rows = []
    for setting in SETTINGS:
        kl = results["kill"][setting]
        row = [setting]
        row += [f"{kl[f'{q}+{d}']['lost']} of {kl[f'{q}+{d}']['acked']}" for q, d in keys]
        rows.append(row)
    _table(head, rows)
    sizes = ", ".join(
        f"{int(q):,} queued: {b / 1e6:.2f} MB" for q, b in results["db_bytes"].items()
    )
    print(f"\npersistence file: {sizes}")


if __name__ == "__main__":
    raise SystemExit(main())

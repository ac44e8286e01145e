"""The registry on a secured broker, and its production HTTP server.

A real Mosquitto with the generated config (`allow_anonymous false`, the generated
password file and ACL, a TLS listener with certificates from a test CA), real SQLite.
The registry runs as `flowfleet registry --config registry.toml` in a subprocess (or
`run_registry` in a thread) with the credentials provisioning generates for it; a
device publishes a count bin with its own credentials.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from flowfleet.contract import Topics
from flowfleet.mqtt import BrokerAddress, MqttConnection
from flowfleet.provisioning.mosquitto import (
    Broker,
    free_port,
    write_password_file,
)
from flowfleet.provisioning.pki import Issued, issue
from flowfleet.registry.errors import BrokerRefused
from flowfleet.registry.http.server import HttpServer, ProxyTrust
from flowfleet.registry.service import run_registry

from .factories import count_bin, secured_broker_config

T = Topics()
REGISTRY_PW = "registry-pw-7f3a"
DEVICE_PW = "cam-p-pw-91bc"
WRONG_PW = "not-the-registry-pw-55e1"


@dataclass
class Secured:
    broker: Broker
    ca: Issued
    registry: Issued  # client certificate, CN registry
    cam_a: Issued  # client certificate, CN cam-a
    passwd: Path
    mtls: bool

    def device(self) -> tuple[str, BrokerAddress]:
        tls = {"ca_file": str(self.ca.cert)}
        if self.mtls:
            a = self.cam_a
            address = BrokerAddress(
                "127.0.0.1", self.broker.tls_port, cert_file=str(a.cert), key_file=str(a.key), **tls
            )
            return "cam-a", address
        return "cam-p", BrokerAddress("127.0.0.1", self.broker.tls_port, "cam-p", DEVICE_PW, **tls)

    def registry_broker_toml(self, password_file: Path) -> str:
        lines = ["[broker]", 'host = "127.0.0.1"', f"port = {self.broker.tls_port}"]
        lines.append(f'ca_file = "{self.ca.cert}"')
        if self.mtls:
            lines += [f'cert_file = "{self.registry.cert}"', f'key_file = "{self.registry.key}"']
        else:
            lines += ['username = "registry"', f'password_file = "{password_file}"']
        return "\n".join(lines) + "\n"


def secured_broker(tmp_path: Path, *, mtls: bool) -> Secured:
    security, ca = secured_broker_config(
        tmp_path, {"registry": REGISTRY_PW, "cam-p": DEVICE_PW}, mtls=mtls, plain=False
    )  # TLS only
    registry = issue(ca, "registry", tmp_path / "pki", registry=True)
    cam_a = issue(ca, "cam-a", tmp_path / "pki")
    broker = Broker(tmp_path / "broker", security=security)
    return Secured(broker, ca, registry, cam_a, security.password_file, mtls)


def get(url: str, headers: dict | None = None):
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return resp.status, dict(resp.headers), json.loads(resp.read())


def wait_for(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def start_cli(tmp_path: Path, config: str) -> tuple[subprocess.Popen, Path]:
    path = tmp_path / "registry.toml"
    path.write_text(config)
    log = tmp_path / "registry.log"
    env = {k: v for k, v in os.environ.items() if k != "FLOWFLEET_DATABASE_URL"}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flowfleet.cli", "registry", "--config", str(path)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    return proc, log


@pytest.mark.parametrize("mtls", [False, True], ids=["password-over-tls", "client-certificate"])
def test_registry_ingests_from_a_secured_broker(tmp_path, mtls):
    setup = secured_broker(tmp_path, mtls=mtls)
    pw_file = tmp_path / "registry.pw"
    pw_file.write_text(REGISTRY_PW + "\n")
    pw_file.chmod(0o600)
    http_port = free_port()
    config = (
        f'[database]\nurl = "{tmp_path / "reg.sqlite"}"\n'
        f"[http]\nport = {http_port}\nthreads = 4\n" + setup.registry_broker_toml(pw_file)
    )
    base = f"http://127.0.0.1:{http_port}"
    with setup.broker:
        conf = (tmp_path / "broker" / "mosquitto.conf").read_text()
        assert "allow_anonymous false" in conf and f"listener {setup.broker.port}" not in conf
        proc, log = start_cli(tmp_path, config)
        device_id, address = setup.device()
        acks: list[bytes] = []
        device = MqttConnection(f"agent-{device_id}", address)
        try:

            def ingesting():
                try:
                    return get(base + "/healthz")[2]["ingest"]["connected"]
                except OSError:
                    assert proc.poll() is None, log.read_text()[-3000:]
                    return False

            assert wait_for(ingesting, 30), log.read_text()[-3000:]
            _, headers, _ = get(base + "/healthz")
            assert headers["Server"] == "waitress"

            device.subscribe(T.ack(device_id), lambda topic, payload: acks.append(payload))
            device.start()
            assert device.wait_connected(10), "the device did not connect"
            assert device.publish(T.counts(device_id), count_bin(device_id, 1).to_json())

            def counted():
                lines = get(base + "/api/totals")[2]["lines"]
                return [(r["device"], r["in"], r["out"]) for r in lines]

            assert wait_for(lambda: counted() == [(device_id, 2, 1)]), counted()
            # The registry's end-to-end ack reached the device (it may write commands).
            assert wait_for(lambda: any(b'"counts":1' in a.replace(b" ", b"") for a in acks))

            # waitress leaves X-Forwarded-For alone, so a proxied request from
            # loopback is still not "local" for the anonymous dashboard.
            with pytest.raises(urllib.error.HTTPError) as err:
                get(base + "/api/totals", {"X-Forwarded-For": "203.0.113.7"})
            assert err.value.code == 401
        finally:
            device.stop()
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        text = log.read_text()
        assert proc.returncode == 0, text[-3000:]
        assert "registry stopped" in text
        assert REGISTRY_PW not in text
        with pytest.raises(OSError):
            get(base + "/healthz")


def test_wrong_credentials_exit_with_one_clear_error(tmp_path):
    setup = secured_broker(tmp_path, mtls=False)
    pw_file = tmp_path / "registry.pw"
    pw_file.write_text(WRONG_PW + "\n")
    config = (
        f'[database]\nurl = "{tmp_path / "reg.sqlite"}"\n'
        f"[http]\nport = {free_port()}\n" + setup.registry_broker_toml(pw_file)
    )
    with setup.broker:
        proc, log = start_cli(tmp_path, config)
        try:
            rc = proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert rc == 1, text[-3000:]
    expected = (
        f"broker mqtts://127.0.0.1:{setup.broker.tls_port} refused the registry's "
        "credentials (user 'registry'): Not authorized"
    )
    errors = [line for line in text.splitlines() if "refused" in line]
    assert len(errors) == 1 and expected in errors[0], text[-3000:]
    assert errors[0].startswith("flowfleet registry: error: ")
    assert WRONG_PW not in text


def test_credentials_refused_later_are_logged_once_and_retried(tmp_path, caplog):
    """Once in, a refusal (the broker's password changed first) is one ERROR per
    outage; the registry keeps retrying and keeps serving."""
    setup = secured_broker(tmp_path, mtls=False)
    address = BrokerAddress(
        "127.0.0.1", setup.broker.tls_port, "registry", REGISTRY_PW, ca_file=str(setup.ca.cert)
    )
    caplog.set_level(logging.DEBUG, logger="flowfleet")
    stop = threading.Event()
    ready: list[str] = []
    errors: list[BaseException] = []

    def run():
        try:
            run_registry(
                tmp_path / "reg.sqlite",
                address,
                "127.0.0.1",
                0,
                stop_event=stop,
                on_ready=ready.append,
            )
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    with setup.broker:
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            assert wait_for(lambda: bool(ready) or bool(errors)) and not errors, errors
            assert "connected to mqtts://" in caplog.text
            setup.broker.stop()
            write_password_file(setup.passwd, {"registry": "rotated-pw", "cam-p": DEVICE_PW})
            setup.broker.start()

            def refusals():
                return [r for r in caplog.records if "refused the connection" in r.message]

            assert wait_for(lambda: len(refusals()) >= 2, 20), caplog.text[-3000:]
            logged = [
                r
                for r in caplog.records
                if r.levelno >= logging.ERROR and "refused the registry's credentials" in r.message
            ]
            assert len(logged) == 1, [r.message for r in logged]
            assert "(user 'registry'): Not authorized; retrying" in logged[0].message
            assert thread.is_alive() and not errors
            assert get(ready[0] + "healthz")[2]["ingest"]["connected"] is False
        finally:
            stop.set()
            thread.join(30)
    assert not thread.is_alive()
    assert REGISTRY_PW not in caplog.text and "rotated-pw" not in caplog.text


def test_run_registry_raises_when_refused_at_start(tmp_path):
    setup = secured_broker(tmp_path, mtls=False)
    address = BrokerAddress(
        "127.0.0.1", setup.broker.tls_port, "registry", WRONG_PW, ca_file=str(setup.ca.cert)
    )
    with setup.broker, pytest.raises(BrokerRefused, match="refused the registry's credentials"):
        run_registry(tmp_path / "reg.sqlite", address, "127.0.0.1", 0, stop_event=threading.Event())


# -- the HTTP server --------------------------------------------------------------------


def echo_app(environ, start_response):
    body = json.dumps(
        {
            "remote": environ["REMOTE_ADDR"],
            "scheme": environ["wsgi.url_scheme"],
            "xff": environ.get("HTTP_X_FORWARDED_FOR"),
            "thread": threading.current_thread().name,
        }
    ).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]


class Serving:
    def __init__(self, app, **kw) -> None:
        self.server = HttpServer(app, "127.0.0.1", 0, **kw)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self.server.port}/"

    def __enter__(self) -> Serving:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.thread.join(10)
        assert not self.thread.is_alive()


def test_waitress_serves_concurrent_requests_on_its_threads():
    n = 4
    barrier = threading.Barrier(n, timeout=10)

    def app(environ, start_response):
        barrier.wait()  # only returns when n requests are being served at once
        return echo_app(environ, start_response)

    results: list = []
    with Serving(app, threads=n) as s:
        assert type(s.server.server).__module__.startswith("waitress")

        def one():
            results.append(get(s.url))

        clients = [threading.Thread(target=one) for _ in range(n)]
        for c in clients:
            c.start()
        for c in clients:
            c.join(15)
    assert len(results) == n and all(status == 200 for status, _, _ in results)
    assert all(headers["Server"] == "waitress" for _, headers, _ in results)
    assert len({body["thread"] for _, _, body in results}) == n
    with pytest.raises(OSError):
        get(s.url)  # shut down: nothing listens any more


def test_proxy_headers_are_honoured_only_when_configured():
    forwarded = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}
    with Serving(echo_app) as s:
        _, _, body = get(s.url, forwarded)
        # Off by default: the peer's address and scheme; the header is left for the
        # access rules to see.
        assert (body["remote"], body["scheme"], body["xff"]) == ("127.0.0.1", "http", "203.0.113.9")
    with Serving(echo_app, proxy=ProxyTrust(hops=1)) as s:
        _, _, body = get(s.url, forwarded)
        assert (body["remote"], body["scheme"]) == ("203.0.113.9", "https")
        # Two addresses, one trusted hop: the one our proxy appended counts.
        _, _, body = get(s.url, {"X-Forwarded-For": "198.51.100.1, 203.0.113.9"})
        assert body["remote"] == "203.0.113.9"
    with Serving(echo_app, proxy=ProxyTrust(hops=1, trusted=("10.0.0.0/8",))) as s:
        _, _, body = get(s.url, forwarded)  # from 127.0.0.1: not a trusted proxy
        assert (body["remote"], body["scheme"]) == ("127.0.0.1", "http")

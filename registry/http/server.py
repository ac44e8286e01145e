"""The registry's HTTP server: waitress, a pure-Python multi-threaded WSGI server.

Why waitress (docs/registry.md, "HTTP server"): it installs from PyPI as one pure-Python
wheel with no dependencies (the same on a Raspberry Pi, a Jetson and a server), serves
requests from a fixed pool of threads in the registry's own process (no fork model to
fight the ingest worker's and the watch folder's background threads, which a
pre-forking server such as gunicorn would copy or lose), buffers request and response
bodies so a slow client does not hold a worker thread, and is in production use behind
Pyramid and Flask deployments for years. Werkzeug's development server, used before,
says itself that it is not for production.

`HttpServer` binds at construction (so a taken port fails before anything starts),
supports port 0 (a free port, see ``port``), serves on `serve_forever` until
`shutdown` and closes every connection on the way out. Only failed requests (4xx, 5xx)
are logged: the dashboard polls every 2 s.

Reverse-proxy headers (``X-Forwarded-For``, ``-Proto``, ...) are ignored unless
`ProxyTrust` says how many proxies set them and from which addresses they may come;
then werkzeug's ``ProxyFix`` applies them for requests from those addresses only.
Waitress's own handling of those headers is switched off: by default it would strip
``X-Forwarded-For`` from untrusted peers, and the dashboard's anonymous-read rule
(`flowfleet.registry.http.access`) relies on seeing it to tell a proxied request
from a local one.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from waitress import wasyncore
from waitress.server import create_server
from waitress.trigger import trigger as Trigger
from werkzeug.middleware.proxy_fix import ProxyFix

log = logging.getLogger(__name__)

PROXY_HEADERS = ("for", "proto", "host", "port", "prefix")


@dataclass(frozen=True)
class ProxyTrust:
    """Which ``X-Forwarded-*`` headers to believe.

    Args:
        hops: how many proxies in front of the registry append to the headers; 0 (the
            default) ignores them.
        headers: which of ``for``, ``proto``, ``host``, ``port``, ``prefix`` those
            proxies set (a header a proxy passes through unchanged is the client's).
        trusted: addresses or networks the proxies connect from; a request from any
            other peer keeps its own address and scheme whatever its headers say.
    """

    hops: int = 0
    headers: tuple[str, ...] = ("for", "proto")
    trusted: tuple[str, ...] = ("127.0.0.1", "::1")

    def __post_init__(self) -> None:
        unknown = set(self.headers) - set(PROXY_HEADERS)
        if unknown:
            raise ValueError(f"unknown proxy headers {sorted(unknown)}; use {PROXY_HEADERS}")
        if self.hops < 0:
            raise ValueError("hops must not be negative")


class TrustedProxyFix:
    """werkzeug's ProxyFix, applied only to requests from a trusted proxy address."""

    def __init__(self, app: Callable, trust: ProxyTrust) -> None:
        self.app = app
        self.networks = [ipaddress.ip_network(n, strict=False) for n in trust.trusted]
        counts = {f"x_{h}": (trust.hops if h in trust.headers else 0) for h in PROXY_HEADERS}
        self.fixed = ProxyFix(app, **counts)

    def _trusted(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer.split("%", 1)[0])
        except ValueError:
            return False
        if getattr(address, "ipv4_mapped", None) is not None:
            address = address.ipv4_mapped
        return any(address in n for n in self.networks)

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        if self._trusted(environ.get("REMOTE_ADDR", "")):
            return self.fixed(environ, start_response)
        return self.app(environ, start_response)


class LogFailures:
    """Logs ``METHOD path status`` for 4xx and 5xx responses, nothing for the rest."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        def start(status: str, headers, exc_info=None):
            if status[:1] in ("4", "5"):
                log.info(
                    '%s "%s %s" %s',
                    environ.get("REMOTE_ADDR", "-"),
                    environ.get("REQUEST_METHOD", "-"),
                    environ.get("PATH_INFO", ""),
                    status,
                )
            return start_response(status, headers, exc_info)

        return self.app(environ, start_response=start)


class HttpServer:
    """A waitress server for ``app`` on ``host:port`` with ``threads`` worker threads.

    Raises OSError when the address cannot be bound.
    """

    def __init__(
        self,
        app: Callable,
        host: str,
        port: int,
        *,
        threads: int = 8,
        proxy: ProxyTrust | None = None,
    ) -> None:
        app = LogFailures(app)
        if proxy is not None and proxy.hops > 0:
            app = TrustedProxyFix(app, proxy)
        self._map: dict = {}
        self._stopping = threading.Event()
        self._done = threading.Event()
        self._server = create_server(
            app,
            map=self._map,
            host=host,
            port=port,
            threads=threads,
            # Leave X-Forwarded-* to TrustedProxyFix and the access rules (see above).
            clear_untrusted_proxy_headers=False,
        )
        # A host name that resolves to several addresses gets one socket each.
        self._triggers = [d for d in self._map.values() if isinstance(d, Trigger)]
        listen = getattr(self._server, "effective_listen", None)
        if listen:
            self.port = int(listen[0][1])
        else:
            self.port = int(self._server.effective_port)
        self.threads = threads

    @property
    def server(self):
        """The waitress server object (for tests and introspection)."""
        return self._server

    def serve_forever(self) -> None:
        """Serve until `shutdown`; then close every socket from this thread."""
        try:
            while not self._stopping.is_set() and self._map:
                wasyncore.loop(timeout=1.0, map=self._map, use_poll=True, count=1)
        finally:
            wasyncore.close_all(self._map, ignore_all=True)
            self._server.task_dispatcher.shutdown(timeout=5)
            self._done.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop `serve_forever` (from another thread) and wait for it to finish."""
        self._stopping.set()
        if self._triggers:
            self._triggers[0].pull_trigger()  # wake the loop now, not at its timeout
        self._done.wait(timeout)

    def close(self) -> None:
        """Close the listening sockets of a server that never served."""
        if not self._done.is_set():
            wasyncore.close_all(self._map, ignore_all=True)
            self._server.task_dispatcher.shutdown(timeout=5)
            self._done.set()

"""Certificate renewal inside the agent: before the device certificate expires.

The agent's mutual-TLS identity is short-lived (30 days by default). A daily timer
(`flowfleet agent renew`) can renew it, but then the agent must restart to present
the new certificate. `CertificateRenewer` does it in the running agent: once
``[registry] cert_renew_at`` of the certificate's lifetime has passed (2/3 by default,
so a 30-day certificate is renewed with 10 days left) it sends a CSR signed by the
device's own key to ``POST /api/renew`` (`flowfleet.agent.enroll.renew`), writes the
new certificate in place, loads it into the MQTT connection's TLS context and
reconnects. Nothing counted is lost: count bins stay in the outbox until the registry
confirmed them, across the reconnect. A failed attempt (registry unreachable) is
logged and tried again, sooner as the expiry comes closer.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

# Between attempts after a failure: a tenth of what is left, within these bounds.
RETRY_MIN_S = 5.0
RETRY_MAX_S = 3600.0
# How often the schedule is read again (the file may be renewed by the daily timer).
RECHECK_S = 3600.0


def validity(cert_file: str | Path) -> tuple[float, float]:
    """(not_before, not_after) of a PEM certificate, as epoch seconds."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    return cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()


def renew_due(cert_file: str | Path, fraction: float) -> float:
    """When the certificate in ``cert_file`` is due: ``fraction`` of its lifetime."""
    start, end = validity(cert_file)
    return start + fraction * (end - start)


class CertificateRenewer:
    """Renews the agent's broker certificate on schedule (see the module docstring).

    Enabled when the broker identity is a certificate (``broker.cert_file``), the
    registry is configured (``registry.url``) and ``registry.cert_renew_at`` is set.
    """

    def __init__(self, service) -> None:
        self.service = service
        b, r = service.config.broker, service.config.registry
        self.cert_file = b.cert_file
        self.key_file = b.key_file
        self.url = r.url if r is not None else None
        self.fraction = r.cert_renew_at if r is not None else None
        self.timeout = r.timeout_s if r is not None else 30.0
        self.renewals = 0
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file and self.key_file and self.url and self.fraction)

    def start(self, stop: threading.Event) -> None:
        if not self.enabled:
            return
        self._thread = threading.Thread(
            target=self._loop, args=(stop,), name="cert-renewal", daemon=True
        )
        self._thread.start()

    def renew_now(self) -> float:
        """Renew at once and present the new certificate; returns its expiry."""
        from .enroll import renew

        _, not_after = renew(
            self.url,
            self.cert_file,
            self.key_file,
            days_before=float("inf"),  # due by our schedule, not the command's
            timeout=self.timeout,
        )
        self.renewals += 1
        log.info(
            "device certificate renewed (valid until %s); reconnecting with it",
            time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(not_after)),
        )
        self.service.connection.reload_client_certificate()
        return not_after

    def _loop(self, stop: threading.Event) -> None:
        from .enroll import EnrollError

        while True:
            try:
                due = renew_due(self.cert_file, self.fraction)
            except (OSError, ValueError) as exc:
                log.error("cannot read the device certificate %s: %s", self.cert_file, exc)
                if stop.wait(RECHECK_S):
                    return
                continue
            wait = due - time.time()
            if wait > 0:
                if stop.wait(min(wait, RECHECK_S)):
                    return
                continue
            try:
                self.renew_now()
            except (EnrollError, OSError, ValueError) as exc:
                left = validity(self.cert_file)[1] - time.time()
                retry = min(RETRY_MAX_S, max(RETRY_MIN_S, left / 10))
                log.warning(
                    "certificate renewal failed (%s); %.0f s of validity left, next try in %.0f s",
                    exc,
                    left,
                    retry,
                )
                if stop.wait(retry):
                    return

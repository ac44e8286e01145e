"""Rate limits on the registry's unauthenticated enrollment endpoints.

``POST /api/enroll`` and ``POST /api/renew`` answer anyone who reaches the registry,
so each attempt counts against two sliding windows: one per source address (the
client's address as the proxy settings resolve it) and one per credential (the
bootstrap token's sha256, or the certificate's for a renewal; never the secret
itself). Over either limit the answer is 429 with ``Retry-After`` (seconds until the
oldest attempt in that window ages out), before the token is even looked up. The
first refusal of a key in a window is audited (``enrollment.rate_limited``), not
every one, so a flood cannot fill the audit trail.

Kept in memory, per registry process: a registry behind a load balancer with N
processes lets N times the limit through. Settings: ``[enrollment]
rate_limit_window_s``, ``rate_limit_per_address``, ``rate_limit_per_token`` (0 turns
one off).
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

from ..errors import RegistryError

# At most this many keys are remembered per window; the least recently used go first
# (an attacker cycling addresses cannot grow the registry's memory without bound).
MAX_KEYS = 20_000


@dataclass(frozen=True)
class Limits:
    window_s: float = 60.0
    per_address: int = 30
    per_token: int = 10


class SlidingWindow:
    """At most ``limit`` attempts per key within ``window_s`` seconds."""

    def __init__(self, limit: int, window_s: float, max_keys: int = MAX_KEYS) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_keys = max_keys
        self._hits: OrderedDict[str, deque[float]] = OrderedDict()
        self._audited: dict[str, float] = {}  # key -> end of the window its refusal was audited

    def attempt(self, key: str, t: float) -> int | None:
        """Record an attempt at ``t``; None if allowed, else the seconds to wait
        (the refused attempt is not recorded)."""
        if self.limit <= 0:
            return None
        hits = self._hits.pop(key, None) or deque()
        while hits and hits[0] <= t - self.window_s:
            hits.popleft()
        self._hits[key] = hits  # most recently used last
        if len(self._hits) > self.max_keys:
            self._hits.popitem(last=False)
        if len(hits) >= self.limit:
            return max(1, math.ceil(hits[0] + self.window_s - t))
        hits.append(t)
        return None

    def first_refusal(self, key: str, t: float, wait: int) -> bool:
        """Whether this refusal is the first of ``key``'s current window (to audit)."""
        if self._audited.get(key, 0.0) > t:
            return False
        if len(self._audited) > self.max_keys:
            self._audited = {k: v for k, v in self._audited.items() if v > t}
        self._audited[key] = t + wait
        return True


class EnrollmentLimiter:
    """The two windows of the enrollment endpoints (see the module docstring)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.by_address = SlidingWindow(limits.per_address, limits.window_s)
        self.by_token = SlidingWindow(limits.per_token, limits.window_s)
        self._lock = threading.Lock()

    def check(self, endpoint: str, address: str, credential: str) -> None:
        """Count one attempt; RegistryError 429 (``retry_after`` set) when over a
        limit, after auditing the first refusal of its key in the window (in its own
        transaction: the refusal must not roll it back)."""
        from ..store.audit import audit
        from ..store.db import database_proxy as database

        t = time.monotonic()
        digest = hashlib.sha256(credential.encode()).hexdigest()
        with self._lock:
            wait, which, key = self.by_address.attempt(address, t), "address", address
            window = self.by_address
            if wait is None:
                wait, which, key = self.by_token.attempt(digest, t), "token", digest
                window = self.by_token
            if wait is None:
                return
            first = window.first_refusal(key, t, wait)
        if first:
            what = f"address:{address}" if which == "address" else f"credential:{digest[:16]}"
            with database.atomic():
                audit(
                    f"address:{address}",
                    "enrollment.rate_limited",
                    what,
                    "",
                    endpoint=endpoint,
                    limit=window.limit,
                    window_s=window.window_s,
                )
        per = "source address" if which == "address" else "token"
        error = RegistryError(
            429,
            "rate_limited",
            f"too many {endpoint} attempts from this {per}; try again in {wait} s",
        )
        error.retry_after = wait
        raise error

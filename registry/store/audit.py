"""The audit trail: who did what to which model, device, user or dead letter, and why.

Written by every subsystem that changes something an operator answers for (model
versions and aliases, deployments, groups, users and tokens, logins, dead-letter
replays), read through `ModelRegistry.audit_log` and ``GET /api/audit``.
"""

from __future__ import annotations

import json

from .db import AuditEntry, now


def audit(actor: str, action: str, target: str, reason: str = "", **details) -> AuditEntry:
    """Write one audit entry."""
    return AuditEntry.create(
        ts=now(),
        actor=actor,
        action=action,
        target=target,
        reason=reason or "",
        details=json.dumps(details, sort_keys=True, default=str),
    )

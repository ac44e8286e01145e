"""Retention of shadow-comparison windows and of the webhook delivery log, on SQLite
and PostgreSQL (raw bins and health beats: tests/test_series.py).

Shadow windows are stored as ingest stores them (the contract's validated window,
`shadow.shadow_columns`); webhook deliveries are made by the real webhook job
sending to a real receiver that verifies signatures (tests/webhook_receiver.py).
"""

from __future__ import annotations

import json
import time

import pytest

from flowfleet.contract_shadow import ShadowWindow as ShadowPayload
from flowfleet.registry.config import ConfigError, load_registry_config
from flowfleet.registry.fleet import webhook_records as records
from flowfleet.registry.fleet.retention import (
    DAY,
    prune_all,
    prune_shadow_windows,
    prune_webhook_log,
)
from flowfleet.registry.fleet.shadow import shadow_columns
from flowfleet.registry.fleet.webhooks import WebhookJob, WebhookSettings, dispatch
from flowfleet.registry.store import db as regdb
from flowfleet.registry.store.audit import audit
from flowfleet.registry.store.shadow_tables import ShadowWindow
from flowfleet.registry.store.webhook_tables import WebhookAttempt, WebhookDelivery
from flowfleet.registry.testing import fresh_database
from tests.factories import shadow_window
from tests.webhook_receiver import Receiver


@pytest.fixture
def db(db_url):
    database = regdb.open_database(fresh_database(db_url))
    database.connect(reuse_if_open=True)
    yield database
    database.close()


def store_windows(windows: list[tuple[str, str, float]]) -> None:
    """Store a shadow window per (device, camera, end) as ingest does."""
    now = time.time()
    regdb.Device.insert_many(
        [{"id": d, "first_seen": now} for d in sorted({d for d, _, _ in windows})]
    ).execute()
    rows = []
    for seq, (device, camera, end) in enumerate(windows, 1):
        msg = ShadowPayload.model_validate(
            shadow_window(device, seq, end - 60, camera=camera, end=end)
        )
        rows.append(
            {"device": device, "seq": seq, "payload": msg.to_json(), **shadow_columns(msg, end)}
        )
    ShadowWindow.insert_many(rows).execute()


def test_old_shadow_windows_go_but_each_cameras_newest_stays(db):
    now = time.time()
    old, new = now - 40 * DAY, now - 1 * DAY
    store_windows(
        [
            ("cam-1", "front", old),
            ("cam-1", "front", old + 60),
            ("cam-1", "front", old + 120),
            ("cam-1", "front", new),
            ("cam-2", "front", old),
            ("cam-2", "front", old + 60),  # cam-2 front's newest: stays, old as it is
            ("cam-2", "back", old),  # the only window of cam-2 back: stays
        ]
    )
    assert prune_shadow_windows(db, keep_days=30) == 4
    left = sorted((w.device_id, w.camera, w.end) for w in ShadowWindow.select())
    assert left == [
        ("cam-1", "front", new),
        ("cam-2", "back", old),
        ("cam-2", "front", old + 60),
    ]
    assert prune_shadow_windows(db, keep_days=30) == 0
    # The registry's retention job runs it with the raw limit; 0 or None keeps all.
    assert prune_all(db, None, None) == {}
    # However old, each camera's newest window stays.
    assert prune_all(db, 0.5) == {"bins": 0, "health_beats": 0, "shadow_windows": 0}


def test_finished_deliveries_leave_the_log_with_their_attempts_pending_ones_stay(db):
    receiver = Receiver(script=[500])  # the first request fails: given up at once
    hook = records.create_webhook(db, "ops", receiver.url, ["drift.*"], actor="test")
    receiver.secrets["ops"] = hook["secret"]
    job = WebhookJob(db, WebhookSettings(interval_s=0.05, timeout_s=2, max_attempts=1))
    try:
        for i in range(3):
            audit("drift-judge", "drift.rollback", f"device:cam-{i}/camera:front", "drift")
        deadline = time.monotonic() + 15
        while (
            WebhookDelivery.select()
            .where(
                WebhookDelivery.delivered_at.is_null(False)
                | WebhookDelivery.given_up_at.is_null(False)
            )
            .count()
            < 3
        ):
            assert time.monotonic() < deadline, "the deliveries did not finish"
            job.run_once()
            time.sleep(0.05)
        # One more, queued but never sent (the job is not run again): pending.
        audit("drift-judge", "drift.rollback", "device:cam-9/camera:front", "drift")
        dispatch(db)
    finally:
        job.stop()
        receiver.stop()
    states = sorted(records.delivery_status(d) for d in WebhookDelivery.select())
    assert states == ["delivered", "delivered", "given_up", "pending"], states
    attempts = WebhookAttempt.select().count()
    assert attempts == 3 and len(receiver.delivered()) == 2

    assert prune_webhook_log(db, keep_days=30) == {"webhook_deliveries": 0, "webhook_attempts": 0}
    later = time.time() + 31 * DAY  # a month on, nothing else happened
    assert prune_webhook_log(db, keep_days=30, at=later) == {
        "webhook_deliveries": 3,
        "webhook_attempts": 3,
    }
    (pending,) = WebhookDelivery.select()
    assert records.delivery_status(pending) == "pending"
    assert json.loads(pending.payload)["target"] == "device:cam-9/camera:front"
    assert WebhookAttempt.select().count() == 0


def test_the_delivery_log_limit_is_a_validated_config_key(tmp_path):
    path = tmp_path / "registry.toml"
    path.write_text("[webhooks]\nlog_retention_days = 7\n")
    assert load_registry_config(path, check=False).webhooks.log_retention_days == 7
    path.write_text("[webhooks]\nlog_retention_days = -1\n")
    with pytest.raises(ConfigError) as err:
        load_registry_config(path, check=False)
    assert str(path) in str(err.value) and "webhooks.log_retention_days" in str(err.value)

"""Activations in bulk: many cameras' baselines in one query, their rows in one statement.

When a whole fleet changes model in one minute, a judge pass (`drift.DriftJudge`)
meets thousands of activations. Reading each camera's baseline (the previous model's
last windows) with its own query and creating each activation row on its own cost
about 14% of a core for 4,000 cameras (docs/benchmarks.md#drift-judge). Here:

* `first_activations` finds, before a pass judges anything, each camera's first
  activation in that pass (the camera row only changes at an activation, so this is
  exactly what the pass will meet first);
* `read_baselines` reads the baselines of up to `KEYS_PER_QUERY` of them per query:
  the wanted (device, camera, previous model, before) go in as a ``VALUES`` list and
  ``ROW_NUMBER()`` keeps each camera's newest ``per_camera`` windows (SQLite 3.25+
  and PostgreSQL alike);
* `insert_activations` writes their rows with one multi-row INSERT ... RETURNING per
  `ROWS_PER_INSERT` (SQLite 3.35+ and PostgreSQL; older SQLite: one row at a time).

A second activation of one camera within one pass (rare: two model changes in one
pass's windows) goes the one-camera way (`read_baseline`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence

import peewee as pw

from ..store.bulk import columns, table
from ..store.db import DriftSummary
from ..store.drift_tables import DriftActivation, DriftCamera

KEYS_PER_QUERY = 500  # 4 values each: far under SQLite's 32,766 bound values
ROWS_PER_INSERT = 200

Key = tuple[str, str]  # (device, camera)
# (id, payload) of a baseline window, newest first
Baseline = list[tuple[int, str]]


def first_activations(
    rows: Iterable[DriftSummary], cams: dict[Key, DriftCamera]
) -> dict[Key, tuple[DriftSummary, str | None]]:
    """Each camera's first activation among ``rows`` (sorted by camera, then start):
    the row whose model differs from the camera's, and the previous model. Mirrors
    the pass's own rules: a camera seen for the first time takes its first row's
    model; a window older than what the camera knows is history and skipped."""
    state: dict[Key, tuple[str | None, float, float | None]] = {}
    out: dict[Key, tuple[DriftSummary, str | None]] = {}
    for row in rows:
        key = (row.device_id, row.camera)
        if key in out:
            continue
        if key not in state:
            cam = cams.get(key)
            if cam is None:
                state[key] = (row.model, row.start, None)
                continue
            act = cam.activation
            state[key] = (cam.model, cam.last_start, act.started_at if act is not None else None)
        model, last_start, act_start = state[key]
        if row.start < last_start or (act_start is not None and row.start < act_start):
            continue
        if row.model != model:
            out[key] = (row, model)
    return out


def read_baseline(device: str, camera: str, model: str | None, before: float, n: int) -> Baseline:
    """One camera's baseline: its newest ``n`` windows of ``model`` before ``before``."""
    return list(
        DriftSummary.select(DriftSummary.id, DriftSummary.payload)
        .where(
            (DriftSummary.device == device)
            & (DriftSummary.camera == camera)
            & (DriftSummary.model == model)
            & (DriftSummary.start < before)
        )
        .order_by(DriftSummary.start.desc())
        .limit(n)
        .tuples()
    )


def read_baselines(
    db: pw.Database, wanted: Sequence[tuple[str, str, str, float]], per_camera: int
) -> dict[Key, Baseline]:
    """Baselines of many cameras: for each (device, camera, model, before), its newest
    ``per_camera`` windows of ``model`` that start before ``before`` (see the module).
    Every wanted camera is in the answer (an empty list: no such windows)."""
    out: dict[Key, Baseline] = {(d, c): [] for d, c, _, _ in wanted}
    ident, device, camera, model, start, payload = columns(
        DriftSummary, ("id", "device", "camera", "model", "start", "payload")
    )
    p = db.param
    for i in range(0, len(wanted), KEYS_PER_QUERY):
        chunk = wanted[i : i + KEYS_PER_QUERY]
        values = ", ".join(f"({p}, {p}, {p}, {p})" for _ in chunk)
        sql = (
            f"WITH k (dev, cam, mdl, upto) AS (VALUES {values}) "
            f"SELECT t.sid, t.dev, t.cam, t.body FROM ("
            f"SELECT s.{ident} AS sid, s.{device} AS dev, s.{camera} AS cam, "
            f"s.{payload} AS body, ROW_NUMBER() OVER (PARTITION BY s.{device}, s.{camera} "
            f"ORDER BY s.{start} DESC) AS rn "
            f"FROM {table(DriftSummary)} s JOIN k ON s.{device} = k.dev "
            f"AND s.{camera} = k.cam AND s.{model} = k.mdl AND s.{start} < k.upto"
            f") t WHERE t.rn <= {p}"
        )
        params = [v for key in chunk for v in key] + [per_camera]
        for sid, dev, cam, body in db.execute_sql(sql, params):
            out[(dev, cam)].append((sid, body))
    return out


def _returning(db: pw.Database) -> bool:
    if isinstance(db, pw.SqliteDatabase):
        return sqlite3.sqlite_version_info >= (3, 35, 0)
    return True


def insert_activations(db: pw.Database, values: Sequence[dict]) -> dict[Key, DriftActivation]:
    """Create activation rows (one per camera) in bulk; returns them by camera."""
    out: dict[Key, DriftActivation] = {}
    if not _returning(db):
        for v in values:
            out[(v["device"], v["camera"])] = DriftActivation.create(**v)
        return out
    for i in range(0, len(values), ROWS_PER_INSERT):
        chunk = values[i : i + ROWS_PER_INSERT]
        ids = (
            DriftActivation.insert_many(chunk)
            .returning(DriftActivation.id, DriftActivation.device, DriftActivation.camera)
            .tuples()
            .execute()
        )
        by_key = {(dev, cam): ident for ident, dev, cam in ids}
        for v in chunk:
            key = (v["device"], v["camera"])
            act = DriftActivation(id=by_key[key], **v)
            act._dirty.clear()  # stored as it is
            out[key] = act
    return out

"""Multi-row statements for the ingest hot path, on SQLite and PostgreSQL alike.

Peewee builds a multi-row INSERT one value node at a time: for a batch of 500 count
bins (about 6,000 rollup and total rows) that took longer than SQLite took to run
the statements. Here a statement is a string with one placeholder per value, built
once per shape, and the values go to the driver as one flat list; column and table
names come from the peewee models, so the schema stays defined in one place
(`flowfleet.registry.store.db`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import chain

import peewee as pw

# SQLite (3.32+) binds at most 32,766 values per statement; PostgreSQL 65,535.
MAX_VALUES = 30_000


def table(model: type[pw.Model]) -> str:
    return f'"{model._meta.table_name}"'


def columns(model: type[pw.Model], names: Sequence[str]) -> list[str]:
    """The quoted column names of the model fields ``names``."""
    fields = model._meta.fields
    return [f'"{fields[n].column_name}"' for n in names]


def _chunks(rows: Sequence, per: int) -> Iterable[Sequence]:
    for i in range(0, len(rows), per):
        yield rows[i : i + per]


def insert(
    db: pw.Database,
    model: type[pw.Model],
    names: Sequence[str],
    rows: Sequence[Sequence[object]],
    suffix: str = "",
) -> list[tuple]:
    """INSERT ``rows`` (tuples in the order of ``names``) in as few statements as the
    drivers allow; ``suffix`` is appended to each (``ON CONFLICT ...``,
    ``RETURNING ...``). Returns the rows RETURNING produced, if any."""
    if not rows:
        return []
    cols = ", ".join(columns(model, names))
    one = "(" + ", ".join([db.param] * len(names)) + ")"
    out: list[tuple] = []
    for part in _chunks(rows, max(1, MAX_VALUES // len(names))):
        sql = f"INSERT INTO {table(model)} ({cols}) VALUES {', '.join([one] * len(part))} {suffix}"
        cursor = db.execute_sql(sql, list(chain.from_iterable(part)))
        if "RETURNING" in suffix:
            out.extend(cursor.fetchall())
    return out


def select_in(
    db: pw.Database,
    model: type[pw.Model],
    names: Sequence[str],
    keys: Sequence[str],
    values: Sequence[object] | Sequence[Sequence[object]],
    tail: str = "",
) -> list[tuple]:
    """SELECT ``names`` of the rows whose ``keys`` are among ``values`` (scalars for
    one key column, tuples for several); ``tail`` follows the WHERE (``GROUP BY``)."""
    if not values:
        return []
    cols = ", ".join(columns(model, names)) if names else ""
    key_cols = columns(model, keys)
    if len(keys) == 1:
        target, one, flat = key_cols[0], db.param, lambda part: list(part)
    else:
        target = "(" + ", ".join(key_cols) + ")"
        one = "(" + ", ".join([db.param] * len(keys)) + ")"

        def flat(part):
            return [v for key in part for v in key]

    out: list[tuple] = []
    for part in _chunks(values, max(1, MAX_VALUES // len(keys))):
        sql = (
            f"SELECT {cols} FROM {table(model)} "
            f"WHERE {target} IN ({', '.join([one] * len(part))}) {tail}"
        )
        out.extend(db.execute_sql(sql, flat(part)).fetchall())
    return out


def upsert_adding(
    db: pw.Database,
    model: type[pw.Model],
    key: Sequence[str],
    adds: Sequence[str],
    maxes: Sequence[str],
    rows: Sequence[Sequence[object]],
    others: Sequence[str] = (),
) -> None:
    """Insert rows (in the order ``key + others + adds + maxes``) or, where the ``key``
    exists, add ``adds`` to the stored values and keep the larger of ``maxes``
    (NULL-safe). ``rows`` must not repeat a key (PostgreSQL refuses to update one row
    twice in a statement)."""
    t = table(model)
    sets = [f"{c} = {t}.{c} + excluded.{c}" for c in columns(model, adds)]
    sets += [
        f"{c} = CASE WHEN {t}.{c} IS NULL OR excluded.{c} > {t}.{c} "
        f"THEN excluded.{c} ELSE {t}.{c} END"
        for c in columns(model, maxes)
    ]
    suffix = f"ON CONFLICT ({', '.join(columns(model, key))}) DO UPDATE SET {', '.join(sets)}"
    insert(db, model, [*key, *others, *adds, *maxes], rows, suffix)

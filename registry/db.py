"""The registry's database: peewee models behind one `DatabaseProxy`.

Every model is bound to :data:`database_proxy`, never to a concrete database, so the
same code runs on SQLite (the embedded default, in WAL mode) and, later, PostgreSQL:
:func:`open_database` picks the engine from a URL or path and points the proxy at it.

The proxy is process-wide, so a process works with one registry database at a time;
opening the same SQLite file again returns the database that is already open.

Times are stored as float seconds since the Unix epoch (UTC), like the wire contract.
"""

from __future__ import annotations

import time
from pathlib import Path

import peewee as pw

database_proxy = pw.DatabaseProxy()

# Applied by peewee to every new connection (each thread has its own). WAL lets the
# web UI read while ingest writes; synchronous=normal is durable across process
# crashes in WAL mode and much faster than full; busy_timeout makes a writer wait for
# the lock instead of failing at once with "database is locked".
SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "synchronous": "normal",
    "foreign_keys": 1,
    "busy_timeout": 10_000,
}

# Dead letters keep at most this much of the offending payload.
DEAD_LETTER_MAX_BYTES = 64 * 1024

DEVICE_STATES = ("online", "offline", "unknown")


class BaseModel(pw.Model):
    class Meta:
        database = database_proxy
        legacy_table_names = False


class Device(BaseModel):
    """One device, keyed by the id it authenticates with (its topic segment)."""

    id = pw.CharField(primary_key=True, max_length=64)
    first_seen = pw.DoubleField()
    last_seen = pw.DoubleField(null=True)
    state = pw.CharField(max_length=16, default="unknown")
    state_since = pw.DoubleField(null=True)
    agent_version = pw.CharField(max_length=128, null=True)


class CountBin(BaseModel):
    """One count bin as received; (device, seq) is unique so redelivery is a no-op."""

    device = pw.ForeignKeyField(Device, column_name="device", on_delete="CASCADE")
    seq = pw.BigIntegerField()
    start = pw.DoubleField(column_name="window_start")
    end = pw.DoubleField(column_name="window_end")
    received_at = pw.DoubleField()
    payload = pw.TextField(help_text="canonical JSON of the validated payload")

    class Meta:
        indexes = ((("device", "seq"), True),)


class LineTotal(BaseModel):
    """One (camera, line, class) entry of one bin; totals are a GROUP BY over these."""

    bin = pw.ForeignKeyField(CountBin, on_delete="CASCADE")
    device = pw.ForeignKeyField(Device, column_name="device", on_delete="CASCADE")
    seq = pw.BigIntegerField()
    start = pw.DoubleField(column_name="window_start")
    camera = pw.CharField(max_length=64)
    line = pw.CharField(max_length=64)
    class_ = pw.CharField(column_name="class", max_length=64)
    count_in = pw.BigIntegerField()
    count_out = pw.BigIntegerField()

    class Meta:
        # Covering index: the totals query reads only the index, never the table.
        indexes = ((("device", "camera", "line", "class_", "count_in", "count_out"), False),)


class ZoneTotal(BaseModel):
    """One (camera, zone, class) entry of one bin."""

    bin = pw.ForeignKeyField(CountBin, on_delete="CASCADE")
    device = pw.ForeignKeyField(Device, column_name="device", on_delete="CASCADE")
    seq = pw.BigIntegerField()
    start = pw.DoubleField(column_name="window_start")
    camera = pw.CharField(max_length=64)
    zone = pw.CharField(max_length=64)
    class_ = pw.CharField(column_name="class", max_length=64)
    entries = pw.BigIntegerField()
    exits = pw.BigIntegerField()
    peak_occupancy = pw.BigIntegerField()
    dwell_s_sum = pw.DoubleField(default=0.0)
    dwell_n = pw.BigIntegerField(default=0)

    class Meta:
        indexes = ((("device", "camera", "zone", "class_"), False),)


class HealthBeat(BaseModel):
    """One health beat; (device, seq) is unique like count bins."""

    device = pw.ForeignKeyField(Device, column_name="device", on_delete="CASCADE")
    seq = pw.BigIntegerField()
    ts = pw.DoubleField()
    received_at = pw.DoubleField()
    payload = pw.TextField(help_text="canonical JSON of the validated payload")

    class Meta:
        indexes = ((("device", "seq"), True),)


class DeadLetter(BaseModel):
    """A message the registry could not accept, with the reason, kept for operators.

    ``device`` is whatever the topic names (possibly a device that does not exist), so
    it is plain text rather than a foreign key.
    """

    id = pw.AutoField()
    received_at = pw.DoubleField(index=True)
    topic = pw.TextField()
    device = pw.CharField(max_length=256, null=True, index=True)
    reason = pw.TextField()
    payload = pw.BlobField(help_text=f"first {DEAD_LETTER_MAX_BYTES} bytes")
    payload_size = pw.IntegerField(help_text="size of the original payload in bytes")


MODELS: tuple[type[BaseModel], ...] = (
    Device,
    CountBin,
    LineTotal,
    ZoneTotal,
    HealthBeat,
    DeadLetter,
)


def sqlite_path(url_or_path: str | Path) -> Path:
    """The filesystem path named by a plain path or a ``sqlite:///path`` URL.

    Like SQLAlchemy and ``playhouse.db_url``: ``sqlite:///data/r.db`` is relative,
    ``sqlite:////var/lib/r.db`` absolute.
    """
    text = str(url_or_path)
    lowered = text.lower()
    if lowered.startswith(("postgresql://", "postgres://")):
        raise NotImplementedError(
            "PostgreSQL is not supported yet; give the registry a SQLite path or "
            "sqlite:///path URL for now"
        )
    if lowered.startswith("sqlite:///"):
        text = text[len("sqlite:///") :]
    elif "://" in text:
        raise ValueError(
            f"unsupported database URL {url_or_path!r}: use a file path or sqlite:///path"
        )
    if not text or text == ":memory:":
        # Every thread gets its own connection, and an in-memory database is per
        # connection: ingest and web would each see a different, empty database.
        raise ValueError("the registry needs a database file, not an in-memory database")
    return Path(text).expanduser()


def open_database(url_or_path: str | Path, *, create: bool = True) -> pw.Database:
    """Open (and by default create) the registry database and bind the models to it.

    Accepts a filesystem path or ``sqlite:///path``; ``postgresql://`` raises
    NotImplementedError for now. Opening the file that is already open returns the
    same database object, so the ingest worker and the web app share it.
    """
    path = sqlite_path(url_or_path).resolve()
    current = database_proxy.obj
    if isinstance(current, pw.SqliteDatabase) and current.database == str(path):
        return current
    path.parent.mkdir(parents=True, exist_ok=True)
    db = pw.SqliteDatabase(str(path), pragmas=SQLITE_PRAGMAS)
    database_proxy.initialize(db)
    if create:
        create_tables(db)
    return db


def create_tables(db: pw.Database) -> None:
    """Create missing tables and indexes (real migrations come later)."""
    require_bound(db)
    db.create_tables(MODELS, safe=True)


def require_bound(db: pw.Database) -> None:
    """Raise unless the models are bound to ``db`` (open it with open_database)."""
    if database_proxy.obj is not db:
        raise RuntimeError(
            "the registry models are bound to a different database; "
            "open this one with flowfleet.registry.db.open_database()"
        )


def now() -> float:
    """Current time in seconds since the Unix epoch (one place to read the clock)."""
    return time.time()

"""The base of every registry table: a peewee model bound to one process-wide proxy.

Kept apart from `db.py` so the table modules (`catalog_tables`, `access_tables`, ...)
can import it without importing the whole database module.
"""

from __future__ import annotations

import peewee as pw

database_proxy = pw.DatabaseProxy()


class BaseModel(pw.Model):
    class Meta:
        database = database_proxy
        legacy_table_names = False

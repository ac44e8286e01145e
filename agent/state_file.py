"""The agent's small JSON state files (activated models, pushed camera geometry).

Written whole to a temporary file, fsynced and renamed over the old one, so a power
cut leaves either the old state or the new one, never a torn file.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def load_state(path: Path, fallback: str) -> dict[str, Any]:
    """The JSON object in ``path``; {} when it is missing, or unreadable (logged, with
    ``fallback`` saying what the agent does instead)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.error("%s unreadable (%s); %s", path, exc, fallback)
        return {}
    return doc if isinstance(doc, dict) else {}


def save_state(path: Path, doc: dict[str, Any]) -> None:
    """Replace ``path`` with ``doc`` atomically (temporary file, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)

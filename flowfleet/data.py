"""Locate the reference data directory (models, videos, MOT15) via FLOWFLEET_DATA."""

from __future__ import annotations

import os
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """FLOWFLEET_DATA if set, else ../shared/data beside the repository checkout."""
    env = os.environ.get("FLOWFLEET_DATA")
    if env:
        return Path(env).expanduser()
    return (_REPO_ROOT.parent / "shared" / "data").resolve()


def models_dir() -> Path:
    return data_dir() / "models"


def videos_dir() -> Path:
    return data_dir() / "videos"

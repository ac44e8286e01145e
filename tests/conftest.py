"""Shared fixtures: reference data (fail loudly when missing), a real Mosquitto, and the
registry on each database kind (SQLite, then the machine's PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowfleet.data import data_dir
from flowfleet.provisioning.mosquitto import Broker
from flowfleet.registry.testing import KINDS, fresh_registry, temporary_database


@pytest.fixture(scope="session")
def data() -> Path:
    path = data_dir()
    if not (path / "models").is_dir() or not (path / "videos").is_dir():
        pytest.fail(
            f"reference data not found at {path}: set FLOWFLEET_DATA or put shared/data "
            "beside the checkout (tests never skip for missing data)"
        )
    return path


@pytest.fixture(scope="session")
def int8_model(data: Path) -> Path:
    return data / "models" / "yolov8n_full_integer_quant.tflite"


@pytest.fixture(scope="session")
def videos(data: Path) -> Path:
    return data / "videos"


@pytest.fixture
def broker(tmp_path: Path):
    """A private mosquitto on a free port with the project's generated config."""
    with Broker(tmp_path / "broker") as b:
        yield b


@pytest.fixture(params=KINDS, scope="module")
def db_url(request, tmp_path_factory):
    """A registry database per test module and database kind."""
    with temporary_database(request.param, tmp_path_factory.mktemp("db")) as url:
        yield url


@pytest.fixture
def registry(db_url, tmp_path):
    """A registry on an emptied ``db_url`` with its storage under ``tmp_path``."""
    return fresh_registry(db_url, tmp_path)

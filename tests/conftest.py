"""Shared fixtures: reference data (fail loudly when missing), a real Mosquitto, and the
registry on each database kind (SQLite, then the machine's PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowfleet.data import data_dir
from flowfleet.provisioning.mosquitto import Broker
from flowfleet.registry.testing import KINDS, fresh_registry, temporary_database
from tests.factories import PERSON_CLIP_FRAMES


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


@pytest.fixture(scope="session")
def person_clip(videos: Path, tmp_path_factory) -> Path:
    """An image folder (10 fps) of the person video's first `PERSON_CLIP_FRAMES` frames."""
    import cv2

    folder = tmp_path_factory.mktemp("person-clip")
    cap = cv2.VideoCapture(str(videos / "one-by-one-person-detection.mp4"))
    try:
        for i in range(PERSON_CLIP_FRAMES):
            ok, image = cap.read()
            if not ok:
                pytest.fail(f"one-by-one-person-detection.mp4 ended at frame {i}")
            cv2.imwrite(str(folder / f"{i:05d}.png"), image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    finally:
        cap.release()
    return folder


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

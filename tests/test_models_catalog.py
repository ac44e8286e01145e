"""The model catalog: every entry pinned by sha256; local copies are verified."""

from __future__ import annotations

import re

import pytest

from flowfleet.models import catalog


def test_every_entry_is_pinned_and_one_is_default():
    entries = catalog.load_catalog()
    assert sum(e.default for e in entries.values()) == 1
    for e in entries.values():
        assert re.fullmatch(r"[0-9a-f]{64}", e.sha256), e.name
        assert e.url.startswith("https://"), e.name


def test_reference_copies_match_the_catalog(data):
    for e in catalog.load_catalog().values():
        path = data / "models" / e.file
        assert path.is_file(), f"{path} missing"
        assert catalog.sha256_file(path) == e.sha256, f"{path} does not match the catalog"


def test_resolve_finds_the_default_model_without_network(data):
    path = catalog.resolve(catalog.default_entry().name, download=False)
    assert path.parent == data / "models"


def test_a_copy_with_wrong_bytes_is_not_used(tmp_path, monkeypatch):
    entry = catalog.default_entry()
    monkeypatch.setenv("FLOWFLEET_DATA", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / entry.file).write_bytes(b"tampered")
    with pytest.raises(catalog.CatalogError, match="not found"):
        catalog.resolve(entry.name, download=False)


def test_download_with_wrong_checksum_is_refused(tmp_path, data):
    """A 'download' (file:// URL) whose bytes do not match is refused and not kept."""
    entry = catalog.default_entry()
    wrong = tmp_path / "wrong.tflite"
    wrong.write_bytes(b"not the model")
    bad = catalog.CatalogEntry(**{**entry.__dict__, "url": wrong.as_uri()})
    with pytest.raises(catalog.CatalogError, match="expected"):
        catalog.fetch(bad, tmp_path / "dest", progress=False)
    assert not any((tmp_path / "dest").iterdir())
    good = catalog.CatalogEntry(
        **{**entry.__dict__, "url": (data / "models" / entry.file).as_uri()}
    )
    path = catalog.fetch(good, tmp_path / "dest", progress=False)
    assert catalog.sha256_file(path) == entry.sha256


def test_unknown_model_name():
    with pytest.raises(catalog.CatalogError, match="unknown model 'nope'"):
        catalog.resolve("nope", download=False)

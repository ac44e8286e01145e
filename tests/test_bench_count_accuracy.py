"""`bench_count_accuracy.py --tracks DIR` refuses an incomplete DIR before counting."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_count_accuracy
import mot15

OURS = ("ours",)


def _write_tracks(root: Path, trackers, *, origins: bool) -> None:
    for t in trackers:
        for name in mot15.GT_SEQUENCES:
            (root / t).mkdir(parents=True, exist_ok=True)
            (root / t / f"{name}.txt").write_text("")
            if origins and t in OURS:
                (root / t / f"{name}.origins.txt").write_text("")


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ("none", "no such folder"),
        ("no-origins", "missing {root}/ours/PETS09-S2L1.origins.txt"),
        ("no-peer", "missing {root}/sort/PETS09-S2L1.txt"),
    ],
)
def test_incomplete_track_dir_is_refused_naming_the_files(tmp_path, layout, expected):
    root = tmp_path / "tracks"
    if layout == "no-origins":
        _write_tracks(root, ["ours", "sort"], origins=False)
    elif layout == "no-peer":
        _write_tracks(root, ["ours"], origins=True)
    with pytest.raises(SystemExit) as exc:
        bench_count_accuracy.check_track_dir(root, ["ours", "sort"], OURS)
    message = str(exc.value)
    assert message.startswith(f"--tracks {root}: ")
    assert expected.format(root=root) in message
    assert message.endswith(f"benchmarks/bench_tracker.py --tracks {root}")


def test_complete_track_dir_passes(tmp_path):
    _write_tracks(tmp_path, ["ours", "sort"], origins=True)
    bench_count_accuracy.check_track_dir(tmp_path, ["ours", "sort"], OURS)

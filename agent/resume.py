"""Opening a camera's source at a persisted frame position.

After a crash the agent resumes a file camera where its last persisted count bin
ended (see `Outbox.positions`) instead of counting the file again from the start.
A position is ``frame.index + 1`` of the last frame counted into a stored bin: the
absolute frame number to start at next (it counts on across loops; a looping source
maps it into the file).

`open_camera_source` opens the source through `sources.open_source(...,
start_frame=...)` (files and image folders seek; live streams have no position).
"""

from __future__ import annotations

from pathlib import Path

from .sources import open_source


def source_size(path: str | Path) -> int:
    """The file's size in bytes: a cheap identity so a replaced file starts over."""
    try:
        return Path(path).stat().st_size
    except OSError:
        return -1


def is_resumable(source) -> bool:
    """Offline sources (files, folders) have a position; live streams do not."""
    return getattr(source, "start_frame", None) is not None


def open_camera_source(
    spec: str,
    *,
    start_frame: int = 0,
    loop: bool = False,
    realtime: bool = False,
    fps_cap: float | None = None,
    fps: float = 10.0,
):
    """Open a camera's source at ``start_frame`` (ignored by live streams)."""
    return open_source(
        spec, loop=loop, realtime=realtime, fps_cap=fps_cap, start_frame=start_frame, fps=fps
    )

"""Frame sources. A reader thread decodes ahead so decoding overlaps inference.

Files are read as fast as the consumer takes frames (offline counting) or paced to
their own frame rate (``realtime=True``, for the demo's looping "cameras").
RTSP, USB/CSI cameras and image folders arrive with the runtime issue.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np


class SourceError(Exception):
    """A source that cannot be opened or read; the message names it."""


@dataclass(frozen=True)
class Frame:
    image: np.ndarray  # BGR uint8
    index: int  # frame number in the source, from 0 (counts on across loops)
    ts: float  # seconds: position in the file, or wall-clock time when realtime


_END = object()


class VideoFileSource:
    """Frames of a video file, decoded on a background thread.

    Args:
        path: the video file.
        loop: start over at the end (the demo's endless cameras).
        realtime: pace frames to the file's fps and stamp them with wall-clock time.
        fps_cap: drop frames so at most this many per second of video are delivered.
        prefetch: decoded frames kept ahead of the consumer.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        loop: bool = False,
        realtime: bool = False,
        fps_cap: float | None = None,
        prefetch: int = 4,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise SourceError(f"{self.path}: video file not found")
        cap = cv2.VideoCapture(str(self.path))
        ok, first = cap.read() if cap.isOpened() else (False, None)
        if not ok or first is None:
            cap.release()
            raise SourceError(f"{self.path}: cannot decode video (not a video file, or corrupt)")
        self.fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
        if not (1.0 <= self.fps <= 1000.0):
            self.fps = 25.0
        self.frame_count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or None
        self.width, self.height = first.shape[1], first.shape[0]
        cap.release()
        self.loop = loop
        self.realtime = realtime
        self.step = max(1, round(self.fps / fps_cap)) if fps_cap else 1
        self.prefetch = prefetch
        self._stop = threading.Event()

    @property
    def delivered_fps(self) -> float:
        return self.fps / self.step

    def stop(self) -> None:
        self._stop.set()

    def __iter__(self) -> Iterator[Frame]:
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        reader = threading.Thread(target=self._read, args=(q,), daemon=True, name="video-reader")
        reader.start()
        try:
            while True:
                item = q.get()
                if item is _END:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            self._stop.set()
            while reader.is_alive():  # unblock a reader waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    reader.join(0.05)

    def _read(self, q: queue.Queue) -> None:
        index = 0
        t0 = time.monotonic()
        wall0 = time.time()
        try:
            while not self._stop.is_set():
                cap = cv2.VideoCapture(str(self.path))
                pos = 0
                while not self._stop.is_set():
                    if pos % self.step == 0:
                        ok, image = cap.read()
                    else:
                        ok, image = cap.grab(), None
                    if not ok:
                        break
                    if image is not None:
                        if self.realtime:
                            due = t0 + index / self.fps
                            delay = due - time.monotonic()
                            if delay > 0:
                                self._stop.wait(delay)
                            ts = wall0 + index / self.fps
                        else:
                            ts = index / self.fps
                        q.put(Frame(image, index, ts))
                    pos += 1
                    index += 1
                cap.release()
                if not self.loop or pos == 0:
                    break
        except Exception as exc:  # surface decoder failures to the consumer thread
            q.put(SourceError(f"{self.path}: {exc}"))
        q.put(_END)

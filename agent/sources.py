"""Frame sources: video files, image folders, network streams and cameras.

Two families, one iteration API (``for frame in source`` yields `Frame`, ``stop()``
ends it from any thread, ``fps`` / ``delivered_fps`` / ``frame_count``):

- **Offline** (`VideoFileSource`, `ImageFolderSource`): every frame, in order. A
  reader thread decodes a few frames ahead so decoding overlaps inference. Read as
  fast as the consumer takes them (offline counting) or paced to the source's frame
  rate (``realtime=True``, the demo's looping "cameras"). ``start_frame`` resumes at
  a persisted position after a crash.
- **Live** (`LiveSource`: RTSP/HTTP/RTMP/UDP streams, USB/CSI cameras, GStreamer or
  libcamera pipelines): a reader thread reads as fast as the source produces and
  keeps only the newest frame (a 1-slot buffer, never a growing backlog); a frame
  replaced before the consumer took it is counted in ``dropped_frames``. Each frame
  is stamped with the source clock (``CAP_PROP_POS_MSEC``: the stream's presentation
  time, or the V4L2 buffer time) mapped to the wall clock, not with the time
  inference ran. A stream that drops, or never connects, is retried with exponential
  backoff; ``state`` and ``error`` say what is going on (the error names the URL,
  with any password masked).

`open_source(spec, ...)` picks the kind from the spec string.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)


class SourceError(Exception):
    """A source that cannot be opened or read; the message names it."""


@dataclass(frozen=True)
class Frame:
    image: np.ndarray  # BGR uint8
    index: int  # frame number in the source, from 0 (counts on across loops and reconnects)
    ts: float  # seconds: position in the file, or wall-clock time (realtime and live sources)


_END = object()

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "tcp", "srt", "rtp")


# -- offline sources ---------------------------------------------------------------------


class _OfflineSource:
    """Shared machinery of file-like sources: prefetch thread, pacing, loop, seek."""

    fps: float
    frame_count: int | None
    name: str

    def __init__(
        self,
        *,
        loop: bool,
        realtime: bool,
        fps_cap: float | None,
        start_frame: int,
        prefetch: int,
    ) -> None:
        if start_frame < 0:
            raise SourceError(f"{self.name}: start_frame must be >= 0, got {start_frame}")
        if fps_cap is not None and fps_cap <= 0:
            raise SourceError(f"{self.name}: fps_cap must be > 0, got {fps_cap}")
        self.loop, self.realtime = loop, realtime
        self.step = max(1, round(self.fps / fps_cap)) if fps_cap else 1
        self.start_frame, self.prefetch = start_frame, prefetch
        self.dropped_frames = 0  # offline sources deliver every frame they read
        self._stop = threading.Event()

    @property
    def delivered_fps(self) -> float:
        return self.fps / self.step

    @property
    def state(self) -> str:
        return "stopped" if self._stop.is_set() else "running"

    @property
    def error(self) -> str | None:
        return None

    def stop(self) -> None:
        self._stop.set()

    # Subclasses: yield (ok, image or None) from file position ``pos`` on; ``decode``
    # False means the frame is skipped (fps_cap), so a cheap grab is enough.
    def _frames_from(self, pos: int, decode: Callable[[int], bool]) -> Iterator[np.ndarray | None]:
        raise NotImplementedError

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

    def _first_position(self) -> int | None:
        """Where in the file ``start_frame`` lands, or None when past the end."""
        n = self.frame_count
        if not self.start_frame or not n:
            return self.start_frame
        if self.start_frame < n:
            return self.start_frame
        return self.start_frame % n if self.loop else None

    def _read(self, q: queue.Queue) -> None:
        index = self.start_frame
        t0 = time.monotonic()
        wall0 = time.time()
        pos = self._first_position()
        try:
            while pos is not None and not self._stop.is_set():
                read = 0
                for image in self._frames_from(pos, lambda p: p % self.step == 0):
                    if self._stop.is_set():
                        break
                    if image is not None:
                        since_start = (index - self.start_frame) / self.fps
                        if self.realtime:
                            delay = t0 + since_start - time.monotonic()
                            if delay > 0:
                                self._stop.wait(delay)
                            ts = wall0 + since_start
                        else:
                            ts = index / self.fps
                        self._put(q, Frame(image, index, ts))
                    read += 1
                    index += 1
                if not self.loop or read == 0:
                    break
                pos = 0
        except Exception as exc:  # surface decoder failures to the consumer thread
            self._put(q, SourceError(f"{self.name}: {exc}"))
        self._put(q, _END)

    def _put(self, q: queue.Queue, item) -> None:
        while True:
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                if self._stop.is_set() and item is not _END:
                    return


class VideoFileSource(_OfflineSource):
    """Frames of a video file, decoded on a background thread.

    Args:
        path: the video file.
        loop: start over at the end (the demo's endless cameras).
        realtime: pace frames to the file's fps and stamp them with wall-clock time.
        fps_cap: drop frames so at most this many per second of video are delivered.
        start_frame: resume here (a frame index from an earlier run: frames are
            numbered on across loops, so for a looping file it is taken modulo the
            file's length); ``Frame.index`` continues from it.
        prefetch: decoded frames kept ahead of the consumer.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        loop: bool = False,
        realtime: bool = False,
        fps_cap: float | None = None,
        start_frame: int = 0,
        prefetch: int = 4,
    ) -> None:
        self.path = Path(path)
        self.name = str(self.path)
        if not self.path.is_file():
            raise SourceError(f"{self.path}: video file not found")
        cap = _open_file(self.path)
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
        super().__init__(
            loop=loop,
            realtime=realtime,
            fps_cap=fps_cap,
            start_frame=start_frame,
            prefetch=prefetch,
        )

    def _frames_from(self, pos: int, decode: Callable[[int], bool]) -> Iterator[np.ndarray | None]:
        cap = _open_file(self.path)
        try:
            if pos:
                cap.set(cv2.CAP_PROP_POS_FRAMES, pos)
                if int(cap.get(cv2.CAP_PROP_POS_FRAMES)) != pos:
                    log.info("%s: inexact seek, skipping %d frames instead", self.path, pos)
                    cap.release()
                    cap = _open_file(self.path)
                    for _ in range(pos):
                        if not cap.grab():
                            return
            while True:
                ok, image = cap.read() if decode(pos) else (cap.grab(), None)
                if not ok:
                    return
                yield image
                pos += 1
        finally:
            cap.release()


def _open_file(path: Path) -> cv2.VideoCapture:
    # One decoder thread: FFmpeg's default (one per core, frame threading) costs more
    # CPU per frame and fights the inference threads; the reader is ahead anyway.
    cap = cv2.VideoCapture(str(path), cv2.CAP_ANY, [cv2.CAP_PROP_N_THREADS, 1])
    return cap if cap.isOpened() else cv2.VideoCapture(str(path))  # backend without it


def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


class ImageFolderSource(_OfflineSource):
    """The image files of a folder, in natural name order (``img2`` before ``img10``).

    Files with other suffixes are ignored; an image that cannot be decoded is skipped
    with a warning (and counted in ``unreadable``). ``fps`` gives the frames their
    timestamps (``index / fps``) and the pace when ``realtime``.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        fps: float = 10.0,
        loop: bool = False,
        realtime: bool = False,
        fps_cap: float | None = None,
        start_frame: int = 0,
        prefetch: int = 4,
    ) -> None:
        self.path = Path(path)
        self.name = str(self.path)
        if not self.path.is_dir():
            raise SourceError(f"{self.path}: image folder not found")
        if not (0 < fps <= 1000):
            raise SourceError(f"{self.path}: fps must be in (0, 1000], got {fps}")
        self.files = sorted(
            (p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
            key=_natural_key,
        )
        if not self.files:
            raise SourceError(
                f"{self.path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the folder"
            )
        self.fps = float(fps)
        self.frame_count = len(self.files)
        self.unreadable = 0
        first = cv2.imread(str(self.files[0]))
        self.width, self.height = (first.shape[1], first.shape[0]) if first is not None else (0, 0)
        super().__init__(
            loop=loop,
            realtime=realtime,
            fps_cap=fps_cap,
            start_frame=start_frame,
            prefetch=prefetch,
        )

    def _frames_from(self, pos: int, decode: Callable[[int], bool]) -> Iterator[np.ndarray | None]:
        for p in range(pos, len(self.files)):
            if not decode(p):
                yield None
                continue
            image = cv2.imread(str(self.files[p]))
            if image is None:
                self.unreadable += 1
                log.warning("%s: cannot decode image, skipped", self.files[p])
            yield image


# -- live sources ------------------------------------------------------------------------


_FFMPEG_OPTIONS = "OPENCV_FFMPEG_CAPTURE_OPTIONS"
_FFMPEG_ENV_LOCK = threading.Lock()


def redact_url(url: str) -> str:
    """``rtsp://user:secret@host/x`` -> ``rtsp://user:***@host/x`` (for logs and errors)."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


class LiveSource:
    """A live stream or camera: newest frame only, source-clock timestamps, reconnect.

    Args:
        spec: what to open: a URL, a device (``0``, ``/dev/video0``) or a GStreamer /
            libcamera pipeline string (contains ``!``).
        kind: ``"stream"``, ``"camera"`` or ``"gstreamer"`` (`open_source` decides).
        fps_cap: deliver at most this many frames per second (by source time); frames
            in between are skipped on the reader thread and not counted as dropped.
        reconnect: reopen when the source fails or ends (with exponential backoff from
            ``backoff_s`` up to ``backoff_max_s``); without it, iteration ends.
        open_timeout_s / read_timeout_s: for network streams (FFmpeg backend).
        rtsp_transport: ``"tcp"`` (default: no UDP packet loss, goes through NAT) or
            ``"udp"``.
        capture_factory: for tests: a callable returning an opened ``cv2.VideoCapture``.

    ``state`` is ``connecting`` (never connected yet), ``running``, ``reconnecting``
    or ``stopped``; ``error`` is the last problem (None while running).
    """

    def __init__(
        self,
        spec: str,
        *,
        kind: str = "stream",
        fps_cap: float | None = None,
        reconnect: bool = True,
        backoff_s: float = 0.5,
        backoff_max_s: float = 30.0,
        open_timeout_s: float = 10.0,
        read_timeout_s: float = 10.0,
        rtsp_transport: str = "tcp",
        capture_factory: Callable[[], cv2.VideoCapture] | None = None,
    ) -> None:
        if fps_cap is not None and fps_cap <= 0:
            raise SourceError(f"{redact_url(spec)}: fps_cap must be > 0, got {fps_cap}")
        if rtsp_transport not in ("tcp", "udp"):
            raise SourceError(f"rtsp_transport must be 'tcp' or 'udp', got {rtsp_transport!r}")
        if kind == "gstreamer" and not _has_gstreamer():
            raise SourceError(
                f"{spec!r}: a GStreamer pipeline, but this OpenCV build has no GStreamer "
                "support (install an OpenCV built with GStreamer, e.g. Debian's python3-opencv)"
            )
        self.spec = spec
        self.name = redact_url(spec)
        self.kind = kind
        self.fps_cap = fps_cap
        self.reconnect = reconnect
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.open_timeout_s = open_timeout_s
        self.read_timeout_s = read_timeout_s
        self.rtsp_transport = rtsp_transport
        self._factory = capture_factory or self._open_capture
        self.frame_count = None
        self.fps = 0.0  # the source's own rate, known once connected
        self.width = self.height = 0
        self.state = "connecting"
        self.error: str | None = None
        self.frames_read = self.dropped_frames = self.skipped_frames = 0
        self.connects = self.failed_attempts = 0
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._slot: Frame | None = None
        self._ended = False
        self._thread: threading.Thread | None = None
        self._connected = threading.Event()

    @property
    def delivered_fps(self) -> float:
        fps = self.fps or 25.0
        return min(fps, self.fps_cap) if self.fps_cap else fps

    def wait_connected(self, timeout: float) -> bool:
        """Start reading (if not yet) and wait until the first connection succeeded."""
        self._start()
        return self._connected.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def __iter__(self) -> Iterator[Frame]:
        self._start()
        try:
            while True:
                with self._cond:
                    while self._slot is None and not self._ended and not self._stop.is_set():
                        self._cond.wait(0.5)
                    if self._stop.is_set() or (self._slot is None and self._ended):
                        return
                    frame, self._slot = self._slot, None
                yield frame
        finally:
            self.stop()

    # -- reader thread -------------------------------------------------------------------

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, daemon=True, name=f"live-reader-{self.kind}"
            )
            self._thread.start()

    def _open_capture(self) -> cv2.VideoCapture:
        if self.kind == "gstreamer":
            return cv2.VideoCapture(self.spec, cv2.CAP_GSTREAMER)
        if self.kind == "camera":
            target: int | str = int(self.spec) if self.spec.isdigit() else self.spec
            return cv2.VideoCapture(target)
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            int(self.open_timeout_s * 1000),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            int(self.read_timeout_s * 1000),
        ]
        if not self.spec.lower().startswith("rtsp") or _FFMPEG_OPTIONS in os.environ:
            return cv2.VideoCapture(self.spec, cv2.CAP_FFMPEG, params)
        # The FFmpeg backend reads its options from the environment while opening:
        # set this source's transport for the duration of the open (unless the user
        # set the variable), one open at a time.
        with _FFMPEG_ENV_LOCK:
            os.environ[_FFMPEG_OPTIONS] = f"rtsp_transport;{self.rtsp_transport}"
            try:
                return cv2.VideoCapture(self.spec, cv2.CAP_FFMPEG, params)
            finally:
                del os.environ[_FFMPEG_OPTIONS]

    def _run(self) -> None:
        backoff = self.backoff_s
        index = 0
        try:
            while not self._stop.is_set():
                cap = None
                try:
                    cap = self._factory()
                    if cap is None or not cap.isOpened():
                        raise SourceError(f"{self.name}: cannot open {self._what()}")
                    ok, image = cap.read()
                    if not ok or image is None:
                        raise SourceError(f"{self.name}: opened but no frame arrived")
                    self._on_connect(cap, image)
                    backoff = self.backoff_s
                    index = self._pump(cap, image, index)
                    problem = f"{self.name}: stream ended or stopped delivering frames"
                except SourceError as exc:
                    problem = str(exc)
                except Exception as exc:  # a backend error must not kill the thread
                    problem = f"{self.name}: {type(exc).__name__}: {exc}"
                finally:
                    if cap is not None:
                        cap.release()
                if self._stop.is_set():
                    break
                if not self.reconnect:
                    self.error = problem
                    break
                if self.state != "running":
                    self.failed_attempts += 1
                self.state = "connecting" if not self.connects else "reconnecting"
                self.error = f"{problem}; retrying in {backoff:.1f} s"
                log.warning("%s", self.error)
                if self._stop.wait(backoff):
                    break
                backoff = min(backoff * 2, self.backoff_max_s)
        finally:
            self.state = "stopped"
            with self._cond:
                self._ended = True
                self._cond.notify_all()

    def _what(self) -> str:
        return {"camera": "camera device", "gstreamer": "GStreamer pipeline"}.get(
            self.kind, "stream (unreachable, refused, or not a video stream)"
        )

    def _on_connect(self, cap: cv2.VideoCapture, image: np.ndarray) -> None:
        fps = cap.get(cv2.CAP_PROP_FPS)
        if 1.0 <= fps <= 1000.0:
            self.fps = fps
        self.height, self.width = image.shape[:2]
        self.connects += 1
        self.state, self.error = "running", None
        self._connected.set()
        log.info("%s: connected (%dx%d, %.1f fps)", self.name, self.width, self.height, fps)

    def _pump(self, cap: cv2.VideoCapture, image: np.ndarray, index: int) -> int:
        """Read until the source fails; returns the next frame index."""
        clock = _SourceClock()
        next_due = -1.0  # source time of the next frame to deliver under fps_cap
        period = 1.0 / self.fps_cap if self.fps_cap else 0.0
        while not self._stop.is_set():
            ts = clock.stamp(cap.get(cv2.CAP_PROP_POS_MSEC))
            self.frames_read += 1
            if period and ts < next_due:
                self.skipped_frames += 1
            else:
                next_due = max(next_due + period, ts) if next_due >= 0 else ts + period
                frame = Frame(image, index, ts)
                with self._cond:
                    if self._slot is not None:
                        self.dropped_frames += 1
                    self._slot = frame
                    self._cond.notify()
            index += 1
            ok, image = cap.read()
            if not ok or image is None:
                break
        return index


class _SourceClock:
    """Maps a source's own clock (``CAP_PROP_POS_MSEC``) onto the wall clock.

    ``ts = source time + offset``, where the offset is the smallest ``wall - source``
    seen so far: the frame that reached the reader with the least delay defines it.
    So frames keep the source's own spacing, and frames that were buffered (the burst
    FFmpeg reads while probing a stream) are not stamped with the moment they were
    read. Stamps never lie in the future. When the source clock is missing or stuck,
    the frame gets the time the reader received it; when it jumps backwards or
    lags the wall clock by more than ``max_drift_s`` (a camera clock running slow, a
    stream that restarted its timestamps), the offset is taken again. Stamps never
    go backwards.
    """

    def __init__(self, max_drift_s: float = 2.0) -> None:
        self.max_drift_s = max_drift_s
        self._offset: float | None = None
        self._last_src: float | None = None
        self._last_ts = 0.0

    def stamp(self, pos_msec: float, now: float | None = None) -> float:
        now = time.time() if now is None else now
        src = pos_msec / 1000.0 if pos_msec == pos_msec and pos_msec >= 0 else None
        last = self._last_src
        if src is not None:
            self._last_src = src
        if src is None or (last is not None and src == last):
            ts = now  # no usable source time: when the reader received the frame
        else:
            if self._offset is None or (last is not None and src < last):
                self._offset = now - src
            self._offset = min(self._offset, now - src)
            ts = src + self._offset
            if now - ts > self.max_drift_s:
                self._offset, ts = now - src, now
        ts = max(ts, self._last_ts)
        self._last_ts = ts
        return ts


_GST: bool | None = None


def _has_gstreamer() -> bool:
    global _GST
    if _GST is None:
        info = cv2.getBuildInformation()
        m = re.search(r"GStreamer:\s*(\S+)", info)
        _GST = bool(m and m.group(1).upper() != "NO")
    return _GST


# -- factory -----------------------------------------------------------------------------


def source_kind(spec: str) -> str:
    """``stream``, ``camera``, ``gstreamer``, ``folder`` or ``file`` for a source spec."""
    s = spec.strip()
    scheme = s.split("://", 1)[0].lower() if "://" in s else ""
    if scheme in STREAM_SCHEMES:
        return "stream"
    if "!" in s:
        return "gstreamer"
    if s.isdigit() or re.fullmatch(r"/dev/video\d+", s):
        return "camera"
    if Path(s).is_dir():
        return "folder"
    return "file"


def open_source(
    spec: str,
    *,
    loop: bool = False,
    realtime: bool = False,
    fps_cap: float | None = None,
    start_frame: int = 0,
    fps: float = 10.0,
    **live_options,
) -> VideoFileSource | ImageFolderSource | LiveSource:
    """Open any source from its spec string.

    - ``rtsp://``, ``rtsps://``, ``http(s)://``, ``rtmp://``, ``udp://``, ``tcp://``,
      ``srt://``: a network stream (`LiveSource`, reconnects).
    - ``0``, ``1``, ``/dev/video0``: a USB/CSI camera through OpenCV (V4L2).
    - anything containing ``!``: a GStreamer pipeline ending in ``appsink``, e.g.
      ``libcamerasrc ! video/x-raw,width=1280,height=720 ! videoconvert ! appsink``.
    - an existing folder: its images in name order, stamped at ``fps``.
    - anything else: a video file.

    ``loop``, ``realtime`` and ``start_frame`` apply to files and folders (live
    sources are always real time, their position cannot be resumed); ``fps_cap``
    applies to all. ``live_options`` go to `LiveSource` (``reconnect``,
    ``backoff_s``, ``backoff_max_s``, ``open_timeout_s``, ``read_timeout_s``,
    ``rtsp_transport``).

    Files and folders that cannot be opened raise SourceError at once; a live source
    never raises for being unreachable: it keeps retrying and reports ``state`` /
    ``error``.
    """
    kind = source_kind(spec)
    if kind == "file":
        return VideoFileSource(
            spec, loop=loop, realtime=realtime, fps_cap=fps_cap, start_frame=start_frame
        )
    if kind == "folder":
        return ImageFolderSource(
            spec, fps=fps, loop=loop, realtime=realtime, fps_cap=fps_cap, start_frame=start_frame
        )
    return LiveSource(spec.strip(), kind=kind, fps_cap=fps_cap, **live_options)

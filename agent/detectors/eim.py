"""Edge Impulse ``.eim`` backend through ``edge-impulse-linux``'s ``ImageImpulseRunner``.

An ``.eim`` is a Linux executable that serves its model over a unix socket: the runner
starts it with the socket path as its only argument, then exchanges JSON messages
(``hello`` -> model parameters and labels; ``classify`` -> results), each answer ending
in a NUL byte. Newer executables offer a shared-memory input buffer (``features_shm``
in the hello), which the runner uses when present. Features are one number per pixel,
``(r << 16) + (g << 8) + b``, at the model's input size.

Results are mapped to ``Detections``:

* object detection (``model_type`` ``object_detection``): ``bounding_boxes`` with
  ``x, y, width, height`` in model-input pixels and ``value`` the score;
* FOMO (``constrained_object_detection``): each result is a centroid cell; it becomes
  a small box of ``fomo_box`` model-input pixels (default: the reported cell size)
  centred on the centroid, so trackers and line counters get a stable point.

Boxes are mapped back to the frame for the model's ``image_resize_mode``: ``squash``,
``fit-shortest`` (centre crop) or ``fit-longest`` (letterbox).

``edge_impulse_linux`` is imported only here, when a detector is built. Its package
``__init__`` imports ``pyaudio`` (audio support), which needs the PortAudio headers
(Debian: ``portaudio19-dev``) to build.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from ..detections import Detections
from ..labels import load_labels
from .base import Detector, ModelError, ModelInfo, check_frame, one_line
from .yolo import letterbox_params, nms, nms_per_class

log = logging.getLogger(__name__)

OBJECT_DETECTION = "object_detection"
FOMO = "constrained_object_detection"
RESIZE_MODES = ("squash", "fit-shortest", "fit-longest")


def import_runner():
    """``ImageImpulseRunner`` from edge-impulse-linux.

    Raises:
        ImportError: with an install hint (pyaudio needs portaudio19-dev).
    """
    try:
        from edge_impulse_linux.image import ImageImpulseRunner
    except ImportError as e:
        missing = getattr(e, "name", None) or str(e)
        raise ImportError(
            f"Edge Impulse runtime not usable ({missing} missing): pip install "
            "edge-impulse-linux pyaudio (pyaudio builds against apt package portaudio19-dev)"
        ) from None
    return ImageImpulseRunner


class Geometry:
    """Frame <-> model-input mapping for one frame size and resize mode."""

    def __init__(self, frame_hw: tuple[int, int], input_wh: tuple[int, int], mode: str) -> None:
        fh, fw = frame_hw
        iw, ih = input_wh
        self.mode = mode
        if mode == "squash":
            self.sx, self.sy = iw / fw, ih / fh
            self.ox = self.oy = 0.0
            self.resize = (iw, ih)
            self.crop = None
            self.pad = None
        elif mode == "fit-shortest":  # scale so the frame covers the input, centre crop
            s = max(iw / fw, ih / fh)
            rw, rh = max(iw, round(fw * s)), max(ih, round(fh * s))
            cx, cy = (rw - iw) // 2, (rh - ih) // 2
            self.sx = self.sy = s
            self.ox, self.oy = -cx, -cy
            self.resize = (rw, rh)
            self.crop = (cx, cy)
            self.pad = None
        elif mode == "fit-longest":  # scale so the frame fits, pad (letterbox)
            p = letterbox_params((fh, fw), (ih, iw))
            self.sx = self.sy = p.scale
            self.ox, self.oy = p.pad_x, p.pad_y
            self.resize = (p.new_w, p.new_h)
            self.crop = None
            self.pad = (p.pad_x, p.pad_y)
        else:
            raise ValueError(
                f"unknown image_resize_mode {mode!r} (expected {', '.join(RESIZE_MODES)})"
            )
        self.input_wh = (iw, ih)
        self.frame_hw = (fh, fw)

    def to_input(self, frame: np.ndarray) -> np.ndarray:
        iw, ih = self.input_wh
        img = cv2.resize(frame, self.resize, interpolation=cv2.INTER_AREA)
        if self.crop is not None:
            cx, cy = self.crop
            img = img[cy : cy + ih, cx : cx + iw]
        elif self.pad is not None:
            px, py = self.pad
            canvas = np.zeros((ih, iw, 3), np.uint8)
            canvas[py : py + img.shape[0], px : px + img.shape[1]] = img
            img = canvas
        return img

    def to_frame(self, boxes: np.ndarray) -> np.ndarray:
        """xyxy in model-input pixels -> frame pixels, clipped to the frame."""
        b = np.asarray(boxes, np.float32).reshape(-1, 4).copy()
        b[:, [0, 2]] = (b[:, [0, 2]] - self.ox) / self.sx
        b[:, [1, 3]] = (b[:, [1, 3]] - self.oy) / self.sy
        fh, fw = self.frame_hw
        np.clip(b, 0, np.array([fw, fh, fw, fh], np.float32), out=b)
        return b


def pack_features(img_rgb: np.ndarray, grayscale: bool) -> np.ndarray:
    """Edge Impulse image features: one value per pixel, ``(r << 16) + (g << 8) + b``
    (grey: the grey level in all three bytes), row-major, as float32 (exact below 2**24)."""
    if grayscale:
        g = cv2.cvtColor(img_rgb, cv2.COLOR_RGB2GRAY).astype(np.uint32).reshape(-1)
        return (g * 0x010101).astype(np.float32)
    px = img_rgb.reshape(-1, 3).astype(np.uint32)
    return ((px[:, 0] << 16) | (px[:, 1] << 8) | px[:, 2]).astype(np.float32)


def results_to_arrays(
    result: dict, labels: tuple[str, ...], model_type: str, fomo_box: float | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``classify`` result -> (xyxy in model-input pixels, scores, class ids).

    Unknown labels are dropped with a warning (a runner answering with a label its
    hello did not announce is broken, but one odd row should not stop a camera).
    """
    rows = result.get("bounding_boxes") or []
    index = {name: i for i, name in enumerate(labels)}
    boxes, scores, ids = [], [], []
    for r in rows:
        label = r.get("label")
        if label not in index:
            log.warning("Edge Impulse result with unknown label %r dropped", label)
            continue
        x, y = float(r.get("x", 0)), float(r.get("y", 0))
        w, h = float(r.get("width", 0)), float(r.get("height", 0))
        if model_type == FOMO:
            cx, cy = x + w / 2, y + h / 2
            half = (fomo_box if fomo_box else max(w, h, 1.0)) / 2
            boxes.append((cx - half, cy - half, cx + half, cy + half))
        else:
            boxes.append((x, y, x + w, y + h))
        scores.append(float(r.get("value", 0.0)))
        ids.append(index[label])
    if not boxes:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32)
    return (
        np.asarray(boxes, np.float32),
        np.asarray(scores, np.float32),
        np.asarray(ids, np.int32),
    )


class _SendAllSocket:
    """A socket whose ``send`` sends everything (see ``EIMDetector.__init__``)."""

    def __init__(self, sock) -> None:
        self._sock = sock

    def send(self, data: bytes) -> int:
        self._sock.sendall(data)
        return len(data)

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


class EIMDetector(Detector):
    """Edge Impulse ``.eim`` object-detection or FOMO model.

    Args:
        path: the ``.eim`` executable.
        labels: optional label file overriding the runner's labels (same count).
        threads: unused (the ``.eim`` decides its own threading); kept for the
            common interface.
        conf_threshold: minimum score kept (applied on top of the model's own).
        iou_threshold / agnostic_nms / max_det: NMS on the runner's results.
        fomo_box: FOMO box side in model-input pixels (default: the cell size).
        start_timeout: seconds to wait for the executable's socket and hello.
        classify_timeout: seconds one classify may take before the call fails.

    Attributes:
        hello: the runner's hello (``model_parameters``, ``project``).
        model_type: ``object_detection`` or ``constrained_object_detection``.
        resize_mode: the model's ``image_resize_mode``.

    Raises:
        ModelError: SDK missing, the executable fails to start or answer, or it is
            not an image object-detection model (one line naming the file).
    """

    runtime = "eim"

    def __init__(
        self,
        path: str | Path,
        *,
        labels: str | Path | None = None,
        threads: int = 2,
        conf_threshold: float = 0.1,
        iou_threshold: float = 0.45,
        agnostic_nms: bool = False,
        max_det: int = 300,
        fomo_box: float | None = None,
        start_timeout: float = 30.0,
        classify_timeout: float = 30.0,
    ) -> None:
        self.path = Path(path)
        self._set_decode_options(
            conf_threshold=conf_threshold,
            iou_threshold=iou_threshold,
            agnostic_nms=agnostic_nms,
            max_det=max_det,
            threads=threads,
        )
        self.fomo_box = fomo_box
        self._runner = None
        self._proc = None
        if not os.access(self.path, os.X_OK):
            raise ModelError(f"{self.path}: .eim model is not executable (chmod +x it)")
        try:
            runner_cls = import_runner()
        except ImportError as e:
            raise ModelError(f"{self.path}: {e}") from None

        runner = runner_cls(str(self.path.resolve()))
        self._runner = runner
        hello = self._start(runner, start_timeout)
        if runner._client is not None:
            # edge-impulse-linux sends with socket.send(), which may send only part of
            # a large message once a timeout is set; give it a socket whose send() is
            # sendall(), then bound every answer by classify_timeout.
            runner._client = _SendAllSocket(runner._client)
            runner._client.settimeout(classify_timeout)
        self.hello = hello
        params = hello.get("model_parameters") or {}
        self.model_type = str(params.get("model_type", ""))
        if self.model_type not in (OBJECT_DETECTION, FOMO):
            self.close()
            raise ModelError(
                f"{self.path}: Edge Impulse model type {self.model_type or 'unknown'!r} is not "
                f"an object detector (expected {OBJECT_DETECTION} or {FOMO} (FOMO))"
            )
        width = int(params.get("image_input_width") or 0)
        height = int(params.get("image_input_height") or 0)
        if width <= 0 or height <= 0:
            self.close()
            raise ModelError(f"{self.path}: Edge Impulse model has no image input")
        self.input_size = (height, width)
        self.grayscale = int(params.get("image_channel_count", 3)) == 1
        mode = str(params.get("image_resize_mode") or "squash")
        self.resize_mode = mode if mode in RESIZE_MODES else "squash"
        if mode not in RESIZE_MODES:
            log.warning("%s: image_resize_mode %r not known; using squash", self.path, mode)
        runner_labels = tuple(str(x) for x in params.get("labels") or ())
        self.model_labels = runner_labels
        if labels is not None:
            try:
                names = load_labels(labels)
            except (OSError, ValueError) as e:
                self.close()
                raise ModelError(f"{one_line(e)} (labels for model {self.path})") from e
            if len(names) != len(runner_labels):
                self.close()
                raise ModelError(
                    f"{labels}: label file has {len(names)} names but model {self.path} "
                    f"reports {len(runner_labels)} labels"
                )
            self.label_source = "file"
        else:
            names = runner_labels
            self.label_source = "hello"
        if not names:
            self.close()
            raise ModelError(f"{self.path}: Edge Impulse model reports no labels")
        self.decoder = "fomo" if self.model_type == FOMO else "edge-impulse"
        self.info = ModelInfo(
            path=str(self.path),
            runtime=self.runtime,
            input_shape=(1, height, width, 1 if self.grayscale else 3),
            input_dtype="uint8",
            output_shapes=(),
            labels=tuple(names),
        )
        n = width * height
        self._features = np.zeros(n, np.float32)
        self._geometry: Geometry | None = None
        self.last_timing: dict = {}

    # -- process management ------------------------------------------------------------

    def _start(self, runner, timeout: float) -> dict:
        """``runner.init()`` with a deadline.

        edge-impulse-linux 1.2.2 waits for the socket in a loop that never ends if the
        executable exits first, and reads the hello without a timeout; run it in a
        thread and, past the deadline, stop the process and break that loop.
        """
        box: dict = {}

        def target() -> None:
            try:
                box["hello"] = runner.init()
            except BaseException as e:
                box["error"] = e

        t = threading.Thread(target=target, name=f"eim-start-{self.path.name}", daemon=True)
        t.start()
        deadline = time.monotonic() + timeout
        while t.is_alive() and time.monotonic() < deadline:
            t.join(0.05)
            proc = runner._runner
            if proc is not None and proc.poll() is not None and t.is_alive():
                code = proc.returncode
                self._abort_start(runner, t)
                raise ModelError(
                    f"{self.path}: .eim process exited with code {code} before answering hello"
                )
        self._proc = runner._runner
        if t.is_alive():
            self._abort_start(runner, t)
            raise ModelError(f"{self.path}: .eim did not answer hello within {timeout:g} s")
        if "error" in box:
            self.close()
            raise ModelError(f"{self.path}: .eim failed to start: {one_line(box['error'])}")
        return box["hello"]

    @staticmethod
    def _abort_start(runner, thread: threading.Thread) -> None:
        proc = runner._runner
        tempdir = runner._tempdir
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
        runner._runner = None  # the wait loop's poll() now raises and ends the thread
        if runner._client is not None:
            runner._client.close()  # a blocked hello recv() returns
        if tempdir and os.path.isdir(tempdir):
            sock = os.path.join(tempdir, "runner.sock")
            if not os.path.exists(sock):
                open(sock, "w").close()  # the wait loop checks for this path first
        thread.join(2)
        runner._client = None
        with contextlib.suppress(Exception):
            runner.stop()

    # -- Detector API ----------------------------------------------------------------------

    def _set_input(self, frame: np.ndarray) -> Geometry:
        key = frame.shape[:2]
        g = self._geometry
        if g is None or g.frame_hw != key:
            h, w = self.input_size
            g = self._geometry = Geometry(key, (w, h), self.resize_mode)
        img = g.to_input(frame)
        rgb = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        self._features = pack_features(rgb, self.grayscale)
        return g

    def _classify(self) -> dict:
        runner = self._runner
        if runner is None:
            raise RuntimeError(f"{self.path}: detector is closed")
        data = self._features if runner._input_shm else self._features.astype(np.int64).tolist()
        resp = runner.classify(data)
        self.last_timing = resp.get("timing", {})
        return resp.get("result") or {}

    def detect(self, frame_bgr: np.ndarray) -> Detections:
        """Detect objects in one BGR frame; boxes in the frame's pixels."""
        frame = check_frame(frame_bgr)
        g = self._set_input(frame)
        result = self._classify()
        boxes, scores, ids = results_to_arrays(
            result, self.model_labels, self.model_type, self.fomo_box
        )
        keep = scores > self.conf_threshold
        boxes, scores, ids = boxes[keep], scores[keep], ids[keep]
        if len(scores) > 1:
            if self.agnostic_nms:
                k = nms(boxes, scores, self.iou_threshold, max_det=self.max_det)
            else:
                k = nms_per_class(boxes, scores, ids, self.iou_threshold, max_det=self.max_det)
            boxes, scores, ids = boxes[k], scores[k], ids[k]
        return Detections(g.to_frame(boxes), scores, ids, names=self.info.labels)

    def invoke_raw(self) -> None:
        """One classify of the features already set (raw model rate incl. the IPC)."""
        self._classify()

    def close(self) -> None:
        """Stop the ``.eim`` process and release its socket and shared memory."""
        runner, self._runner = self._runner, None
        proc = self._proc or (runner._runner if runner is not None else None)
        self._proc = None
        if runner is not None:
            try:
                runner.stop()
            except Exception as e:
                log.debug("%s: stopping the runner: %s", self.path, e)
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except Exception:
                proc.kill()
                proc.wait(timeout=5)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

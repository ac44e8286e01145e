"""ONNX Runtime backend for YOLOv8/YOLO11 detection models.

CPU by default. When the installed ``onnxruntime`` build offers the TensorRT or CUDA
execution providers (``onnxruntime-gpu`` on Jetson or an NVIDIA x86 host) they are
chosen automatically, TensorRT first with FP16 and an engine cache, then CUDA, with
the CPU provider always last as ONNX Runtime's own fallback for unsupported nodes. If
a GPU provider is requested but the session ends up without it (missing CUDA/TensorRT
libraries, a failed engine build), the detector logs why and runs on the CPU.

``onnxruntime`` is imported when a detector is built, never at module import, so the
agent runs on machines that only have another runtime.

Per frame: letterbox into a reused grey canvas, BGR->RGB and 0..255 -> 0..1 written
channel by channel straight into the reused NCHW float input, run, decode the YOLO
head (``decode_yolov8`` detects whether boxes are normalised or in input pixels; the
Ultralytics ONNX exports give pixels).
"""

from __future__ import annotations

import ast
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from ..detections import Detections
from .base import Detector, ModelError, ModelInfo, check_frame, one_line, resolve_labels
from .yolo import (
    LetterboxParams,
    OutputShapeError,
    decode_yolov8,
    letterbox_params,
    unletterbox,
    yolov8_layout,
)

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"

_SHORT_NAMES = {"cpu": CPU, "cuda": CUDA, "tensorrt": TENSORRT, "trt": TENSORRT}

# Symbolic/unknown spatial dims (dynamic-shape exports) default to this input size.
DEFAULT_DYNAMIC_SIZE = 640

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
}


def import_onnxruntime():
    """Return the ``onnxruntime`` module.

    Raises:
        ImportError: with an install hint.
    """
    try:
        import onnxruntime
    except ImportError:
        raise ImportError(
            "ONNX Runtime is not installed (pip install onnxruntime; on Jetson the "
            "onnxruntime-gpu wheel for your JetPack)"
        ) from None
    return onnxruntime


def _provider_names(spec: str | Sequence[str] | None) -> list[str] | None:
    """Normalise a provider spec: None/"auto", a comma list or a sequence of names."""
    if spec is None:
        spec = os.environ.get("FLOWFLEET_ORT_PROVIDERS") or None
    if spec is None:
        return None
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [str(s).strip() for s in items if str(s).strip()]
    if not items or (len(items) == 1 and items[0].lower() == "auto"):
        return None
    return [_SHORT_NAMES.get(s.lower(), s) for s in items]


def choose_providers(
    available: Sequence[str],
    requested: str | Sequence[str] | None = None,
    *,
    trt_fp16: bool = True,
    trt_cache_dir: str | Path | None = None,
    device_id: int = 0,
) -> list[tuple[str, dict]]:
    """Pick execution providers, best first, with their options.

    Args:
        available: ``onnxruntime.get_available_providers()``.
        requested: ``None`` / ``"auto"`` (TensorRT, CUDA when available, then CPU), or
            names in order of preference (``"cpu"``, ``"cuda"``, ``"tensorrt"`` or the
            full ``...ExecutionProvider`` names, comma-separated or a list). Also read
            from ``FLOWFLEET_ORT_PROVIDERS`` when not given.
        trt_fp16: let TensorRT build FP16 engines.
        trt_cache_dir: where TensorRT keeps built engines (building one takes minutes
            on a Jetson; the cache makes later starts fast). Default
            ``$FLOWFLEET_TRT_CACHE`` or ``~/.cache/flowfleet/trt``.
        device_id: GPU index.

    Returns:
        ``[(provider, options), ...]`` always ending with the CPU provider.

    Raises:
        ValueError: a requested provider is not in ``available`` (names both).
    """
    avail = list(available)
    names = _provider_names(requested)
    if names is None:
        names = [p for p in (TENSORRT, CUDA) if p in avail]
    else:
        missing = [n for n in names if n not in avail]
        if missing:
            raise ValueError(
                f"execution provider(s) {', '.join(missing)} not available in this "
                f"onnxruntime build (available: {', '.join(avail)})"
            )
    if CPU not in names:
        names.append(CPU)
    cache = trt_cache_dir or os.environ.get("FLOWFLEET_TRT_CACHE")
    if cache is None:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        cache = str(Path(base) / "flowfleet" / "trt")
    chosen: list[tuple[str, dict]] = []
    for name in names:
        if name == TENSORRT:
            opts = {
                "device_id": device_id,
                "trt_fp16_enable": bool(trt_fp16),
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache),
                "trt_timing_cache_enable": True,
                "trt_timing_cache_path": str(cache),
            }
        elif name == CUDA:
            opts = {"device_id": device_id}
        else:
            opts = {}
        chosen.append((name, opts))
    return chosen


def metadata_labels(meta: dict[str, str]) -> tuple[str, ...] | None:
    """Labels from ONNX metadata ``names`` (a dict or list literal, as Ultralytics
    writes it, or JSON); None when absent or unparsable. Never evaluates code."""
    text = meta.get("names")
    if not text:
        return None
    try:
        names = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        try:
            import json

            names = json.loads(text)
        except ValueError:
            return None
    if isinstance(names, dict) and names:
        try:
            by_id = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError):
            return None
        if min(by_id) < 0:
            return None
        return tuple(by_id.get(i, f"class{i}") for i in range(max(by_id) + 1))
    if isinstance(names, (list, tuple)) and names:
        return tuple(str(n) for n in names)
    return None


class ONNXDetector(Detector):
    """YOLOv8/YOLO11 detector on ONNX Runtime.

    Input: one float (float32/float16) NCHW RGB image tensor, values 0..1; static or
    dynamic spatial size (dynamic defaults to 640x640). Output: one YOLO head
    ``[1, 4+C, N]`` or ``[1, N, 4+C]``. Not thread-safe: one detector per thread.

    Args:
        path: the ``.onnx`` file.
        labels: optional label file; default the model's ``names`` metadata, else
            COCO-80 for 80-class heads, else ``class0..``.
        threads: intra-op CPU threads.
        conf_threshold / iou_threshold / agnostic_nms / max_det: as ``TFLiteDetector``.
        providers: see ``choose_providers`` (default automatic).
        trt_fp16 / trt_cache_dir: TensorRT options (see ``choose_providers``).
        allow_spinning: let idle CPU worker threads spin (lower latency on an
            otherwise idle machine, worse when other threads need the cores).

    Attributes:
        providers: the providers the session actually uses, best first.
        fallback_reason: why a requested GPU provider is not in use, else None.

    Raises:
        ModelError: (one line naming the file) onnxruntime missing, file not loadable,
            unsupported input/output layout, labels that do not fit.
    """

    runtime = "onnx"
    decoder = "yolov8"

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
        providers: str | Sequence[str] | None = None,
        trt_fp16: bool = True,
        trt_cache_dir: str | Path | None = None,
        allow_spinning: bool = False,
    ) -> None:
        self.path = Path(path)
        self.allow_spinning = bool(allow_spinning)
        self._set_decode_options(
            conf_threshold=conf_threshold,
            iou_threshold=iou_threshold,
            agnostic_nms=agnostic_nms,
            max_det=max_det,
            threads=threads,
        )
        self.fallback_reason: str | None = None

        try:
            ort = import_onnxruntime()
        except ImportError as e:
            raise ModelError(f"{self.path}: {e}") from None
        try:
            wanted = choose_providers(
                ort.get_available_providers(),
                providers,
                trt_fp16=trt_fp16,
                trt_cache_dir=trt_cache_dir,
            )
        except ValueError as e:
            raise ModelError(f"{self.path}: {e}") from None
        self._session = self._create_session(ort, wanted)
        self.providers = tuple(self._session.get_providers())
        gpu_wanted = [n for n, _ in wanted if n != CPU]
        if gpu_wanted and not any(p in self.providers for p in gpu_wanted):
            self.fallback_reason = self.fallback_reason or (
                f"onnxruntime did not enable {', '.join(gpu_wanted)} (missing CUDA/TensorRT "
                "libraries?); running on the CPU"
            )
            log.warning("%s: %s", self.path, self.fallback_reason)
        elif gpu_wanted:
            log.info("%s: ONNX Runtime providers %s", self.path, ", ".join(self.providers))

        inputs = self._session.get_inputs()
        outputs = self._session.get_outputs()
        if len(inputs) != 1:
            names = ", ".join(i.name for i in inputs)
            raise ModelError(
                f"{self.path}: model has {len(inputs)} inputs ({names}); only single-image "
                "detectors are supported"
            )
        inp = inputs[0]
        self._in_name = inp.name
        self._in_dtype = np.dtype(_ORT_TYPES.get(inp.type, np.void))
        if self._in_dtype.kind != "f":
            raise ModelError(
                f"{self.path}: input {inp.name!r} has type {inp.type}; only float "
                "(0..1 RGB) image inputs are supported"
            )
        shape = list(inp.shape)
        if len(shape) != 4 or shape[1] not in (3, "3"):
            raise ModelError(
                f"{self.path}: input shape {shape} not supported: expected "
                "[1, 3, height, width] (NCHW RGB)"
            )

        def dim(v) -> int:
            return int(v) if isinstance(v, int) and v > 0 else DEFAULT_DYNAMIC_SIZE

        self.input_size = (dim(shape[2]), dim(shape[3]))  # (height, width)
        in_shape = (1, 3, *self.input_size)
        self._input = np.zeros(in_shape, dtype=self._in_dtype)

        if len(outputs) != 1:
            shapes = [list(o.shape) for o in outputs]
            raise ModelError(
                f"{self.path}: model has {len(outputs)} outputs {shapes}; expected one "
                "YOLOv8/YOLO11 detection head [1, 4+C, N]"
            )
        self._out_name = outputs[0].name
        out_shape = tuple(outputs[0].shape)
        if not all(isinstance(d, int) and d > 0 for d in out_shape):
            # Dynamic output dims: learn the real shape from one run.
            try:
                out_shape = tuple(self._run().shape)
            except Exception as e:
                raise ModelError(
                    f"{self.path}: model failed a test inference: {one_line(e)}"
                ) from e
        out_shape = tuple(int(d) for d in out_shape)
        try:
            _, num_classes, _ = yolov8_layout(out_shape, self.input_size)
        except OutputShapeError as e:
            raise ModelError(f"{self.path}: {e}") from None

        meta = dict(self._session.get_modelmeta().custom_metadata_map)
        names, self.label_source = self._resolve_labels(labels, meta, num_classes)
        self.metadata = meta
        self.info = ModelInfo(
            path=str(self.path),
            runtime=self.runtime,
            input_shape=in_shape,
            input_dtype=self._in_dtype.name,
            output_shapes=(out_shape,),
            labels=names,
        )
        self._plan_key: tuple[int, int] | None = None

    # -- set-up ------------------------------------------------------------------------

    def _create_session(self, ort, wanted: list[tuple[str, dict]]):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only; our own log says what matters
        # Idle intra-op threads sleep instead of spinning: on a 2-4 core device the
        # agent's video reader competes for the same cores (measured on the 2-core dev
        # machine under load: 138-156 ms median per invoke without spinning, 200-209 ms
        # with it).
        opts.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if self.allow_spinning else "0"
        )
        names = [n for n, _ in wanted]
        options = [o for _, o in wanted]
        try:
            return ort.InferenceSession(
                str(self.path), opts, providers=names, provider_options=options
            )
        except Exception as e:
            if names == [CPU]:
                raise ModelError(f"{self.path}: cannot load ONNX model: {one_line(e)}") from e
            self.fallback_reason = (
                f"{', '.join(names[:-1])} failed ({one_line(e)}); running on the CPU"
            )
            log.warning("%s: %s", self.path, self.fallback_reason)
        try:
            return ort.InferenceSession(str(self.path), opts, providers=[CPU])
        except Exception as e:
            raise ModelError(f"{self.path}: cannot load ONNX model: {one_line(e)}") from e

    def _resolve_labels(
        self, labels: str | Path | None, meta: dict[str, str], num_classes: int
    ) -> tuple[tuple[str, ...], str]:
        return resolve_labels(
            self.path,
            labels,
            num_classes,
            embedded=lambda: metadata_labels(meta),
            embedded_source="metadata",
        )

    # -- preprocessing -------------------------------------------------------------------

    def _plan(self, frame_shape: tuple[int, ...]) -> LetterboxParams:
        key = (int(frame_shape[0]), int(frame_shape[1]))
        if key != self._plan_key:
            h, w = self.input_size
            p = letterbox_params(frame_shape, self.input_size)
            self._canvas = np.full((h, w, 3), 114, dtype=np.uint8)
            self._canvas_roi = self._canvas[
                p.pad_y : p.pad_y + p.new_h, p.pad_x : p.pad_x + p.new_w
            ]
            self._params = p
            self._plan_key = key
        return self._params

    def _set_input(self, frame_bgr: np.ndarray) -> LetterboxParams:
        p = self._plan(frame_bgr.shape)
        if (p.new_w, p.new_h) == (frame_bgr.shape[1], frame_bgr.shape[0]):
            self._canvas_roi[...] = frame_bgr
        else:
            cv2.resize(frame_bgr, (p.new_w, p.new_h), dst=self._canvas_roi)
        # BGR (H, W, 3) uint8 -> RGB (3, H, W) float 0..1, one strided pass per channel.
        scale = self._in_dtype.type(1.0 / 255.0)
        for c in range(3):
            np.multiply(self._canvas[..., 2 - c], scale, out=self._input[0, c], casting="unsafe")
        return p

    def _run(self) -> np.ndarray:
        return self._session.run([self._out_name], {self._in_name: self._input})[0]

    # -- Detector API ----------------------------------------------------------------------

    def detect(self, frame_bgr: np.ndarray) -> Detections:
        """Detect objects in one BGR frame; boxes in the frame's pixels, ``names`` = labels."""
        frame = check_frame(frame_bgr)
        p = self._set_input(frame)
        out = self._run()
        dec = decode_yolov8(
            out,
            input_size=self.input_size,
            conf_threshold=self.conf_threshold,
            iou_threshold=self.iou_threshold,
            agnostic=self.agnostic_nms,
            max_det=self.max_det,
        )
        boxes = unletterbox(dec.boxes, p.scale, (p.pad_x, p.pad_y), frame.shape)
        return Detections(boxes, dec.scores, dec.class_ids, names=self.info.labels)

    def invoke_raw(self) -> None:
        """One session run on whatever input is set (raw model rate, no pre/post)."""
        self._run()

    def close(self) -> None:
        self._session = None

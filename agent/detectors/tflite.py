"""TFLite / LiteRT backend for YOLOv8/YOLO11 detection models.

The interpreter comes from ``ai-edge-litert`` (the maintained successor, wheels for
current Pythons) or, failing that, ``tflite-runtime`` (older Raspberry Pi images).
It is imported when a detector is built, never at module import, so the agent runs
on machines that only have another runtime.

Per frame the work is: resize into a reused buffer, one ``cv2.LUT`` pass that maps
0..255 pixels straight to the model's input values (int8 quantised or float 0..1;
the quantisation parameters are fixed, so a 256-entry table replaces float maths
over 640x640x3) and a BGR->RGB swap, written directly into the interpreter's input
tensor (for 1-byte inputs the table runs on the image area only and the letterbox
border is a fill); invoke; decode on the raw output.
"""

from __future__ import annotations

import ast
import json
import zipfile
from pathlib import Path

import cv2
import numpy as np

from ..detections import Detections
from ..labels import load_labels
from .base import Detector, ModelError, ModelInfo, check_frame, one_line
from .base import resolve_labels as base_resolve_labels
from .native_stderr import captured_stderr
from .ssd import (
    decode_ssd,
    find_label_map,
    is_ssd_postprocess,
    pair_state_tensors,
    postprocess_options,
    ssd_output_indices,
)
from .yolo import (
    PAD_VALUE,
    LetterboxParams,
    OutputShapeError,
    decode_yolov8,
    letterbox_params,
    quantize,
    unletterbox,
    yolov8_layout,
)

# Ultralytics TFLite exports append a zip holding their metadata (a dict repr with
# `names`); TFLite Model Maker ones can carry a label file. Bigger members are not ours.
_MAX_METADATA_BYTES = 1 << 20


def import_interpreter():
    """Return ``(Interpreter class, package name)`` from ai-edge-litert or tflite-runtime.

    Raises:
        ImportError: neither runtime is installed.
    """
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "ai-edge-litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter

        return Interpreter, "tflite-runtime"
    except ImportError:
        raise ImportError(
            "no TFLite runtime installed (pip install ai-edge-litert, or tflite-runtime "
            "on older Raspberry Pi OS)"
        ) from None


def embedded_labels(path: str | Path) -> tuple[str, ...] | None:
    """Labels stored inside a TFLite file, or None.

    Reads Ultralytics metadata (``names`` in a JSON or Python-dict text member of the
    zip appended to the flatbuffer) or a label text member (``*label*.txt``). Any
    problem reading optional metadata yields None rather than an error.
    """
    try:
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as zf:
            members = [i for i in zf.infolist() if 0 < i.file_size <= _MAX_METADATA_BYTES]
            for info in members:
                name = info.filename.lower()
                if not name.endswith((".txt", ".json", ".yaml")) or "label" in name:
                    continue
                text = zf.read(info).decode("utf-8", errors="replace")
                meta = None
                for parse in (json.loads, ast.literal_eval):
                    try:
                        meta = parse(text)
                        break
                    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                        continue
                names = meta.get("names") if isinstance(meta, dict) else None
                if isinstance(names, dict) and names:
                    by_id = {int(k): str(v) for k, v in names.items()}
                    return tuple(by_id.get(i, f"class{i}") for i in range(max(by_id) + 1))
                if isinstance(names, list) and names:
                    return tuple(str(n) for n in names)
            for info in members:
                name = info.filename.lower()
                if "label" in name and name.endswith(".txt"):
                    lines = zf.read(info).decode("utf-8", errors="replace").splitlines()
                    labels = tuple(ln.strip() for ln in lines if ln.strip())
                    if labels:
                        return labels
    except (OSError, zipfile.BadZipFile, ValueError, KeyError, EOFError):
        return None
    return None


def resolve_labels(
    model_path: str | Path, labels: str | Path | None, num_classes: int
) -> tuple[tuple[str, ...], str]:
    """Labels for a TFLite model: a label file, else the labels embedded in the file
    (Ultralytics metadata), else COCO-80 / generic (see `base.resolve_labels`)."""
    return base_resolve_labels(
        model_path, labels, num_classes, embedded=lambda: embedded_labels(model_path)
    )


class TFLiteDetector(Detector):
    """YOLOv8/YOLO11 detector on the TFLite (LiteRT) interpreter.

    Handles full-integer models (int8/uint8 input and output, quantised with the
    tensors' own scale and zero point) and float-I/O models (float32 input 0..1,
    e.g. dynamic-range quantised weights). Not thread-safe: one detector per thread.

    Args:
        path: the ``.tflite`` file.
        labels: optional label file (see ``resolve_labels`` for the fallbacks).
        threads: interpreter CPU threads.
        conf_threshold: minimum class score kept.
        iou_threshold: NMS IoU threshold.
        agnostic_nms: suppress overlapping boxes across classes (one box per object).
        max_det: maximum detections per frame.

    Raises:
        ModelError: (one line naming the file) the file cannot be loaded, has an
            input/output layout no decoder here handles, or labels do not fit.
    """

    runtime = "tflite"
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
    ) -> None:
        self.path = Path(path)
        self._set_decode_options(
            conf_threshold=conf_threshold,
            iou_threshold=iou_threshold,
            agnostic_nms=agnostic_nms,
            max_det=max_det,
            threads=threads,
        )

        try:
            interpreter_cls, self.runtime_package = import_interpreter()
        except ImportError as e:
            raise ModelError(f"{self.path}: {e}") from None
        try:
            # LiteRT prints "Created TensorFlow Lite XNNPACK delegate" from C++ here.
            with captured_stderr():
                interp = interpreter_cls(model_path=str(self.path), num_threads=self.threads)
                interp.allocate_tensors()
        # The runtimes raise ValueError for bad flatbuffers and RuntimeError for ops
        # or tensors they cannot prepare; re-word both as one line with the file name.
        except (ValueError, RuntimeError, OSError) as e:
            raise ModelError(f"{self.path}: cannot load TFLite model: {one_line(e)}") from e
        self._interp = interp

        inputs = interp.get_input_details()
        outputs = interp.get_output_details()
        out_shapes = tuple(tuple(int(d) for d in o["shape"]) for o in outputs)
        self._letterbox = True
        self._state_pairs: list[tuple[int, int, np.ndarray]] = []
        if is_ssd_postprocess(outputs):
            self._init_ssd(inputs, outputs, labels)
            return
        if len(inputs) != 1:
            names = ", ".join(d["name"] for d in inputs)
            raise ModelError(
                f"{self.path}: model has {len(inputs)} inputs ({names}); only single-image "
                "detectors are supported"
            )
        inp = inputs[0]
        in_shape = tuple(int(d) for d in inp["shape"])
        if len(in_shape) != 4 or in_shape[0] != 1 or in_shape[3] != 3:
            raise ModelError(
                f"{self.path}: input shape {list(in_shape)} not supported: expected "
                "[1, height, width, 3] (NHWC RGB)"
            )
        self.input_size = (in_shape[1], in_shape[2])  # (height, width)
        self._in_dtype = np.dtype(inp["dtype"])
        in_scale, in_zp = inp["quantization"]
        self.input_quantization = (float(in_scale), int(in_zp)) if in_scale else None
        try:
            self._lut = self._build_lut(self._in_dtype, self.input_quantization)
        except ValueError as e:
            raise ModelError(f"{self.path}: {e}") from None
        self._in_index = inp["index"]

        if len(outputs) != 1:
            raise ModelError(
                f"{self.path}: model has {len(outputs)} outputs {[list(s) for s in out_shapes]}; "
                "expected one YOLOv8/YOLO11 detection head [1, 4+C, N]"
            )
        out = outputs[0]
        try:
            _, num_classes, _ = yolov8_layout(out_shapes[0], self.input_size)
        except OutputShapeError as e:
            raise ModelError(f"{self.path}: {e}") from None
        self._out_index = out["index"]
        out_scale, out_zp = out["quantization"]
        self.output_quantization = (float(out_scale), int(out_zp)) if out_scale else None

        names, self.label_source = resolve_labels(self.path, labels, num_classes)
        self.info = ModelInfo(
            path=str(self.path),
            runtime=self.runtime,
            input_shape=in_shape,
            input_dtype=self._in_dtype.name,
            output_shapes=out_shapes,
            labels=names,
        )
        self._input_tensor = interp.tensor(self._in_index)
        self._plan_key: tuple[int, int] | None = None

    def _init_ssd(self, inputs: list[dict], outputs: list[dict], labels) -> None:
        """Set up an SSD model ending in ``TFLite_Detection_PostProcess``.

        The image input is the one ``[1, H, W, 3]`` tensor; any other inputs must be
        recurrent state (LSTM ``c``/``h``) that a state output feeds on the next frame.
        """
        self.decoder = "ssd"
        self._letterbox = False  # TF Object Detection models are trained on squashed frames
        images = [
            d
            for d in inputs
            if len(d["shape"]) == 4 and int(d["shape"][0]) == 1 and int(d["shape"][3]) == 3
        ]
        if len(images) != 1:
            shapes = [f"{d['name']} {list(d['shape'])}" for d in inputs]
            raise ModelError(
                f"{self.path}: cannot tell the image input among {shapes}: expected one "
                "[1, height, width, 3] (NHWC RGB) tensor"
            )
        inp = images[0]
        try:
            idx = ssd_output_indices(outputs)
            state_in = [d for d in inputs if d is not inp]
            state_out = [o for i, o in enumerate(outputs) if i not in idx]
            pairs = pair_state_tensors(state_in, state_out)
        except OutputShapeError as e:
            raise ModelError(f"{self.path}: {e}") from None
        self._ssd = idx
        self._out_indices = [o["index"] for o in outputs]
        for d_in, d_out in pairs:
            zero = np.zeros(tuple(int(x) for x in d_in["shape"]), dtype=d_in["dtype"])
            scale, zp = d_in["quantization"]
            if scale:
                zero[...] = zp  # the quantised encoding of 0.0
            same_q = tuple(d_in["quantization"]) == tuple(d_out["quantization"])
            self._state_pairs.append((d_in["index"], d_out["index"], zero))
            if not same_q:
                raise ModelError(
                    f"{self.path}: state output {d_out['name']} and input {d_in['name']} "
                    "use different quantisation; feeding it back is not supported"
                )
        self.state_names = tuple((a["name"], b["name"]) for a, b in pairs)

        in_shape = tuple(int(d) for d in inp["shape"])
        self.input_size = (in_shape[1], in_shape[2])
        self._in_dtype = np.dtype(inp["dtype"])
        in_scale, in_zp = inp["quantization"]
        self.input_quantization = (float(in_scale), int(in_zp)) if in_scale else None
        self._lut = self._ssd_lut(self._in_dtype)
        self._in_index = inp["index"]
        self.output_quantization = None

        self.postprocess_options = postprocess_options(self.path) or {}
        num_classes = self.postprocess_options.get("num_classes")
        names, self.label_source = self._ssd_labels(labels, num_classes)
        self.num_classes = len(names)
        self.info = ModelInfo(
            path=str(self.path),
            runtime=self.runtime,
            input_shape=in_shape,
            input_dtype=self._in_dtype.name,
            output_shapes=tuple(tuple(int(d) for d in o["shape"]) for o in outputs),
            labels=names,
        )
        self._input_tensor = self._interp.tensor(self._in_index)
        self._plan_key = None
        self.reset_state()

    @staticmethod
    def _ssd_lut(dtype: np.dtype) -> np.ndarray:
        """SSD inputs take the pixel itself: uint8 0..255 (the input quantisation,
        typically scale 1/128 zero point 128, is the model's own -1..1 normalisation),
        int8 pixel-128, float (pixel-127.5)/127.5."""
        px = np.arange(256)
        if dtype == np.uint8:
            return px.astype(np.uint8)
        if dtype == np.int8:
            return (px - 128).astype(np.int8)
        return ((px - 127.5) / 127.5).astype(np.float32)

    def _ssd_labels(self, labels, num_classes: int | None) -> tuple[tuple[str, ...], str]:
        if labels is None:
            embedded = embedded_labels(self.path)
            if embedded is not None and (num_classes is None or len(embedded) >= num_classes):
                return embedded, "embedded"
            found = find_label_map(self.path)
            if found is not None:
                try:
                    names = load_labels(found)
                except (OSError, ValueError):
                    names = ()
                if names and (num_classes is None or len(names) == num_classes):
                    return names, f"beside model ({found.name})"
            if num_classes is None:
                raise ModelError(
                    f"{self.path}: SSD model without readable num_classes or labels; give a "
                    "label file (labels=...)"
                )
            return tuple(f"class{i}" for i in range(int(num_classes))), "generic"
        try:
            names = load_labels(labels)
        except OSError as e:
            raise ModelError(
                f"{labels}: cannot read label file for model {self.path}: "
                f"{e.strerror or one_line(e)}"
            ) from e
        except ValueError as e:
            raise ModelError(f"{one_line(e)} (labels for model {self.path})") from e
        if num_classes is not None and len(names) != int(num_classes):
            raise ModelError(
                f"{labels}: label file has {len(names)} names but model {self.path} "
                f"outputs {num_classes} classes"
            )
        return names, "file"

    def reset_state(self) -> None:
        """Zero the recurrent state (start of a new stream); no-op for stateless models."""
        for in_index, _, zero in self._state_pairs:
            self._interp.set_tensor(in_index, zero)

    # -- preprocessing -------------------------------------------------------------

    @staticmethod
    def _build_lut(dtype: np.dtype, quant: tuple[float, int] | None) -> np.ndarray:
        """256-entry table: uint8 pixel value -> model input value."""
        unit = np.arange(256, dtype=np.float64) / 255.0
        if np.issubdtype(dtype, np.integer):
            if quant is not None:
                return quantize(unit, quant[0], quant[1], dtype)
            if dtype == np.uint8:
                return np.arange(256, dtype=np.uint8)  # raw 0..255 pixels
            raise ValueError(f"unquantised {dtype} input is not supported")
        # cv2.LUT has no float16 table; build float32 and cast on copy.
        return unit.astype(np.float32)

    def _plan(self, frame_shape: tuple[int, ...]) -> LetterboxParams:
        """Letterbox geometry and buffers for this frame size (rebuilt only on change)."""
        key = (int(frame_shape[0]), int(frame_shape[1]))
        if key != self._plan_key:
            h, w = self.input_size
            if self._letterbox:
                p = letterbox_params(frame_shape, self.input_size)
            else:  # squash: the whole input is the image
                p = LetterboxParams(w, h, 1.0, 0, 0)
            # The grey border is painted once; each frame only overwrites the image area.
            self._canvas = np.full((h, w, 3), 114, dtype=np.uint8)
            self._canvas_roi = self._canvas[
                p.pad_y : p.pad_y + p.new_h, p.pad_x : p.pad_x + p.new_w
            ]
            self._resized = np.empty((p.new_h, p.new_w, 3), dtype=np.uint8)
            self._mapped = np.empty((p.new_h, p.new_w, 3), dtype=np.uint8)
            self._params = p
            self._plan_key = key
        return self._params

    def _set_input(self, frame_bgr: np.ndarray) -> LetterboxParams:
        p = self._plan(frame_bgr.shape)
        if (p.new_w, p.new_h) == (frame_bgr.shape[1], frame_bgr.shape[0]):
            src = frame_bgr
        else:
            src = cv2.resize(frame_bgr, (p.new_w, p.new_h), dst=self._resized)
        # Write straight into the interpreter's input buffer; the view must be dropped
        # before invoke() (the runtime refuses to run while numpy holds its memory).
        view = self._input_tensor()[0]
        if self._lut.itemsize == 1:
            self._set_input_bytes(src, view, p)
            del view
            return p
        cv2.cvtColor(src, cv2.COLOR_BGR2RGB, dst=self._canvas_roi)
        if view.dtype == self._lut.dtype:
            res = cv2.LUT(self._canvas, self._lut, dst=view)
            if res.ctypes.data != view.ctypes.data:  # OpenCV reallocated: copy over
                np.copyto(view, res)
        else:
            np.copyto(view, cv2.LUT(self._canvas, self._lut), casting="unsafe")
        del view
        return p

    def _set_input_bytes(self, src: np.ndarray, view: np.ndarray, p: LetterboxParams) -> None:
        """int8/uint8 input: map only the image area, then swap channels into place.

        The table maps each byte on its own, so it commutes with the BGR->RGB swap;
        running it on the resized image (not the whole canvas) skips the border, which
        is one constant (the table's value for the grey) filled in as a memset.
        """
        out = view.view(np.uint8)
        lut = self._lut.view(np.uint8)
        cv2.LUT(src, lut, dst=self._mapped)
        x0, y0, x1, y1 = p.pad_x, p.pad_y, p.pad_x + p.new_w, p.pad_y + p.new_h
        roi = out[y0:y1, x0:x1]
        res = cv2.cvtColor(self._mapped, cv2.COLOR_BGR2RGB, dst=roi)
        if res.ctypes.data != roi.ctypes.data:  # OpenCV reallocated: copy over
            np.copyto(roi, res)
        grey = lut[PAD_VALUE]
        out[:y0] = grey
        out[y1:] = grey
        out[y0:y1, :x0] = grey
        out[y0:y1, x1:] = grey

    _check_frame = staticmethod(check_frame)

    # -- Detector API ------------------------------------------------------------------

    def detect(self, frame_bgr: np.ndarray) -> Detections:
        """Detect objects in one BGR frame; boxes in the frame's pixels, ``names`` = labels."""
        frame = self._check_frame(frame_bgr)
        p = self._set_input(frame)
        self._interp.invoke()
        if self.decoder == "ssd":
            return self._decode_ssd(frame)
        out = self._interp.get_tensor(self._out_index)
        dec = decode_yolov8(
            out,
            input_size=self.input_size,
            conf_threshold=self.conf_threshold,
            iou_threshold=self.iou_threshold,
            quantization=self.output_quantization,
            agnostic=self.agnostic_nms,
            max_det=self.max_det,
        )
        boxes = unletterbox(dec.boxes, p.scale, (p.pad_x, p.pad_y), frame.shape)
        return Detections(boxes, dec.scores, dec.class_ids, names=self.info.labels)

    def _decode_ssd(self, frame: np.ndarray) -> Detections:
        get = self._interp.get_tensor
        idx = self._ssd
        outs = self._out_indices
        dec = decode_ssd(
            get(outs[idx.boxes]),
            get(outs[idx.classes]),
            get(outs[idx.scores]),
            get(outs[idx.count]),
            size=(frame.shape[0], frame.shape[1]),
            conf_threshold=self.conf_threshold,
            num_classes=self.num_classes,
        )
        # Recurrent models: this frame's state is the next frame's input.
        for in_index, out_index, _ in self._state_pairs:
            self._interp.set_tensor(in_index, get(out_index))
        n = min(len(dec.scores), self.max_det)
        return Detections(dec.boxes[:n], dec.scores[:n], dec.class_ids[:n], names=self.info.labels)

    def invoke_raw(self) -> None:
        """One ``invoke()`` on whatever input is set (raw model rate, no pre/post)."""
        self._interp.invoke()

    def close(self) -> None:
        """Drop the interpreter; the detector cannot be used afterwards."""
        self._input_tensor = None  # type: ignore[assignment]
        self._interp = None  # type: ignore[assignment]

"""SSD-style detectors whose graph ends in ``TFLite_Detection_PostProcess``.

That custom op already decodes anchors and runs NMS; it emits four tensors:

* boxes ``[1, N, 4]``: ``ymin, xmin, ymax, xmax`` normalised to 0..1 of the input;
* classes ``[1, N]``: 0-based class index (float), label-map id minus its first id;
* scores ``[1, N]``: 0..1;
* count ``[1]``: how many of the N rows are valid.

Everything here is plain numpy so it is testable without a model; the TFLite backend
calls it. Recurrent models (Google's AutoML Video on-device traffic detector) also have
LSTM state inputs/outputs; ``pair_state_tensors`` matches each state output to the
input it must be fed back into on the next frame.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .yolo import Decoded, OutputShapeError

POSTPROCESS_OP = "TFLite_Detection_PostProcess"


class SSDOutputs(NamedTuple):
    """Positions (in the interpreter's output list) of the four post-process tensors."""

    boxes: int
    classes: int
    scores: int
    count: int


def is_ssd_postprocess(outputs: Sequence[dict]) -> bool:
    """True when the model's outputs include a ``TFLite_Detection_PostProcess`` op."""
    return any(POSTPROCESS_OP in str(o.get("name", "")) for o in outputs)


def ssd_output_indices(outputs: Sequence[dict]) -> SSDOutputs:
    """Find boxes / classes / scores / count among a model's output details.

    Uses the op's tensor names (``X``, ``X:1``, ``X:2``, ``X:3`` are boxes, classes,
    scores, count in the TF1 exporter's order) and checks the shapes; falls back to
    shapes alone (``[1,N,4]`` boxes, ``[1]`` count, then classes before scores).

    Raises:
        OutputShapeError: the four tensors cannot be identified.
    """
    post = [(i, o) for i, o in enumerate(outputs) if POSTPROCESS_OP in str(o.get("name", ""))]
    shapes = {i: tuple(int(d) for d in o["shape"]) for i, o in post}

    def suffix(o: dict) -> int:
        m = re.search(r":(\d+)$", str(o["name"]))
        return int(m.group(1)) if m else 0

    by_suffix = {suffix(o): i for i, o in post}
    if len(post) == 4 and set(by_suffix) == {0, 1, 2, 3}:
        idx = SSDOutputs(by_suffix[0], by_suffix[1], by_suffix[2], by_suffix[3])
        if _shapes_ok(shapes, idx):
            return idx
    boxes = [i for i, s in shapes.items() if len(s) == 3 and s[-1] == 4]
    count = [i for i, s in shapes.items() if s in ((1,), ())]
    pairs = [i for i, s in shapes.items() if len(s) == 2]
    if len(boxes) == 1 and len(count) == 1 and len(pairs) == 2:
        idx = SSDOutputs(boxes[0], pairs[0], pairs[1], count[0])
        if _shapes_ok(shapes, idx):
            return idx
    raise OutputShapeError(
        f"unsupported {POSTPROCESS_OP} outputs "
        f"{[list(shapes[i]) for i, _ in post]}: expected boxes [1, N, 4], classes [1, N], "
        "scores [1, N], count [1]"
    )


def _shapes_ok(shapes: dict[int, tuple[int, ...]], idx: SSDOutputs) -> bool:
    b, c, s, n = (shapes[i] for i in idx)
    return len(b) == 3 and b[-1] == 4 and c == b[:2] and s == b[:2] and (n == (1,) or n == ())


def decode_ssd(
    boxes: np.ndarray,
    classes: np.ndarray,
    scores: np.ndarray,
    count: np.ndarray | int | None,
    *,
    size: tuple[int, int],
    conf_threshold: float = 0.25,
    num_classes: int | None = None,
) -> Decoded:
    """Turn ``TFLite_Detection_PostProcess`` tensors into pixel boxes.

    Args:
        boxes: ``[1, N, 4]`` (batch optional) ``ymin, xmin, ymax, xmax`` in 0..1.
        classes: ``[1, N]`` class indices (float or int).
        scores: ``[1, N]``.
        count: valid rows (``[1]`` tensor or int); None means all N.
        size: ``(height, width)`` the normalised boxes are scaled to (the frame's own
            size when the image was resized without letterboxing).
        conf_threshold: keep rows whose score is above this.
        num_classes: when given, rows with a class index outside ``0..num_classes-1``
            are dropped (padding rows some exporters leave behind).

    Returns:
        ``Decoded(boxes xyxy in pixels of size, scores, class_ids)`` by descending score.
    """
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    c = np.asarray(classes).reshape(-1)
    s = np.asarray(scores, dtype=np.float32).reshape(-1)
    n = len(s)
    if count is not None:
        n = max(0, min(n, int(np.asarray(count).reshape(-1)[0]) if np.size(count) else 0))
    b, c, s = b[:n], c[:n], s[:n]
    cls = np.rint(c).astype(np.int32)
    keep = s > conf_threshold
    if num_classes is not None:
        keep &= (cls >= 0) & (cls < num_classes)
    b, cls, s = b[keep], cls[keep], s[keep]
    h, w = size
    yx = np.clip(b, 0.0, 1.0)
    xyxy = np.stack([yx[:, 1] * w, yx[:, 0] * h, yx[:, 3] * w, yx[:, 2] * h], axis=1)
    order = np.argsort(-s, kind="stable")
    return Decoded(xyxy[order].astype(np.float32), s[order], cls[order])


def _base_name(name: str) -> str:
    """``raw_inputs/init_lstm_c`` and ``raw_outputs/lstm_c`` -> ``lstm_c``."""
    last = re.split(r"[/:]", name.rstrip("/"))[-1] if name else ""
    if ":" in name and re.fullmatch(r"\d+", last):
        last = name.split(":")[0].split("/")[-1]
    for prefix in ("init_", "initial_", "input_", "in_", "prev_", "previous_"):
        if last.startswith(prefix):
            last = last[len(prefix) :]
    for suffix in ("_in", "_input", "_out", "_output", "_state"):
        if last.endswith(suffix):
            last = last[: -len(suffix)]
    return last


def pair_state_tensors(
    state_inputs: Sequence[dict], state_outputs: Sequence[dict]
) -> list[tuple[dict, dict]]:
    """Match recurrent state outputs to the inputs they feed on the next frame.

    By name first (``raw_outputs/lstm_c`` -> ``raw_inputs/init_lstm_c``), then by a
    shape that only one remaining input and one remaining output have.

    Returns:
        ``[(input_detail, output_detail), ...]``, one per state input.

    Raises:
        OutputShapeError: a state input has no unambiguous partner.
    """
    ins = list(state_inputs)
    outs = list(state_outputs)
    pairs: list[tuple[dict, dict]] = []
    for inp in list(ins):
        shape = tuple(int(d) for d in inp["shape"])
        same = [
            o
            for o in outs
            if _base_name(o["name"]) == _base_name(inp["name"])
            and tuple(int(d) for d in o["shape"]) == shape
        ]
        if len(same) == 1:
            pairs.append((inp, same[0]))
            ins.remove(inp)
            outs.remove(same[0])
    for inp in list(ins):
        shape = tuple(int(d) for d in inp["shape"])
        in_same = [i for i in ins if tuple(int(d) for d in i["shape"]) == shape]
        out_same = [o for o in outs if tuple(int(d) for d in o["shape"]) == shape]
        if len(in_same) == 1 and len(out_same) == 1:
            pairs.append((inp, out_same[0]))
            ins.remove(inp)
            outs.remove(out_same[0])
    if ins:
        names = ", ".join(f"{i['name']} {list(i['shape'])}" for i in ins)
        raise OutputShapeError(
            f"extra input(s) {names} have no matching state output to feed back "
            f"(outputs left: {[o['name'] for o in outs]})"
        )
    return pairs


def postprocess_options(model_path: str | Path) -> dict | None:
    """The ``TFLite_Detection_PostProcess`` op's options (num_classes, max_detections,
    ...) read from the model file, or None when they cannot be read.

    Uses the TFLite schema bundled with ai-edge-litert and ``flatbuffers``' flexbuffer
    reader; without them, a small scan of the file for the options' flexbuffer.
    """
    try:
        data = Path(model_path).read_bytes()
    except OSError:
        return None
    try:
        import flatbuffers.flexbuffers as flexbuffers
    except ImportError:
        return None
    try:
        from ai_edge_litert import schema_py_generated as schema

        model = schema.Model.GetRootAs(data, 0)
        codes = [model.OperatorCodes(i) for i in range(model.OperatorCodesLength())]
        for si in range(model.SubgraphsLength()):
            graph = model.Subgraphs(si)
            for oi in range(graph.OperatorsLength()):
                op = graph.Operators(oi)
                code = codes[op.OpcodeIndex()].CustomCode()
                if code and code.decode(errors="replace") == POSTPROCESS_OP:
                    opts = flexbuffers.Loads(op.CustomOptionsAsNumpy().tobytes())
                    return dict(opts) if isinstance(opts, dict) else None
    except Exception:
        pass
    # Fallback: the options are a flexbuffer map stored as a length-prefixed byte
    # vector that contains the key "num_classes"; try the length prefixes before it.
    key = data.find(b"num_classes\x00")
    while key >= 0:
        for start in range(key - (key % 4), max(-1, key - 2048), -4):
            (length,) = struct.unpack_from("<I", data, start)
            end = start + 4 + length
            if key < end <= len(data) and length < 4096:
                try:
                    opts = flexbuffers.Loads(data[start + 4 : end])
                except Exception:
                    continue
                if isinstance(opts, dict) and "num_classes" in opts:
                    return dict(opts)
        key = data.find(b"num_classes\x00", key + 1)
    return None


def find_label_map(model_path: str | Path) -> Path | None:
    """A label file shipped beside the model, by naming convention, or None.

    Tried in order, for ``dir/<stem>.tflite``: ``<stem>.pbtxt``,
    ``<stem>_label_map.pbtxt``, ``<stem>_labels.txt``, ``<stem>.labels``, then the
    same with the stem shortened one ``_word`` at a time (``automl_traffic_lstm`` ->
    ``automl_traffic_label_map.pbtxt``), stopping at a one-word stem.
    """
    p = Path(model_path)
    parts = p.stem.split("_")
    for n in range(len(parts), 0, -1):
        stem = "_".join(parts[:n])
        if n < len(parts) and n < 2:
            break
        for name in (
            f"{stem}.pbtxt",
            f"{stem}_label_map.pbtxt",
            f"{stem}_labels.txt",
            f"{stem}.labels",
        ):
            cand = p.with_name(name)
            if cand.is_file():
                return cand
    return None

"""Label vocabularies and the filter that keeps only the classes a deployment counts.

A detector reports ``class_id`` values indexing its model's own label list (80 COCO
names for the stock YOLOv8 exports, three vehicle types for the AutoML traffic
model, ...). What gets tracked and counted is a deployment choice, expressed as a
*spec*: the default flow classes, ``"all"``, or an explicit list of names. The
``ClassFilter`` resolves a spec against one model's labels once, at load time, so a
typo in a config file fails before the first frame instead of silently counting
nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from .detections import Detections

COCO_80: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
)  # fmt: skip
"""The 80 COCO detection classes in the order YOLOv8/YOLO11 heads emit them."""

FLOW_CLASSES: tuple[str, ...] = ("person", "bicycle", "car", "motorcycle", "bus", "truck")
"""The classes flowfleet counts by default."""

ClassSpec = None | str | Iterable[str]

# "0 person", "0: person", "0  person" (Coral / some Model Maker label files).
_INDEXED_LINE = re.compile(r"^\s*(\d+)\s*[:\s]\s*(\S.*?)\s*$")
_PBTXT_ITEM = re.compile(r"item\s*\{(.*?)\}", re.S)
_PBTXT_FIELD = re.compile(
    r"""\b(id|name|display_name)\s*:\s*(?:"((?:[^"\\]|\\.)*)"|'([^']*)'|(-?\d+))"""
)


def load_labels(path: str | Path) -> tuple[str, ...]:
    """Read a label list, index ``i`` being the name of class id ``i``.

    Accepted formats:

    * plain text, one name per line (blank lines ignored);
    * indexed text, every line ``<id> <name>`` or ``<id>: <name>``;
    * a TensorFlow ``.pbtxt`` label map (``item { id: 1 name: "car" }``), where
      ``display_name`` wins over ``name`` (``name`` is often a machine id such as
      ``/m/01g317``) and ids are shifted so the smallest becomes index 0, because
      detection post-processing ops report 0-based classes for 1-based maps.

    Gaps in indexed formats are filled with ``class<i>``.

    Raises:
        FileNotFoundError / OSError: the file cannot be read.
        ValueError: the file holds no labels or is malformed (message names the file).
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".pbtxt" or _PBTXT_ITEM.search(text):
        labels = _parse_pbtxt(text, path)
    else:
        lines = [ln.strip() for ln in text.splitlines()]
        lines = [ln for ln in lines if ln]
        matches = [_INDEXED_LINE.match(ln) for ln in lines]
        if lines and all(matches):
            labels = _from_indexed({int(m.group(1)): m.group(2) for m in matches}, path)
        else:
            labels = tuple(lines)
    if not labels:
        raise ValueError(f"{path}: label file holds no labels")
    return labels


def _parse_pbtxt(text: str, path: Path) -> tuple[str, ...]:
    entries: list[tuple[int | None, str]] = []
    for block in _PBTXT_ITEM.findall(text):
        fields: dict[str, str] = {}
        for key, dq, sq, num in _PBTXT_FIELD.findall(block):
            fields[key] = dq or sq or num
        name = fields.get("display_name") or fields.get("name")
        if not name:
            raise ValueError(f"{path}: label map item without name/display_name: {block.strip()!r}")
        ident = fields.get("id")
        entries.append((int(ident) if ident is not None else None, name))
    if not entries:
        return ()
    if all(i is None for i, _ in entries):
        return tuple(n for _, n in entries)
    if any(i is None for i, _ in entries):
        raise ValueError(f"{path}: label map mixes items with and without id")
    base = min(i for i, _ in entries)  # type: ignore[type-var]
    return _from_indexed({i - base: n for i, n in entries}, path)  # type: ignore[operator]


def _from_indexed(by_id: dict[int, str], path: Path) -> tuple[str, ...]:
    if not by_id:
        return ()
    if min(by_id) < 0:
        raise ValueError(f"{path}: negative label id {min(by_id)}")
    return tuple(by_id.get(i, f"class{i}") for i in range(max(by_id) + 1))


def _norm(name: str) -> str:
    return " ".join(name.strip().lower().split())


class ClassFilter:
    """Keep only the detections of selected classes.

    Args:
        spec: ``None`` (default) selects the flow classes present in the model
            (``FLOW_CLASSES``); ``"all"`` every model label; a list of names (or a
            comma-separated string) exactly those. Names match case-insensitively.
        labels: the model's label vocabulary (``Detector.labels``).

    Raises:
        ValueError: a requested name is not a model label (the message names it and
            lists the valid ones), nothing is selected, or the default spec finds
            none of the flow classes in this model.

    Attributes:
        labels: the model vocabulary the filter was resolved against.
        names: the selected label names, in model order.
        class_ids: the selected class ids, ascending.
        mask: boolean lookup table, ``mask[class_id]`` is True for kept classes.
    """

    def __init__(self, spec: ClassSpec = None, labels: Sequence[str] = COCO_80) -> None:
        self.labels = tuple(labels)
        index: dict[str, int] = {}
        for i, label in enumerate(self.labels):
            index.setdefault(_norm(label), i)  # first wins if a model repeats a name
        self.spec = spec

        if spec is None:
            ids = [index[_norm(n)] for n in FLOW_CLASSES if _norm(n) in index]
            if not ids:
                raise ValueError(
                    "model labels contain none of the default flow classes "
                    f"({', '.join(FLOW_CLASSES)}); choose classes explicitly or 'all'. "
                    f"Model labels: {', '.join(self.labels)}"
                )
        elif isinstance(spec, str) and _norm(spec) == "all":
            ids = list(range(len(self.labels)))
        else:
            wanted = spec.split(",") if isinstance(spec, str) else list(spec)
            wanted = [w for w in (str(x).strip() for x in wanted) if w]
            if not wanted:
                raise ValueError("class filter selects no classes (give names or 'all')")
            ids = []
            for name in wanted:
                i = index.get(_norm(name))
                if i is None:
                    raise ValueError(
                        f"unknown class {name!r}; valid classes: {', '.join(self.labels)}"
                    )
                ids.append(i)

        self.mask = np.zeros(len(self.labels), dtype=bool)
        self.mask[ids] = True
        self.mask.flags.writeable = False
        self.class_ids = np.flatnonzero(self.mask).astype(np.int32)
        self.names = tuple(self.labels[i] for i in self.class_ids)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and _norm(name) in {_norm(n) for n in self.names}

    def __repr__(self) -> str:
        return f"ClassFilter({list(self.names)!r})"

    def keep_mask(self, class_id: np.ndarray) -> np.ndarray:
        """Boolean row mask for an array of class ids (ids outside the vocabulary: False)."""
        ids = np.asarray(class_id)
        n = len(self.mask)
        if ids.size == 0:
            return np.zeros(ids.shape, dtype=bool)
        if ids.min() >= 0 and ids.max() < n:
            return self.mask[ids]  # the common case: one gather, no Python loop
        ok = (ids >= 0) & (ids < n)
        out = np.zeros(ids.shape, dtype=bool)
        out[ok] = self.mask[ids[ok]]
        return out

    def apply(self, dets: Detections) -> Detections:
        """Return a new ``Detections`` holding only the selected classes.

        Raises:
            ValueError: ``dets`` carries a different, non-empty label vocabulary
                (class ids would mean other classes).
        """
        if dets.names and dets.names is not self.labels and tuple(dets.names) != self.labels:
            raise ValueError(
                "detections use a different label vocabulary than this ClassFilter was "
                "built for; build the filter from the detector's labels"
            )
        return dets[self.keep_mask(dets.class_id)]

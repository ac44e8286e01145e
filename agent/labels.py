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


# -- label maps: model vocabularies -> flow classes ------------------------------------

FLOW_SYNONYMS: dict[str, str] = {
    # Google AutoML Video on-device traffic model (automl_traffic_label_map.pbtxt).
    "sedan": "car",
    "pickup_suv_van": "car",
    "large_veh_bus": "bus",
    # Common names in other detection vocabularies (VOC, custom traffic models).
    "pedestrian": "person",
    "people": "person",
    "bike": "bicycle",
    "cyclist": "bicycle",
    "motorbike": "motorcycle",
    "suv": "car",
    "van": "car",
    "pickup": "car",
    "lorry": "truck",
}
"""The built-in label map (``label_map="flow"``): other models' labels -> flow classes."""

LabelMapSpec = None | str | Path | dict


def load_label_map(spec: LabelMapSpec) -> dict[str, str] | None:
    """Resolve a label-map spec to ``{model label: target name}``.

    ``None`` -> None (no mapping); ``"flow"`` -> ``FLOW_SYNONYMS``; a dict as is; a
    path to a text file with one ``model label = target`` (or ``:``, ``->``) per line,
    ``#`` comments allowed, or a TOML file with a ``[labels]`` table.

    Raises:
        ValueError: malformed file (names the file and the line).
        OSError: unreadable file.
    """
    if spec is None:
        return None
    if isinstance(spec, dict):
        return {str(k): str(v) for k, v in spec.items()}
    if isinstance(spec, str) and spec.strip().lower() == "flow":
        return dict(FLOW_SYNONYMS)
    path = Path(spec)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: {e}") from None
        table = data.get("labels", data)
        if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
            raise ValueError(f"{path}: expected a [labels] table of 'model label = \"target\"'")
        return {str(k): v for k, v in table.items()}
    out: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.match(r"^(.+?)\s*(?:->|=|:)\s*(.+)$", line)
        if not m:
            raise ValueError(f"{path}:{n}: expected 'model label = target', got {raw.strip()!r}")
        out[m.group(1).strip().strip("\"'")] = m.group(2).strip().strip("\"'")
    if not out:
        raise ValueError(f"{path}: label map holds no entries")
    return out


class LabelMap:
    """Re-index detections from a model's labels into another vocabulary.

    Labels named in ``mapping`` (case-insensitive) become their target; others keep
    their own name. The new vocabulary lists each name once, in the order it first
    appears when walking the model's labels, so ``sedan, pickup_suv_van,
    large_veh_bus`` becomes ``car, bus``.

    Attributes:
        source_labels: the model's labels.
        labels: the mapped vocabulary.
        lut: ``lut[model class id]`` -> mapped class id.
        merges: True when two or more model labels share one target.
    """

    def __init__(self, mapping: dict[str, str], labels: Sequence[str]) -> None:
        self.source_labels = tuple(labels)
        norm = {_norm(k): v.strip() for k, v in mapping.items()}
        targets: list[str] = []
        index: dict[str, int] = {}
        lut = []
        for label in self.source_labels:
            target = norm.get(_norm(label), label)
            key = _norm(target)
            if key not in index:
                index[key] = len(targets)
                targets.append(target)
            lut.append(index[key])
        self.labels = tuple(targets)
        self.lut = np.asarray(lut, dtype=np.int32)
        self.merges = len(self.labels) < len(self.source_labels)

    @property
    def identity(self) -> bool:
        return self.labels == self.source_labels

    def __repr__(self) -> str:
        pairs = [
            f"{a}->{self.labels[i]}" for a, i in zip(self.source_labels, self.lut, strict=True)
        ]
        return f"LabelMap({', '.join(pairs)})"

    def apply(self, dets: Detections) -> Detections:
        """A new ``Detections`` with class ids and ``names`` in the mapped vocabulary."""
        ids = np.asarray(dets.class_id)
        ok = (ids >= 0) & (ids < len(self.lut))
        mapped = np.where(ok, self.lut[np.clip(ids, 0, max(len(self.lut) - 1, 0))], -1)
        return Detections(dets.xyxy, dets.confidence, mapped, dets.tracker_id, self.labels)


def auto_label_map(labels: Sequence[str]) -> LabelMap | None:
    """The built-in flow map, when a model's labels need it, else None.

    Applied only when the model names none of the flow classes itself but some of its
    labels are known synonyms (the AutoML traffic model's ``sedan`` etc.); COCO models
    and models that already speak the flow vocabulary are left untouched.
    """
    names = {_norm(n) for n in labels}
    if names & {_norm(n) for n in FLOW_CLASSES}:
        return None
    if not names & {_norm(k) for k in FLOW_SYNONYMS}:
        return None
    return LabelMap(FLOW_SYNONYMS, labels)

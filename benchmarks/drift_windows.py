"""Real drift windows: the agent's own detector and `DriftWindow` over the sample videos.

Used by the drift calibration (`bench_drift.py calibrate`) and by the drift tests'
session fixture. Two steps, so one detector pass serves many window sizes:

1. `detect_frames` runs the real detector (as the agent loads it) over a video and
   keeps, per frame, the detections, the measured inference time and the image
   figures computed by the agent's own ``image_figures`` on the real frame;
2. `make_windows` replays those frames through the agent's `DriftWindow` (the code
   that builds the summaries a device sends) and closes a window every
   ``window_frames`` frames: short windows, so a short video gives many.

Model variants, all built honestly from the real file:

* ``good``: the model as the agent loads it;
* ``broken_scaling``: the same model fed with broken input scaling: the table that
  maps a pixel to the model's input value is built for pixels ``gain`` times too
  large (a wrong ``/255`` normalisation), so the input is saturated.

Frame transforms: ``none``, ``dark`` (every frame multiplied by 0.35: dusk or a
dirty lens), ``night`` (x0.12: dark enough that the detector's own output moves);
applied to whichever model runs.
"""

from __future__ import annotations

import pickle
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from flowfleet.agent import drift as agent_drift
from flowfleet.agent.detections import Detections
from flowfleet.agent.detectors import load_detector
from flowfleet.agent.detectors.yolo import quantize
from flowfleet.contract import DriftSummary

DARK_FACTOR = 0.35
NIGHT_FACTOR = 0.12  # darker still: the detector's output itself moves
BROKEN_GAIN = 4.0  # input values four times what the model was trained on
TRANSFORMS = ("none", "dark", "night")
T0 = 1_780_000_000.0  # windows are stamped from here on (video time)


@dataclass(frozen=True)
class Frame:
    """One analysed frame: what the detector returned and the image figures."""

    dets: Detections
    seconds: float  # measured inference time
    figures: tuple[float, float]  # agent's image_figures: brightness, blur
    shape: tuple[int, int]  # height, width
    t: float  # video time, seconds


def variant_name(variant: str) -> tuple[str, float | None]:
    """("good", None) or ("broken_scaling", gain) from "good" / "broken_scaling[:gain]"."""
    if variant == "good":
        return variant, None
    kind, _, gain = variant.partition(":")
    if kind != "broken_scaling":
        raise ValueError(f"unknown model variant {variant!r}: good or broken_scaling[:gain]")
    return kind, float(gain) if gain else BROKEN_GAIN


def _inner(detector):
    """The TFLite detector under a label-mapping wrapper, if any."""
    for attr in ("inner", "_inner", "detector"):
        inner = getattr(detector, attr, None)
        if inner is not None and hasattr(inner, "_lut"):
            return inner
    return detector


def load_variant(model: Path, variant: str = "good", threads: int = 2):
    """The real detector for ``model``, with ``variant``'s change applied."""
    kind, gain = variant_name(variant)
    det = load_detector(model, threads=threads, warmup=1)
    if kind == "broken_scaling":
        inner = _inner(det)
        if not hasattr(inner, "_lut"):
            raise ValueError(f"{model}: broken_scaling needs a TFLite YOLO model")
        unit = np.arange(256, dtype=np.float64) / 255.0 * gain
        if inner.input_quantization is not None:
            inner._lut = quantize(unit, *inner.input_quantization, inner._lut.dtype)
        else:
            inner._lut = unit.astype(np.float32)
    return det


def read_frames(video: Path, transform: str = "none", *, step: int = 1, limit: int | None = None):
    """(video time, frame) for every ``step``-th frame of ``video``, transformed."""
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown frame transform {transform!r}; one of {', '.join(TRANSFORMS)}")
    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise FileNotFoundError(f"cannot open video {video}")
    fps = cap.get(cv2.CAP_PROP_FPS) or 10.0
    i = n = 0
    try:
        while limit is None or n < limit:
            ok, frame = cap.read()
            if not ok:
                break
            if i % step == 0:
                if transform in ("dark", "night"):
                    factor = DARK_FACTOR if transform == "dark" else NIGHT_FACTOR
                    frame = cv2.convertScaleAbs(frame, alpha=factor)
                yield i / fps, frame
                n += 1
            i += 1
    finally:
        cap.release()


def detect_frames(
    model: Path,
    video: Path,
    *,
    variant: str = "good",
    transform: str = "none",
    step: int = 1,
    limit: int | None = None,
    cache: Path | None = None,
) -> list[Frame]:
    """Run ``model`` (``variant``) over ``video`` (``transform``); cached in ``cache``."""
    key = f"{model.stem}-{variant.replace(':', '_')}-{video.stem}-{transform}-s{step}-l{limit}"
    path = None if cache is None else cache / f"{key}.pkl"
    if path is not None and path.exists():
        with path.open("rb") as f:
            return _Unpickler(f).load()
    det = load_variant(model, variant)
    out = []
    for t, frame in read_frames(video, transform, step=step, limit=limit):
        began = time.perf_counter()
        dets = det.detect(frame)
        seconds = time.perf_counter() - began
        out.append(
            Frame(dets, seconds, agent_drift.image_figures(frame), frame.shape[:2], round(t, 3))
        )
    det.close()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(out))
    return out


class _Unpickler(pickle.Unpickler):
    """Reads caches written when this module ran as ``__main__``."""

    def find_class(self, module, name):
        if module == "__main__" and name == "Frame":
            return Frame
        return super().find_class(module, name)


@contextmanager
def _replayed_figures(frames_by_id: dict[int, Frame]):
    """Make the agent's `DriftWindow` take each frame's recorded image figures.

    `DriftWindow.add` needs the image only for its figures (computed on the real
    frame when it was analysed) and its size; the replay passes a zero-strided
    stand-in of the right size and looks the figures up by that stand-in.
    """
    real = agent_drift.image_figures
    agent_drift.image_figures = lambda image: frames_by_id[id(image)].figures
    try:
        yield
    finally:
        agent_drift.image_figures = real


def make_windows(
    frames: list[Frame],
    model_name: str,
    *,
    window_frames: int = 20,
    count: int | None = None,
    stride: int | None = None,
    camera: str = "cam",
    device: str = "dev",
    t0: float = T0,
) -> list[DriftSummary]:
    """Windows of ``window_frames`` consecutive frames through the agent's `DriftWindow`.

    Window i starts at frame ``i * stride`` (default: ``window_frames``, disjoint
    windows); with ``count`` beyond what the frames hold, the video is looped
    (frame indices wrap around). Window times advance one window length each.
    """
    stride = stride or window_frames
    if count is None:
        count = max(0, (len(frames) - window_frames) // stride + 1)
    stand_ins = {}
    out: list[DriftSummary] = []
    step_s = (frames[1].t - frames[0].t) if len(frames) > 1 else 0.1
    span = window_frames * step_s
    for i in range(count):
        start = t0 + i * span
        window = agent_drift.DriftWindow(camera, model_name, start)
        chosen = [frames[(i * stride + j) % len(frames)] for j in range(window_frames)]
        by_id = {}
        for f in chosen:
            image = stand_ins.get(f.shape)
            if image is None:
                image = stand_ins[f.shape] = np.broadcast_to(np.uint8(0), (*f.shape, 3))
            by_id[id(image)] = f
            with _replayed_figures(by_id):
                window.add(f.dets, image, f.seconds)
        out.append(window.take(device, start + span).model_copy(update={"seq": i + 1}))
    return out


# (variant, transform, every n-th frame): the unchanged model on every frame (the
# false-alarm measurement needs many windows); the rest on every 3rd frame.
CALIBRATION_RUNS = (
    ("good", "none", 1),
    ("broken_scaling:4", "none", 3),
    ("good", "dark", 3),
    ("broken_scaling:4", "dark", 3),
    ("broken_scaling:8", "none", 3),
)


def main() -> None:
    """Fill the per-frame cache for the calibration (every video, every run)."""
    import argparse

    from flowfleet.data import data_dir

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--cache", type=Path, default=Path("benchmarks/results/drift-frames"))
    args = ap.parse_args()
    data = data_dir()
    model = data / "models" / "yolov8n_full_integer_quant.tflite"
    for variant, transform, step in CALIBRATION_RUNS:
        for video in sorted((data / "videos").iterdir()):
            began = time.time()
            frames = detect_frames(
                model, video, variant=variant, transform=transform, step=step, cache=args.cache
            )
            print(
                f"{video.name} {variant} {transform}: {len(frames)} frames, "
                f"{time.time() - began:.0f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()

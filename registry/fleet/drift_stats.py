"""Drift statistics: one window of a camera's new model against its previous model's
baseline, with thresholds sized to the sample (pure numpy, no database).

The inputs are drift summaries (`flowfleet.contract.DriftSummary`): fixed-bin
confidence histograms, class mix, detections per frame, latency percentiles, image
brightness and blur. The statistics:

* ``psi``: population stability index of the confidence histograms;
* ``ks``: Kolmogorov-Smirnov distance between the two binned confidence CDFs;
* ``js``: Jensen-Shannon divergence of the class mix (nats; the mixture weighted by
  each side's detections, so ``2 N js`` is the G statistic of the 2 x K table);
* ``dpf_change``: relative change in detections per frame (judged as
  ``dpf_log_ratio``, the log of new over expected detections);
* ``latency_p50_ratio`` / ``latency_p90_ratio``: new over baseline;
* ``confidence_variance``: of the window's confidences (from the histogram);
* ``brightness_shift`` (relative) and ``blur_ratio``: the environment's change.

Why thresholds depend on the sample: under "nothing changed" PSI is about
``(1/n1 + 1/n2) chi2(B-1)``, KS about ``sqrt((n1+n2)/(n1 n2))`` and ``2 N js``
about ``chi2(K-1)``, so a fixed threshold alarms on every small window and misses
real change in large ones. Detections are not independent draws (the same people
in consecutive frames, the scene changing between windows), so each variance is
inflated by a dispersion factor calibrated on real windows of an unchanged model
(docs/drift.md). A window with too few detections (or frames) is not judged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from statistics import NormalDist

import numpy as np

VERDICTS = ("ok", "not_judged", "breach", "model_drift", "environment")
POLICIES = ("distribution", "latency", "confidence_variance", "agreement")
DEFAULT_POLICIES = ("distribution", "latency", "confidence_variance", "agreement")
BIN_MIDS = (np.arange(10) + 0.5) / 10.0  # contract CONFIDENCE_EDGES: 10 bins over [0, 1]
_SMOOTH = 0.5  # pseudo-count per bin, so an empty bin never gives log(0)


@dataclass(frozen=True)
class WindowStats:
    """What the statistics need from one window, or from several pooled."""

    frames: int
    detections: int
    confidence_hist: tuple[int, ...]
    class_mix: Mapping[str, int]
    latency_p50: float | None = None
    latency_p90: float | None = None
    brightness: float | None = None
    blur: float | None = None

    @classmethod
    def from_summary(cls, s: Mapping | object) -> WindowStats:
        """From a `DriftSummary` or its dict (the stored payload)."""
        get = s.get if isinstance(s, Mapping) else lambda k, d=None: getattr(s, k, d)
        return cls(
            frames=int(get("frames")),
            detections=int(get("detections")),
            confidence_hist=tuple(int(v) for v in get("confidence_hist")),
            class_mix=dict(get("class_mix") or {}),
            latency_p50=get("latency_ms_p50"),
            latency_p90=get("latency_ms_p90"),
            brightness=get("brightness"),
            blur=get("blur"),
        )

    @classmethod
    def pool(cls, windows: Iterable[WindowStats]) -> WindowStats:
        """The baseline: histograms and counts summed; latency as the median of the
        windows' percentiles; brightness and blur as frame-weighted means."""
        ws = list(windows)
        if not ws:
            raise ValueError("a baseline needs at least one window")
        mix: dict[str, int] = {}
        for w in ws:
            for k, v in w.class_mix.items():
                mix[k] = mix.get(k, 0) + int(v)

        def median(name):
            vals = [getattr(w, name) for w in ws if getattr(w, name) is not None]
            return float(np.median(vals)) if vals else None

        def weighted(name):
            pairs = [(getattr(w, name), w.frames) for w in ws if getattr(w, name) is not None]
            total = sum(f for _, f in pairs)
            return sum(v * f for v, f in pairs) / total if total else None

        return cls(
            frames=sum(w.frames for w in ws),
            detections=sum(w.detections for w in ws),
            confidence_hist=tuple(int(v) for v in np.sum([w.confidence_hist for w in ws], 0)),
            class_mix=mix,
            latency_p50=median("latency_p50"),
            latency_p90=median("latency_p90"),
            brightness=weighted("brightness"),
            blur=weighted("blur"),
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "class_mix": dict(self.class_mix)}


@dataclass(frozen=True)
class Settings:
    """Thresholds and their sample sizing (config section ``[drift]``)."""

    min_detections: int = 50  # fewer in the window (or baseline): not judged
    min_frames: int = 10
    alpha: float = 0.001  # per statistic and window, before the dispersion factors
    # Variance inflation per statistic over independent draws (correlated detections,
    # the scene's own change), calibrated on real windows of an unchanged model.
    dispersion_psi: float = 5.2
    dispersion_ks: float = 4.0
    dispersion_js: float = 8.0
    dispersion_dpf: float = 4.0
    dpf_floor: float = 1.0  # relative change in detections per frame always tolerated
    latency_ratio_max: float = 2.0
    confidence_variance_max: float = 0.15
    agreement_min: float = 0.7
    brightness_shift_max: float = 0.25  # relative; beyond: the environment changed
    blur_ratio_max: float = 2.0  # either way
    k: int = 3
    n: int = 4
    policies: tuple[str, ...] = DEFAULT_POLICIES


def chi2_quantile(p: float, dof: int) -> float:
    """Upper quantile of chi-square (Wilson-Hilferty; within 1% for dof >= 1 at p < 0.05)."""
    z = NormalDist().inv_cdf(1.0 - p)
    k = max(1, dof)
    return k * (1.0 - 2.0 / (9 * k) + z * math.sqrt(2.0 / (9 * k))) ** 3


def _probs(counts: np.ndarray) -> np.ndarray:
    c = counts.astype(np.float64) + _SMOOTH
    return c / c.sum()


def psi(base: Iterable[int], new: Iterable[int]) -> float:
    """Population stability index between two histograms (smoothed)."""
    p, q = _probs(np.asarray(base)), _probs(np.asarray(new))
    return float(np.sum((q - p) * np.log(q / p)))


def ks_binned(base: Iterable[int], new: Iterable[int]) -> float:
    """Largest gap between the two histograms' cumulative distributions."""
    a, b = np.asarray(base, np.float64), np.asarray(new, np.float64)
    if a.sum() <= 0 or b.sum() <= 0:
        return 0.0
    return float(np.max(np.abs(np.cumsum(a) / a.sum() - np.cumsum(b) / b.sum())))


def js_weighted(base: Mapping[str, int], new: Mapping[str, int]) -> tuple[float, int]:
    """(Jensen-Shannon divergence in nats with the detection-weighted mixture, classes)."""
    keys = sorted(set(base) | set(new))
    if len(keys) < 2:
        return 0.0, len(keys)
    a = np.array([base.get(k, 0) for k in keys], np.float64)
    b = np.array([new.get(k, 0) for k in keys], np.float64)
    n1, n2 = a.sum(), b.sum()
    if n1 <= 0 or n2 <= 0:
        return 0.0, len(keys)

    def entropy(c):
        p = c[c > 0] / c.sum()
        return float(-np.sum(p * np.log(p)))

    js = entropy(a + b) - (n1 * entropy(a) + n2 * entropy(b)) / (n1 + n2)
    return float(max(0.0, js)), len(keys)


def confidence_variance(hist: Iterable[int]) -> float | None:
    h = np.asarray(hist, np.float64)
    if h.sum() <= 0:
        return None
    mean = float(np.sum(h * BIN_MIDS) / h.sum())
    return float(np.sum(h * (BIN_MIDS - mean) ** 2) / h.sum())


@dataclass
class Judgement:
    """One window judged: statistics, the thresholds they met, what broke, the verdict."""

    verdict: str
    statistics: dict = field(default_factory=dict)
    thresholds: dict = field(default_factory=dict)
    breaches: list[str] = field(default_factory=list)
    not_judged: list[str] = field(default_factory=list)  # statistics without enough data
    environment: list[str] = field(default_factory=list)  # what changed in the scene
    reason: str = ""


def _ratio(new: float | None, base: float | None) -> float | None:
    return None if new is None or base is None or base <= 0 else new / base


def compare(
    base: WindowStats,
    new: WindowStats,
    settings: Settings = Settings(),
    *,
    agreement: float | None = None,
    previous_model: WindowStats | None = None,
) -> Judgement:
    """Judge ``new`` (a window of the new model) against ``base`` (the previous model's
    pooled baseline on the same camera).

    ``agreement``: share of the new model's boxes the previous model matched on the
    same frames (the shadow comparison); None when there is none (the agreement
    policy is then not judged). ``previous_model``: the previous model's window over
    the same frames (shadow); when it shows the same breach, the change is the
    scene's, not the model's: environment.
    """
    s = settings
    stats: dict = {"frames": new.frames, "detections": new.detections}
    thr: dict = {}
    breaches: list[str] = []
    missing: list[str] = []
    n1, n2 = base.detections, new.detections
    expected = base.detections / base.frames * new.frames if base.frames else 0.0
    if new.frames < s.min_frames or base.detections < s.min_detections:
        why = (
            f"window has {new.frames} frames (min {s.min_frames})"
            if new.frames < s.min_frames
            else f"baseline has {base.detections} detections (min {s.min_detections})"
        )
        return Judgement("not_judged", stats, thr, reason=why)
    if n2 < s.min_detections and expected < s.min_detections:
        return Judgement(
            "not_judged",
            stats,
            thr,
            reason=f"window has {n2} detections and the baseline rate expects "
            f"{expected:.0f} (min {s.min_detections})",
        )
    if "distribution" in s.policies:
        # Detections per frame, judged on frames (the count itself is the signal) as
        # a log ratio, so fewer and more detections weigh alike; Poisson noise of
        # both counts (delta method: var log n ~ 1/n), inflated, plus a floor for
        # the scene's own change in how many objects there are.
        dpf_base = base.detections / base.frames
        dpf_new = new.detections / new.frames
        log_ratio = math.log((new.detections + 0.5) / (expected + 0.5))
        z = NormalDist().inv_cdf(1.0 - s.alpha / 2)
        noise = z * math.sqrt(s.dispersion_dpf * (1.0 / max(n1, 1) + 1.0 / max(expected, 1.0)))
        stats["dpf_change"] = round(dpf_new / dpf_base - 1.0, 4) if dpf_base > 0 else None
        stats["dpf_log_ratio"] = round(log_ratio, 4)
        thr["dpf_log_ratio"] = round(math.log1p(s.dpf_floor) + noise, 4)
        if abs(log_ratio) > thr["dpf_log_ratio"]:
            breaches.append("dpf_log_ratio")
        if n2 >= s.min_detections:
            scale = 1.0 / n1 + 1.0 / n2
            bins = len(base.confidence_hist)
            stats["psi"] = round(psi(base.confidence_hist, new.confidence_hist), 5)
            thr["psi"] = round(s.dispersion_psi * scale * chi2_quantile(s.alpha, bins - 1), 5)
            stats["ks"] = round(ks_binned(base.confidence_hist, new.confidence_hist), 5)
            c_alpha = math.sqrt(-math.log(s.alpha / 2) / 2)
            thr["ks"] = round(c_alpha * math.sqrt(s.dispersion_ks * scale), 5)
            js, classes = js_weighted(base.class_mix, new.class_mix)
            stats["js"] = round(js, 5)
            thr["js"] = round(
                s.dispersion_js * chi2_quantile(s.alpha, classes - 1) / (2 * (n1 + n2)), 5
            )
            breaches += [k for k in ("psi", "ks", "js") if stats[k] > thr[k]]
        else:
            missing += ["psi", "ks", "js"]
    if "latency" in s.policies:
        for q in ("p50", "p90"):
            r = _ratio(getattr(new, f"latency_{q}"), getattr(base, f"latency_{q}"))
            key = f"latency_{q}_ratio"
            if r is None:
                missing.append(key)
                continue
            stats[key], thr[key] = round(r, 4), s.latency_ratio_max
            if r > s.latency_ratio_max:
                breaches.append(key)
    if "confidence_variance" in s.policies:
        var = confidence_variance(new.confidence_hist) if n2 >= s.min_detections else None
        if var is None:
            missing.append("confidence_variance")
        else:
            stats["confidence_variance"] = round(var, 5)
            thr["confidence_variance"] = s.confidence_variance_max
            if var > s.confidence_variance_max:
                breaches.append("confidence_variance")
    if "agreement" in s.policies:
        if agreement is None:
            missing.append("agreement")  # needs the shadow comparison's data
        else:
            stats["agreement"], thr["agreement"] = round(agreement, 4), s.agreement_min
            if agreement < s.agreement_min:
                breaches.append("agreement")
    environment = _environment(base, new, s, stats, thr)
    if not breaches and not environment:
        return Judgement("ok", stats, thr, breaches, missing, environment)
    if breaches and previous_model is not None:
        shadow = compare(base, previous_model, s)
        if set(breaches) & set(shadow.breaches):
            environment.append("previous_model_same_change")
    if environment:  # the scene changed (with or without a breach): not the model's doing
        why = "the scene changed: " + ", ".join(environment)
        return Judgement("environment", stats, thr, breaches, missing, environment, why)
    return Judgement("breach", stats, thr, breaches, missing, environment, ", ".join(breaches))


def _environment(base, new, s: Settings, stats: dict, thr: dict) -> list[str]:
    """The scene's own changes (brightness, blur) beyond their thresholds."""
    out = []
    if new.brightness is not None and base.brightness is not None:
        shift = (new.brightness - base.brightness) / max(base.brightness, 1.0)
        stats["brightness_shift"] = round(shift, 4)
        thr["brightness_shift"] = s.brightness_shift_max
        if abs(shift) > s.brightness_shift_max:
            out.append("brightness")
    r = _ratio(new.blur, base.blur)
    if r is not None and r > 0:
        stats["blur_ratio"] = round(r, 4)
        thr["blur_ratio"] = s.blur_ratio_max
        if max(r, 1.0 / r) > s.blur_ratio_max:
            out.append("blur")
    return out


def confirmed(recent: Iterable[bool], k: int, n: int) -> bool:
    """k of the last n judged windows breached (``recent`` oldest first)."""
    last = list(recent)[-n:]
    return sum(bool(x) for x in last) >= k

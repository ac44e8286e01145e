"""Drift statistics (`flowfleet.registry.fleet.drift_stats`): table-driven checks of
each statistic, thresholds that follow the sample size, not-judged windows, the
environment rule, the shadow hook and k-of-n confirmation."""

from __future__ import annotations

import math

import pytest

from flowfleet.registry.fleet.drift_stats import (
    Settings,
    WindowStats,
    chi2_quantile,
    compare,
    confidence_variance,
    confirmed,
    js_weighted,
    ks_binned,
    psi,
)

from .factories import drift_stats_window as window

FLAT = (10,) * 10
HIGH = (0, 0, 0, 0, 0, 10, 20, 40, 20, 10)
LOW = (10, 40, 30, 10, 5, 5, 0, 0, 0, 0)


@pytest.mark.parametrize(
    ("a", "b", "low", "high"),
    [
        (FLAT, FLAT, 0.0, 1e-12),
        (HIGH, HIGH, 0.0, 1e-12),
        (HIGH, LOW, 2.0, 20.0),  # mass moved from high to low confidence
        (FLAT, HIGH, 0.3, 5.0),
    ],
)
def test_psi(a, b, low, high):
    assert low <= psi(a, b) <= high
    assert psi(a, b) == pytest.approx(psi(b, a))  # symmetric


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (FLAT, FLAT, 0.0),
        ((10, 0, 0, 0, 0, 0, 0, 0, 0, 0), (0,) * 9 + (10,), 1.0),
        ((5, 5) + (0,) * 8, (0, 10) + (0,) * 8, 0.5),
        ((0,) * 10, FLAT, 0.0),  # an empty histogram has no distribution to compare
    ],
)
def test_ks_binned(a, b, expected):
    assert ks_binned(a, b) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("a", "b", "low", "high", "classes"),
    [
        ({"person": 10}, {"person": 99}, 0.0, 0.0, 1),
        ({"person": 50, "car": 50}, {"person": 5, "car": 5}, 0.0, 1e-12, 2),
        ({"person": 100}, {"car": 100}, math.log(2) - 1e-9, math.log(2) + 1e-9, 2),
        ({"person": 90, "car": 10}, {"person": 10, "car": 90}, 0.1, 0.5, 2),
    ],
)
def test_js_weighted(a, b, low, high, classes):
    js, k = js_weighted(a, b)
    assert low <= js <= high
    assert k == classes


@pytest.mark.parametrize(
    ("hist", "expected"),
    [
        ((0,) * 10, None),
        ((0,) * 9 + (7,), 0.0),
        ((5,) + (0,) * 8 + (5,), 0.2025),  # half at 0.05, half at 0.95
    ],
)
def test_confidence_variance(hist, expected):
    got = confidence_variance(hist)
    assert got == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize(
    ("p", "dof", "exact"), [(0.001, 9, 27.877), (0.01, 1, 6.635), (0.05, 30, 43.773)]
)
def test_chi2_quantile_close_to_tables(p, dof, exact):
    assert chi2_quantile(p, dof) == pytest.approx(exact, rel=0.03)


def test_thresholds_shrink_with_the_sample():
    """The same relative shift: the threshold of a 10x larger window is smaller, so
    what is noise in a small window is a breach in a large one."""
    base = window(detections=2000, frames=200, hist=HIGH)
    small = compare(base, window(detections=60, frames=6 * 2, hist=HIGH), Settings(min_frames=1))
    large = compare(base, window(detections=600, frames=60, hist=HIGH), Settings(min_frames=1))
    for key in ("psi", "ks", "js", "dpf_log_ratio"):
        assert large.thresholds[key] < small.thresholds[key], key


@pytest.mark.parametrize(
    ("new", "verdict", "breaches"),
    [
        # same distribution, same rate: ok
        (dict(detections=200, frames=20, hist=HIGH), "ok", []),
        # confidence mass moved low, class mix changed
        (
            dict(detections=200, frames=20, hist=LOW, mix={"person": 100, "bird": 100}),
            "breach",
            ["psi", "ks", "js"],
        ),
        # far fewer detections than the baseline rate expects: judged on the rate alone
        (dict(detections=5, frames=20, hist=HIGH), "breach", ["dpf_log_ratio"]),
        # too few frames
        (dict(detections=200, frames=3, hist=HIGH), "not_judged", []),
        # a quiet window where the baseline rate also expects few detections
        (dict(detections=10, frames=1 * 10, hist=HIGH, base_dpf=1.0), "not_judged", []),
        # slower
        (dict(detections=200, frames=20, hist=HIGH, latency=50.0), "breach", ["latency_p50_ratio"]),
        # the scene went dark and the distribution moved: environment
        (
            dict(detections=200, frames=20, hist=LOW, brightness=30.0),
            "environment",
            ["psi", "ks"],
        ),
        # blur collapsed (dirty lens)
        (dict(detections=200, frames=20, hist=LOW, blur=100.0), "environment", ["psi", "ks"]),
    ],
)
def test_compare_verdicts(new, verdict, breaches):
    base_dpf = new.pop("base_dpf", 10.0)
    base = window(detections=int(base_dpf * 200), frames=200, hist=HIGH)
    j = compare(base, window(**new))
    assert j.verdict == verdict, j
    assert set(breaches) <= set(j.breaches), j
    if verdict == "not_judged":
        assert j.reason and not j.breaches
    else:
        assert "agreement" in j.not_judged  # no shadow data: that policy is not judged


def test_agreement_policy_and_previous_model_hook():
    base = window(detections=2000, frames=200, hist=HIGH)
    same = window(detections=200, frames=20, hist=HIGH)
    assert compare(base, same, agreement=0.5).breaches == ["agreement"]
    assert compare(base, same, agreement=0.9).verdict == "ok"
    moved = window(detections=200, frames=20, hist=LOW)
    assert compare(base, moved).verdict == "breach"
    # The previous model, beside the new one on the same frames, moved the same way.
    j = compare(base, moved, previous_model=window(detections=200, frames=20, hist=LOW))
    assert j.verdict == "environment"
    assert "previous_model_same_change" in j.environment
    # ... and when it did not, the change is the new model's.
    assert compare(base, moved, previous_model=same).verdict == "breach"


@pytest.mark.parametrize(
    ("policies", "expected"),
    [
        (("distribution",), "ok"),
        (("latency",), "breach"),
        (("confidence_variance",), "ok"),
    ],
)
def test_policies_select_what_can_breach(policies, expected):
    base = window(detections=2000, frames=200, hist=HIGH)
    slow = window(detections=200, frames=20, hist=HIGH, latency=100.0)
    assert compare(base, slow, Settings(policies=policies)).verdict == expected


def test_confidence_variance_policy():
    base = window(detections=2000, frames=200, hist=HIGH)
    split = window(detections=200, frames=20, hist=(50, 0, 0, 0, 0, 0, 0, 0, 0, 50))
    j = compare(base, split, Settings(policies=("confidence_variance",)))
    assert j.breaches == ["confidence_variance"]
    assert j.statistics["confidence_variance"] > 0.15


@pytest.mark.parametrize(
    ("flags", "k", "n", "expected"),
    [
        ("bbb", 3, 4, True),
        ("bobb", 3, 4, True),
        ("bobob", 3, 4, False),
        ("bbob" + "oooo", 3, 4, False),  # old breaches age out
        ("b", 1, 1, True),
        ("", 1, 1, False),
    ],
)
def test_k_of_n(flags, k, n, expected):
    assert confirmed((c == "b" for c in flags), k, n) is expected


def test_pool_sums_counts_and_takes_medians():
    a = window(detections=100, frames=10, hist=HIGH, latency=10.0, brightness=100.0)
    b = window(detections=300, frames=30, hist=LOW, latency=30.0, brightness=140.0)
    p = WindowStats.pool([a, b])
    assert (p.detections, p.frames) == (400, 40)
    assert p.confidence_hist == tuple(
        x + y for x, y in zip(a.confidence_hist, b.confidence_hist, strict=True)
    )
    assert p.latency_p50 == 20.0
    assert p.brightness == pytest.approx(130.0)  # frame-weighted
    with pytest.raises(ValueError, match="at least one window"):
        WindowStats.pool([])

"""medchain.stats: intervals against scipy's own tests, and the three verdicts of each rule."""
import math

import numpy as np
import pytest
from scipy import stats as sps

from medchain import stats

GAPS = [-0.015, -0.013, -0.060, -0.035, -0.090]   # quick claim 1, seeds 0–4, another machine


def test_t_interval_matches_scipy_ttest():
    lo, hi = stats.t_interval(GAPS, 0.95)
    ref = sps.ttest_1samp(GAPS, 0.0).confidence_interval(0.95)
    assert lo == pytest.approx(ref.low, abs=1e-12)
    assert hi == pytest.approx(ref.high, abs=1e-12)


def test_one_sided_bound_is_scipy_one_sided_lower_bound():
    d = stats.non_inferiority(GAPS, 0.02)
    ref = sps.ttest_1samp(GAPS, -0.02, alternative="greater").confidence_interval(0.95)
    assert d.bound == pytest.approx(ref.low, abs=1e-12)
    assert math.isinf(ref.high)


def test_bootstrap_interval_matches_scipy_bootstrap_and_brackets_the_mean():
    lo, hi = stats.bootstrap_interval(GAPS, seed=3)
    ref = sps.bootstrap((np.asarray(GAPS),), np.mean, confidence_level=0.95, n_resamples=9999,
                        method="percentile", random_state=np.random.default_rng(3)).confidence_interval
    assert (lo, hi) == pytest.approx((ref.low, ref.high), abs=1e-12)
    assert lo < np.mean(GAPS) < hi


def test_quick_claim1_gaps_are_inconclusive_not_a_failure_or_a_pass():
    d = stats.non_inferiority(GAPS, 0.02, a="collaborative", b="centralized")
    assert d.verdict == "inconclusive" and d.holds is None
    assert "interval too wide" in d.reason and "n = 5" in d.reason


def test_non_inferiority_holds_fails_and_better_is_not_a_failure():
    rng = np.random.default_rng(0)
    close = -0.005 + 0.002 * rng.standard_normal(8)
    assert stats.non_inferiority(close, 0.02).verdict == "holds"
    assert stats.non_inferiority(close, 0.02).equivalence is True
    worse = -0.08 + 0.005 * rng.standard_normal(8)
    assert stats.non_inferiority(worse, 0.02).verdict == "fails"
    better = 0.05 + 0.005 * rng.standard_normal(8)     # RetinaMNIST quick: collaborative > centralized
    d = stats.non_inferiority(better, 0.02)
    assert d.verdict == "holds" and d.equivalence is False


def test_superiority_three_outcomes():
    assert stats.superiority([0.10, 0.12, 0.09, 0.11, 0.13]).verdict == "holds"
    assert stats.superiority([-0.10, -0.12, -0.09, -0.11, -0.13]).verdict == "fails"
    assert stats.superiority([0.10, -0.12, 0.09, -0.11, 0.13]).verdict == "inconclusive"
    assert stats.superiority([0.06, 0.07, 0.05, 0.06, 0.08], margin=0.10).verdict == "fails"


def test_one_seed_is_always_inconclusive():
    for d in (stats.non_inferiority([0.001], 0.02), stats.superiority([0.2])):
        assert d.verdict == "inconclusive" and "1 seed" in d.reason
        assert math.isnan(d.ci_low)


def test_non_finite_differences_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="NaN/Inf"):
        stats.superiority([0.1, float("nan")])
    with pytest.raises(ValueError, match="tolerance"):
        stats.non_inferiority([0.1, 0.2], 0.0)


def test_claim_verdict_decides_on_its_metric_only_and_combines():
    acc_ok = stats.superiority([0.10, 0.12, 0.09, 0.11], metric="acc")
    auc_bad = stats.superiority([-0.10, -0.12, -0.09, -0.11], metric="auc")
    v = stats.claim_verdict("c", [acc_ok, auc_bad], deciding_metric="acc")
    assert v["verdict"] == "holds" and v["holds"] is True and len(v["decisions"]) == 2
    v2 = stats.claim_verdict("c", [acc_ok, stats.non_inferiority([-0.2, -0.21, -0.19], 0.02)],
                             deciding_metric="acc")
    assert v2["verdict"] == "fails" and v2["holds"] is False
    with pytest.raises(ValueError, match="deciding metric"):
        stats.claim_verdict("c", [acc_ok], deciding_metric="balanced_acc")


def test_describe_reports_per_seed_values_and_both_intervals():
    s = stats.describe([0.80, 0.82, 0.81])
    assert s["values"] == [0.80, 0.82, 0.81] and s["n"] == 3
    assert s["mean"] == pytest.approx(0.81, abs=1e-12)
    assert s["ci_low"] < s["boot_low"] <= s["mean"] <= s["boot_high"] < s["ci_high"]


def test_image_bootstrap_brackets_the_accuracy_difference():
    rng = np.random.default_rng(1)
    a = rng.random(400) < 0.85
    b = rng.random(400) < 0.75
    lo, hi = stats.image_bootstrap(a, b)
    assert lo < a.mean() - b.mean() < hi
    assert 0.0 < hi - lo < 0.2
    with pytest.raises(ValueError, match="equally long"):
        stats.image_bootstrap(a, b[:10])


def test_decisions_in_other_units_read_in_that_unit():
    d = stats.non_inferiority([0.5, 0.8, 0.6, 0.7], 1.0, metric="psnr", unit="dB")
    assert d.verdict == "holds" and "dB" in d.reason and "above −1.0" in d.reason
    s = stats.superiority([2.0, 2.5, 2.2], 0.0, metric="psnr", unit="dB")
    assert s.verdict == "holds" and "dB" in s.reason

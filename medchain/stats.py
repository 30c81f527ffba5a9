"""Verdicts as statistical decisions over repeated runs (seeds), written once for all four claims.

A claim is never decided by one run: training noise between seeds is larger than the tolerances
(quick claim 1, seeds 0–4: gaps −1.5 … −9.0 points). Each comparison is a *paired* difference
per seed (method A − method B, both trained with the same seed: same partition, initialization
and shuffling), and the decision reads an interval of its mean:

* ``non_inferiority`` ("A reaches about the accuracy of B"): holds when the one-sided 95 % lower
  bound of the mean difference lies above −tolerance (that bound is the lower end of the
  two-sided 90 % interval); fails when the one-sided 95 % *upper* bound lies below −tolerance;
  else inconclusive. The two-sided equivalence test (90 % interval inside ±tolerance) is reported
  beside it: A better than B by more than the tolerance is not a failure of "about as good".
* ``superiority`` ("A beats B"): holds when the two-sided 95 % interval lies above the margin;
  fails when it lies at or below it; else inconclusive.

Intervals over seeds are Student-t intervals of the mean (exact for normal noise; with five seeds
a percentile bootstrap covers far less than its nominal 95 %). A percentile bootstrap over seeds
(:func:`scipy.stats.bootstrap`) is reported beside it. With one seed there is no estimate of the
training noise: the decision is "inconclusive (1 seed)", and where per-image results exist a
paired bootstrap over test images (:func:`image_bootstrap`) says how large the test-sampling
noise alone is.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import stats as sps

LEVEL = 0.95
KINDS = ("non_inferiority", "superiority")
VERDICTS = ("holds", "fails", "inconclusive")


def _finite(values, name: str = "values") -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError(f"{name} is empty: a decision needs at least one run")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN/Inf ({a.tolist()}): a run failed or a metric is "
                         "undefined there (e.g. AUC on a one-class test set); drop that metric")
    return a


def t_interval(values, level: float = LEVEL) -> tuple[float, float]:
    """Two-sided Student-t interval (lo, hi) of the mean of `values` (n ≥ 2; n = 1 → (nan, nan))."""
    a = _finite(values)
    if a.size < 2:
        return (math.nan, math.nan)
    mean, sem = float(a.mean()), float(a.std(ddof=1) / math.sqrt(a.size))
    if sem == 0.0:
        return (mean, mean)
    half = float(sps.t.ppf(0.5 + level / 2, df=a.size - 1)) * sem
    return (mean - half, mean + half)


def prediction_interval(values, level: float = LEVEL) -> tuple[float, float]:
    """Two-sided Student-t interval (lo, hi) that holds one *new* run with probability `level`:
    mean ± t(n−1) · sd · sqrt(1 + 1/n) of `values` (n ≥ 2; n = 1 → (nan, nan)). It is where a
    rerun of one seed on another machine should land (`medchain verify`)."""
    a = _finite(values)
    if a.size < 2:
        return (math.nan, math.nan)
    mean, sd = float(a.mean()), float(a.std(ddof=1))
    half = float(sps.t.ppf(0.5 + level / 2, df=a.size - 1)) * sd * math.sqrt(1 + 1 / a.size)
    return (mean - half, mean + half)


def bootstrap_interval(values, level: float = LEVEL, n_resamples: int = 9999,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval (lo, hi) of the mean (scipy.stats.bootstrap); n = 1 → nan."""
    a = _finite(values)
    if a.size < 2:
        return (math.nan, math.nan)
    if np.all(a == a[0]):
        return (float(a[0]), float(a[0]))
    res = sps.bootstrap((a,), np.mean, confidence_level=level, n_resamples=n_resamples,
                        method="percentile", random_state=np.random.default_rng(seed))
    return (float(res.confidence_interval.low), float(res.confidence_interval.high))


def describe(values, level: float = LEVEL) -> dict:
    """{n, values, mean, sd, ci_low, ci_high (t), boot_low, boot_high} of per-seed values."""
    a = _finite(values)
    lo, hi = t_interval(a, level)
    blo, bhi = bootstrap_interval(a, level)
    return {"n": int(a.size), "values": a.tolist(), "mean": float(a.mean()),
            "sd": float(a.std(ddof=1)) if a.size > 1 else math.nan,
            "level": level, "ci_low": lo, "ci_high": hi, "boot_low": blo, "boot_high": bhi}


@dataclass
class Decision:
    """One comparison of a claim: the paired per-seed differences `a − b` and what they decide.

    values: the differences (n,), in metric units (ACC 0.01 = one point).
    threshold: −tolerance for non-inferiority, the margin for superiority.
    verdict: "holds", "fails" or "inconclusive"; reason: why, in words with the numbers.
    """

    kind: str
    metric: str
    a: str
    b: str
    values: list[float]
    threshold: float
    verdict: str
    reason: str
    mean: float
    sd: float
    ci_low: float              # two-sided 95 % t interval
    ci_high: float
    bound: float               # the bound that decides: one-sided 95 % lower bound / 95 % lower end
    equivalence: bool | None = None   # non-inferiority only: 90 % interval inside ±tolerance
    extra: dict = field(default_factory=dict)

    @property
    def holds(self) -> bool | None:
        return {"holds": True, "fails": False}.get(self.verdict)

    def to_dict(self) -> dict:
        return {**asdict(self), "holds": self.holds, "n": len(self.values)}


def format_difference(x: float | None, unit: str = "points") -> str:
    """A difference in words: fractions (ACC) as percentage points, anything else in its unit;
    "–" for a missing or undefined value (e.g. the interval of one seed)."""
    if x is None or not math.isfinite(x):
        return "–"
    return f"{100 * x:+.1f}" if unit == "points" else f"{x:+.2f}"


def non_inferiority(diffs, tolerance: float, *, metric: str = "acc", a: str = "A", b: str = "B",
                    level: float = LEVEL, unit: str = "points") -> Decision:
    """Is A about as good as B? diffs: per-seed A − B. See the module docstring for the rule.
    unit: "points" for fractions (ACC 0.01 = 1 point) or the differences' own unit (e.g. "dB")."""
    def _pts(x):
        return format_difference(x, unit)
    tol = 100 * tolerance if unit == "points" else tolerance
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance}")
    d = _finite(diffs, f"{a} − {b} differences")
    lo90, hi90 = t_interval(d, 2 * level - 1)      # one-sided 95 % bounds = two-sided 90 % ends
    lo95, hi95 = t_interval(d, level)
    mean = float(d.mean())
    if d.size < 2:
        verdict, reason = "inconclusive", (f"1 seed ({_pts(mean)} {unit}): training noise unmeasured, "
                                           "run several seeds (-p seeds=[0,1,2,3,4])")
        equivalence = None
    else:
        ci = f"one-sided {level:.0%} bound {_pts(lo90)} {unit} (mean {_pts(mean)}, n = {d.size})"
        if lo90 > -tolerance:
            verdict, reason = "holds", f"{ci} above −{tol:.1f}"
        elif hi90 < -tolerance:
            verdict, reason = "fails", (f"{a} is worse by more than {tol:.1f} {unit}: "
                                        f"upper bound {_pts(hi90)} (mean {_pts(mean)}, n = {d.size})")
        else:
            verdict, reason = "inconclusive", (f"interval too wide: [{_pts(lo90)}, {_pts(hi90)}] "
                                               f"{unit} straddles −{tol:.1f} (n = {d.size} seeds)")
        equivalence = bool(-tolerance < lo90 and hi90 < tolerance)
    return Decision("non_inferiority", metric, a, b, d.tolist(), -tolerance, verdict, reason, mean,
                    float(d.std(ddof=1)) if d.size > 1 else math.nan, lo95, hi95, lo90, equivalence)


def superiority(diffs, margin: float = 0.0, *, metric: str = "acc", a: str = "A", b: str = "B",
                level: float = LEVEL, unit: str = "points") -> Decision:
    """Does A beat B by more than `margin`? diffs: per-seed A − B (unit as in non_inferiority)."""
    def _pts(x):
        return format_difference(x, unit)
    d = _finite(diffs, f"{a} − {b} differences")
    lo, hi = t_interval(d, level)
    mean = float(d.mean())
    if d.size < 2:
        verdict, reason = "inconclusive", (f"1 seed ({_pts(mean)} {unit}): training noise unmeasured, "
                                           "run several seeds (-p seeds=[0,1,2,3,4])")
    elif lo > margin:
        verdict, reason = "holds", (f"{level:.0%} interval [{_pts(lo)}, {_pts(hi)}] {unit} above "
                                    f"{_pts(margin)} (n = {d.size})")
    elif hi <= margin:
        verdict, reason = "fails", (f"{level:.0%} interval [{_pts(lo)}, {_pts(hi)}] {unit} not above "
                                    f"{_pts(margin)} (n = {d.size})")
    else:
        verdict, reason = "inconclusive", (f"interval too wide: [{_pts(lo)}, {_pts(hi)}] {unit} "
                                           f"contains {_pts(margin)} (n = {d.size} seeds)")
    return Decision("superiority", metric, a, b, d.tolist(), margin, verdict, reason, mean,
                    float(d.std(ddof=1)) if d.size > 1 else math.nan, lo, hi, lo)


def combine(decisions: list[Decision]) -> str:
    """All hold → "holds"; any fails → "fails"; otherwise "inconclusive"."""
    if not decisions:
        raise ValueError("no decisions to combine")
    verdicts = [d.verdict for d in decisions]
    if all(v == "holds" for v in verdicts):
        return "holds"
    return "fails" if "fails" in verdicts else "inconclusive"


def claim_verdict(claim: str, decisions: list[Decision], *, deciding_metric: str | tuple[str, ...],
                  why_metric: str = "") -> dict:
    """The verdict record of one (sub-)claim for summary.json and `medchain reproduce`:
    {claim, verdict, holds (True/False/None), detail, deciding_metric, decisions: [...]}.
    Only the decisions on `deciding_metric` (one metric, or several that must all hold) decide;
    the others are reported beside them."""
    wanted = (deciding_metric,) if isinstance(deciding_metric, str) else tuple(deciding_metric)
    deciding = [d for d in decisions if d.metric in wanted]
    missing = set(wanted) - {d.metric for d in deciding}
    if missing:
        raise ValueError(f"no decision on the deciding metric(s) {sorted(missing)}; "
                         f"have {sorted({d.metric for d in decisions})}")
    v = combine(deciding)
    detail = "; ".join(f"{d.a} − {d.b} ({d.metric}): {d.verdict} — {d.reason}" for d in deciding)
    return {"claim": claim, "verdict": v, "holds": {"holds": True, "fails": False}.get(v),
            "detail": detail, "deciding_metric": deciding_metric, "why_metric": why_metric,
            "decisions": [d.to_dict() for d in decisions]}


def image_bootstrap(correct_a, correct_b, level: float = LEVEL, n_resamples: int = 9999,
                    seed: int = 0) -> tuple[float, float]:
    """Paired percentile-bootstrap interval over test images of ACC(A) − ACC(B) for ONE run.

    correct_a, correct_b: bool (N,), whether each model got each test image right (same images,
    same order). It measures the test-sampling noise only, not the training noise between seeds."""
    a = np.asarray(correct_a, dtype=np.float64).ravel()
    b = np.asarray(correct_b, dtype=np.float64).ravel()
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"need two equally long per-image results (N ≥ 2), got {a.shape} and {b.shape}")
    return bootstrap_interval(a - b, level, n_resamples, seed)

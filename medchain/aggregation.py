"""Deterministic aggregation of (possibly sparse) updates into the next global model.

Every institution runs this same function on the same updates read from the chain (in a canonical
order, see :meth:`medchain.protocol.Institution.apply_round`), so every institution computes
bit-identical global models: accumulation is in float64 in a fixed order, the result is rounded
once to float32.

Rules (``CollabConfig.aggregation``, recorded on chain in the task params; :data:`RULES`,
:func:`parse_rule`): ``mean`` (FedAvg, the default) and the Byzantine-robust ``median``,
``trimmed_mean[:beta]``, ``norm_clip[:bound]`` and ``multi_krum[:f]`` (see :data:`RULE_HELP`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RULES = ("mean", "median", "trimmed_mean", "norm_clip", "multi_krum")


@dataclass(frozen=True)
class SparseUpdate:
    """One institution's update as it travels: coordinates `indices` (int64 (n,), strictly
    increasing) of a length-`total_size` vector carry `values` (float32 (n,)); `weight` is the
    aggregation weight (the sample count recorded on chain)."""

    indices: np.ndarray
    values: np.ndarray
    weight: float
    total_size: int

    def dense(self) -> np.ndarray:
        out = np.zeros(self.total_size, dtype=np.float32)
        out[self.indices] = self.values
        return out


def weighted_mean(updates: list[SparseUpdate]) -> np.ndarray:
    """Per coordinate, the weight-averaged value over the institutions that shared it; coordinates
    nobody shared get 0 (the global model stays unchanged there). Returns float64 (P,)."""
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    size = updates[0].total_size
    num = np.zeros(size, dtype=np.float64)
    den = np.zeros(size, dtype=np.float64)
    for u in updates:
        if u.total_size != size:
            raise ValueError(f"updates disagree on the vector size ({u.total_size} vs {size})")
        if not u.weight > 0:
            raise ValueError(f"aggregation weight must be > 0, got {u.weight}")
        num[u.indices] += u.weight * u.values.astype(np.float64)
        den[u.indices] += u.weight
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


@dataclass
class ServerOptimizer:
    """Applies the aggregated update to the global model: plain FedAvg (lr 1, momentum 0) or
    FedAvgM (server momentum). State lives in every institution and evolves identically.

    averaged: bool (P,) of coordinates that are statistics, not weights (BatchNorm running means
    and variances): they always take the plain aggregated update (lr 1, no momentum) — stepping them
    with momentum overshoots (measured: a running variance went negative and the model to NaN
    within three rounds of FedAvgM at momentum 0.5)."""

    lr: float = 1.0
    momentum: float = 0.0
    averaged: np.ndarray | None = None
    _buf: np.ndarray | None = None

    def step(self, global_vec: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """global_vec float32 (P,), delta float64 (P,) → next global float32 (P,)."""
        plain = delta
        if self.momentum > 0:
            self._buf = delta if self._buf is None else self.momentum * self._buf + delta
            delta = self._buf
        step = self.lr * delta
        if self.averaged is not None and (self.momentum > 0 or self.lr != 1.0):
            step = np.where(self.averaged, plain, step)
        return (global_vec.astype(np.float64) + step).astype(np.float32)


def aggregate(global_vec: np.ndarray, updates: list[SparseUpdate], rule: str = "mean",
              server: ServerOptimizer | None = None) -> np.ndarray:
    """Next global model float32 (P,) from the current one and this round's updates, combined by
    ``rule`` (``"mean"``, ``"median"``, ``"trimmed_mean:0.2"``, ``"norm_clip"``, ``"multi_krum:1"``…)
    and applied by ``server``."""
    parse_rule(rule)          # unknown rule: ValueError before anything else
    delta = combine(updates, rule)
    return (server or ServerOptimizer()).step(global_vec, delta)


# ------------------------------------------------------------------------------ robust rules
#
# A Byzantine member can submit any well-formed update (scaled, sign-flipped, random, huge but
# within max_abs) and claim any sample count. The robust rules below bound its influence; they are
# deterministic (float64, fixed order, stable sorts), so every honest institution computes the same
# model. They do not trust the self-reported sample counts: median and trimmed mean are unweighted,
# norm_clip and multi_krum cap every weight at the median weight.
# Sparse updates: the median and the trimmed mean run per coordinate over the institutions that
# shared it (a coordinate nobody shared gets 0); norms and Krum distances treat an unshared
# coordinate as 0.

RULE_HELP = {
    "mean": "weighted mean by sample count (FedAvg); not robust",
    "median": "coordinate-wise median (unweighted)",
    "trimmed_mean": "trimmed_mean[:beta] — per coordinate, drop the floor(beta·k) largest and smallest "
                    "of the k shared values, average the rest (unweighted; default beta 0.2, 0 <= beta < 0.5)",
    "norm_clip": "norm_clip[:bound] — scale each update to L2 norm <= bound (default: the median norm of "
                 "the round's updates), then the weighted mean with weights capped at the median weight",
    "multi_krum": "multi_krum[:f] — Multi-Krum (Blanchard et al. 2017): score each update by the summed "
                  "squared distances to its n-f-2 nearest others, keep the n-f best, weighted mean of "
                  "those with weights capped at the median (default f = floor((n-3)/2))",
}


def parse_rule(rule: str) -> tuple[str, float | None]:
    """``"trimmed_mean:0.1"`` → ``("trimmed_mean", 0.1)``; ``"median"`` → ``("median", None)``.
    Raises ValueError naming the known rules for an unknown name or a bad parameter."""
    if not isinstance(rule, str):
        raise ValueError(f"aggregation rule must be a string, got {rule!r}")
    name, sep, arg = rule.strip().partition(":")
    name = name.strip().lower().replace("-", "_")
    if name not in RULES:
        raise ValueError(f"unknown aggregation rule {rule!r}; choose one of mean, median, "
                         "trimmed_mean[:beta], norm_clip[:bound], multi_krum[:f]")
    if not sep:
        return name, None
    if name in ("mean", "median"):
        raise ValueError(f"aggregation rule {name!r} takes no parameter, got {rule!r}")
    try:
        value = float(arg)
    except ValueError:
        raise ValueError(f"bad parameter {arg!r} in aggregation rule {rule!r}: expected a number") from None
    if name == "trimmed_mean" and not 0 <= value < 0.5:
        raise ValueError(f"trimmed_mean needs 0 <= beta < 0.5, got {value}")
    if name == "norm_clip" and not (value > 0 and np.isfinite(value)):
        raise ValueError(f"norm_clip needs a finite bound > 0, got {value}")
    if name == "multi_krum" and (value < 0 or value != int(value)):
        raise ValueError(f"multi_krum needs an integer f >= 0 (assumed Byzantine members), got {arg!r}")
    return name, value


def validate_rule(rule: str) -> str:
    """``rule`` if it names a known rule with a valid parameter (else ValueError)."""
    parse_rule(rule)
    return rule


def _check(updates: list[SparseUpdate]) -> int:
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    size = updates[0].total_size
    for u in updates:
        if u.total_size != size:
            raise ValueError(f"updates disagree on the vector size ({u.total_size} vs {size})")
        if not u.weight > 0:
            raise ValueError(f"aggregation weight must be > 0, got {u.weight}")
    return size


def _stack(updates: list[SparseUpdate]) -> np.ndarray:
    """(n, P) float64 with NaN where an update did not share the coordinate."""
    size = _check(updates)
    x = np.full((len(updates), size), np.nan, dtype=np.float64)
    for i, u in enumerate(updates):
        x[i, u.indices] = u.values.astype(np.float64)
    return x


def coordinate_median(updates: list[SparseUpdate]) -> np.ndarray:
    """Per coordinate, the median of the values shared for it (mean of the two middle ones for an
    even count); 0 where nobody shared. Unweighted. Returns float64 (P,)."""
    x = np.sort(_stack(updates), axis=0)                 # NaN (not shared) sorts last
    count = (~np.isnan(x)).sum(axis=0)
    lo = np.take_along_axis(x, (np.maximum(count - 1, 0) // 2)[None], axis=0)[0]
    hi = np.take_along_axis(x, np.minimum(count // 2, len(updates) - 1)[None], axis=0)[0]
    return np.where(count > 0, (lo + hi) / 2, 0.0)


def trimmed_mean(updates: list[SparseUpdate], beta: float = 0.2) -> np.ndarray:
    """Per coordinate with k shared values: drop the floor(beta·k) smallest and largest, average
    the rest (unweighted); 0 where nobody shared. Returns float64 (P,)."""
    if not 0 <= beta < 0.5:
        raise ValueError(f"trimmed_mean needs 0 <= beta < 0.5, got {beta}")
    x = np.sort(_stack(updates), axis=0)
    count = (~np.isnan(x)).sum(axis=0)
    trim = np.floor(beta * count).astype(np.int64)
    rank = np.arange(len(updates))[:, None]
    keep = (rank >= trim) & (rank < count - trim)
    total = np.where(keep, x, 0.0).sum(axis=0)
    n_kept = keep.sum(axis=0)
    return np.divide(total, n_kept, out=np.zeros_like(total), where=n_kept > 0)


def update_norms(updates: list[SparseUpdate]) -> np.ndarray:
    """L2 norm of each update (float64 (n,)), over the values it shared."""
    return np.array([np.sqrt(np.sum(u.values.astype(np.float64) ** 2)) for u in updates])


def _capped(updates: list[SparseUpdate]) -> list[SparseUpdate]:
    """The same updates with every weight capped at the median weight (sample counts are
    self-reported: a member claiming a huge count must not dominate)."""
    cap = float(np.median([u.weight for u in updates]))
    return [SparseUpdate(u.indices, u.values, min(u.weight, cap), u.total_size) for u in updates]


def norm_clipped_mean(updates: list[SparseUpdate], bound: float | None = None) -> np.ndarray:
    """Scale each update to L2 norm <= ``bound`` (None: the median norm of these updates), then the
    weighted mean with weights capped at the median weight. Returns float64 (P,)."""
    _check(updates)
    norms = update_norms(updates)
    b = float(np.median(norms)) if bound is None else float(bound)
    clipped = []
    for u, n in zip(updates, norms):
        scale = 1.0 if n <= b or n == 0 else b / n
        vals = u.values if scale == 1.0 else (u.values.astype(np.float64) * scale)
        clipped.append(SparseUpdate(u.indices, vals, u.weight, u.total_size))
    return weighted_mean(_capped(clipped))


def krum_selection(updates: list[SparseUpdate], f: int | None = None) -> np.ndarray:
    """Indices (into ``updates``) of the n - f updates Multi-Krum keeps, in their original order.
    Score of i: sum of its k = max(1, n-f-2) smallest squared L2 distances to the others; ties are
    broken by position (stable sort)."""
    size = _check(updates)
    n = len(updates)
    f = max(0, (n - 3) // 2) if f is None else int(f)
    if f >= n:
        raise ValueError(f"multi_krum: f={f} assumed Byzantine members leaves nothing of {n} updates")
    if n <= 2:
        return np.arange(n)
    dense = np.zeros((n, size), dtype=np.float64)
    for i, u in enumerate(updates):
        dense[i, u.indices] = u.values.astype(np.float64)
    d2 = np.zeros((n, n), dtype=np.float64)
    for i in range(n):
        for j in range(i + 1, n):
            diff = dense[i] - dense[j]
            d2[i, j] = d2[j, i] = float(np.sum(diff * diff))
    k = min(max(1, n - f - 2), n - 1)
    scores = np.array([np.sort(np.delete(d2[i], i))[:k].sum() for i in range(n)])
    keep = np.argsort(scores, kind="stable")[: n - f]
    return np.sort(keep)


def multi_krum(updates: list[SparseUpdate], f: int | None = None) -> np.ndarray:
    """Multi-Krum: the weighted mean (weights capped at the median) of the updates
    :func:`krum_selection` keeps. Returns float64 (P,)."""
    keep = krum_selection(updates, f)
    return weighted_mean(_capped([updates[i] for i in keep]))


def combine(updates: list[SparseUpdate], rule: str = "mean") -> np.ndarray:
    """The aggregated update float64 (P,) of this round's updates under ``rule`` (see
    :data:`RULE_HELP`)."""
    name, arg = parse_rule(rule)
    if name == "mean":
        return weighted_mean(updates)
    if name == "median":
        return coordinate_median(updates)
    if name == "trimmed_mean":
        return trimmed_mean(updates, 0.2 if arg is None else arg)
    if name == "norm_clip":
        return norm_clipped_mean(updates, arg)
    return multi_krum(updates, None if arg is None else int(arg))

"""Deterministic aggregation of (possibly sparse) updates into the next global model.

Every institution runs this same function on the same updates read from the chain in chain order,
so every institution computes bit-identical global models: accumulation is in float64 in a fixed
order, the result is rounded once to float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RULES = ("mean",)


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
    FedAvgM (server momentum). State lives in every institution and evolves identically."""

    lr: float = 1.0
    momentum: float = 0.0
    _buf: np.ndarray | None = None

    def step(self, global_vec: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """global_vec float32 (P,), delta float64 (P,) → next global float32 (P,)."""
        if self.momentum > 0:
            self._buf = delta if self._buf is None else self.momentum * self._buf + delta
            delta = self._buf
        return (global_vec.astype(np.float64) + self.lr * delta).astype(np.float32)


def aggregate(global_vec: np.ndarray, updates: list[SparseUpdate], rule: str = "mean",
              server: ServerOptimizer | None = None) -> np.ndarray:
    """Next global model float32 (P,) from the current one and this round's updates."""
    if rule not in RULES:
        raise ValueError(f"unknown aggregation rule {rule!r}; choose one of {RULES}")
    delta = weighted_mean(updates)
    return (server or ServerOptimizer()).step(global_vec, delta)

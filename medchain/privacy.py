"""Partial parameter update: what an institution uploads, and what it downloads.

Selective sharing after Shokri & Shmatikov, *Privacy-Preserving Deep Learning* (CCS 2015):
each round an institution uploads only a fraction ``theta_u`` of the coordinates of its update
``Δ = w_local − w_global`` and, optionally, downloads only a fraction ``theta_d`` of the global
model's coordinates.

Upload (:func:`select_update`, :func:`make_selector`)
    * ``rule="largest"`` (default): the ``k`` coordinates of largest ``|Δ|``;
      ``rule="random"``: ``k`` coordinates drawn uniformly at random (Shokri's second rule).
    * ``tau``: only coordinates with ``|Δ| > tau`` are eligible (Shokri's threshold τ); fewer than
      ``k`` may then be shared.
    * ``gamma``: shared values are clipped to ``[−γ, γ]`` (selection uses the unclipped values).
    * ``sigma``: Gaussian noise ``N(0, σ²)`` is added to each shared value after clipping
      (a DP-style variant; Shokri et al. use the Laplace mechanism with a privacy budget —
      here σ is a plain noise scale and no ε is claimed).
    * ``scope="global"`` (default): one top-k over the whole vector, ``k = round(θu·P)``;
      ``scope="layer"``: ``k_t = round(θu·n_t)`` within each tensor ``t`` of the layout, so every
      tensor shares something. In both scopes ``k ≥ 1`` (for each tensor in ``"layer"`` scope).
    * ``eligible``: bool (P,), the coordinates that may be selected; θu counts over them only.
      :func:`make_selector` makes the model's *trainable parameters* eligible, so θu is a fraction
      of the trainable update, and treats statistics buffers (BatchNorm running mean / var) by the
      task's explicit ``bn_stats`` policy (:data:`BN_POLICIES`): ``"local"`` — never uploaded
      (the protocol keeps them as local-only coordinates); ``"shared"`` — every buffer coordinate
      is uploaded with each update, unclipped and noise-free, counted in the payload (they are the
      exact per-channel moments of the institution's activations; :mod:`medchain.attacks`
      inverts them).
    * Deterministic: ties in ``|Δ|`` go to the lower coordinate (stable sort); randomness (random
      rule, noise) comes only from ``rng`` (a seed or ``numpy.random.Generator``) and is drawn in a
      fixed order (selection first, then noise in increasing coordinate order).

    The result is ``(indices int64 (n,), values float32 (n,))`` with strictly increasing indices —
    exactly what :func:`medchain.codec.encode_update` takes and what
    :class:`medchain.protocol.Institution`'s ``select`` hook returns. Unshared coordinates are not
    sent; :func:`medchain.aggregation.weighted_mean` averages each coordinate over the institutions
    that shared it and leaves coordinates nobody shared unchanged.

Download (:func:`download_mask`, :func:`apply_download`)
    Shokri's download of the ``θd`` most-changed global coordinates. An institution holding its
    local model ``w_local`` computes ``mask = download_mask(w_global_new, w_global_old, θd)`` with
    ``w_global_old`` the global model it last synchronized to (the previous round's global model),
    and replaces only those coordinates: ``w_local = apply_download(w_local, w_global_new, mask)``
    (i.e. ``np.where(mask, w_global_new, w_local)``); every other coordinate keeps its local value.
    Passing ``w_local`` as ``global_old`` instead downloads where the local model is most stale.
    With ``θd = 1`` the institution takes the whole global model (the protocol's default).
    Both functions are pure: wiring them into the protocol (which vector the institution trains
    from) is :mod:`medchain.protocol`'s business.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from medchain.params import Layout

__all__ = ["RULES", "SCOPES", "BN_POLICIES", "n_selected", "trainable_mask", "select_update", "make_selector", "download_mask",
           "apply_download"]

RULES = ("largest", "random")
SCOPES = ("global", "layer")
BN_POLICIES = ("local", "shared")


def trainable_mask(layout: Layout) -> np.ndarray:
    """bool (P,): the coordinates of trainable parameters (not buffers such as BatchNorm
    running statistics)."""
    mask = np.zeros(layout.size, dtype=bool)
    for e in layout.entries:
        if e.kind == "param":
            mask[layout.slices[e.name]] = True
    return mask


def n_selected(theta: float, n: int) -> int:
    """Number of coordinates a fraction ``theta`` of ``n`` shares: ``round(theta·n)``, at least 1
    (half-up rounding, so ``0.1·30`` gives 3 whatever the float error)."""
    _check_theta(theta, "theta")
    if n <= 0:
        return 0
    return int(min(n, max(1, np.floor(theta * n + 0.5))))


def _check_theta(theta: float, name: str) -> None:
    if isinstance(theta, bool) or not isinstance(theta, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number in (0, 1], got {type(theta).__name__}")
    if not 0 < float(theta) <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {theta}")


def _as_rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None:
        raise ValueError("this selection is random (rule='random' or sigma > 0): pass rng= (an int "
                         "seed or a numpy.random.Generator) so that it is reproducible")
    return np.random.default_rng(rng)


def _check_vector(v, name: str) -> np.ndarray:
    a = np.asarray(v)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D vector (P,), got shape {a.shape}")
    if a.dtype.kind != "f":
        raise TypeError(f"{name} must be floating point, got dtype {a.dtype}")
    if not np.isfinite(a).all():
        bad = int(np.flatnonzero(~np.isfinite(a))[0])
        raise ValueError(f"{name} holds NaN/Inf (first at coordinate {bad}); the local training "
                         "diverged — do not share it")
    return a


def _segments(size: int, scope: str, layout: Layout | None) -> list[tuple[int, int]]:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if scope == "global":
        return [(0, size)]
    if layout is None:
        raise ValueError("scope='layer' needs the model's layout (layout=Layout.from_module(model))")
    if layout.size != size:
        raise ValueError(f"vector has {size} coordinates but the layout has {layout.size}")
    return [(s.start, s.stop) for s in (layout.slices[n] for n in layout.names)]


def _pick(mag: np.ndarray, k: int, rule: str, tau: float | None,
          rng: np.random.Generator | None) -> np.ndarray:
    """Positions (unsorted) of the k chosen entries of one segment, by magnitude or at random."""
    eligible = np.arange(mag.size) if tau is None else np.flatnonzero(mag > tau)
    if eligible.size <= k:
        return eligible
    if rule == "largest":
        order = np.argsort(-mag[eligible], kind="stable")  # ties: lower coordinate first
        return eligible[order[:k]]
    return rng.choice(eligible, size=k, replace=False)


def select_update(delta, theta_u: float, *, rule: str = "largest", scope: str = "global",
                  layout: Layout | None = None, tau: float | None = None,
                  gamma: float | None = None, sigma: float | None = None,
                  rng: int | np.random.Generator | None = None,
                  eligible: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Choose the part of an update an institution uploads (see the module docstring).

    delta: float (P,), the update ``w_local − w_global``. theta_u: fraction in (0, 1].
    rule: ``"largest"`` |Δ| (default) or ``"random"``. scope: ``"global"`` (default, one top-k over
    all P coordinates) or ``"layer"`` (θu of each tensor of ``layout``). tau: eligibility threshold
    on |Δ| (strict ``>``). gamma: clip shared values to ±γ. sigma: std of Gaussian noise added to
    the shared values. rng: seed or Generator, required for ``rule="random"`` or ``sigma > 0``.
    eligible: bool (P,) coordinates that may be shared (default all); θu is a fraction of them.

    Returns (indices int64 (n,) strictly increasing, values float32 (n,)); n = round(θu·P) (at
    least 1) unless ``tau`` leaves fewer eligible coordinates.
    """
    d = _check_vector(delta, "delta")
    _check_theta(theta_u, "theta_u")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    for name, v in (("tau", tau), ("gamma", gamma), ("sigma", sigma)):
        if v is not None and not (np.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v}")
    if gamma is not None and gamma == 0:
        raise ValueError("gamma = 0 would clip every shared value to 0; use gamma > 0 or None")
    noisy = sigma is not None and sigma > 0
    gen = _as_rng(rng) if (rule == "random" or noisy) else None
    if eligible is not None:
        eligible = np.asarray(eligible)
        if eligible.dtype != bool or eligible.shape != d.shape:
            raise ValueError(f"eligible must be a bool mask of shape {d.shape}, got {eligible.dtype} "
                             f"{eligible.shape}")
    mag = np.abs(d.astype(np.float64))
    chosen = []
    for start, stop in _segments(d.size, scope, layout):
        pos = np.arange(stop - start) if eligible is None else np.flatnonzero(eligible[start:stop])
        k = n_selected(theta_u, pos.size)
        if k:
            chosen.append(start + pos[_pick(mag[start:stop][pos], k, rule, tau, gen)])
    idx = np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, np.int64)
    vals = d[idx].astype(np.float64)
    if gamma is not None:
        vals = np.clip(vals, -gamma, gamma)
    if noisy:
        vals = vals + gen.normal(0.0, sigma, size=vals.size)
    return idx, vals.astype(np.float32)


_SELECT_KEYS = ("theta_u", "rule", "scope", "tau", "gamma", "sigma", "bn_stats")


def _param(params: Any, key: str, default=None):
    if isinstance(params, Mapping):
        return params.get(key, default)
    return getattr(params, key, default)


def make_selector(params: Any, layout: Layout | None = None, seed: int = 0, *,
                  institution: int = 0, **overrides
                  ) -> Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]:
    """A ``select`` hook for :class:`medchain.protocol.Institution`: ``(delta, round) -> (idx, vals)``.

    params: anything with attributes or keys ``theta_u`` and, optionally, ``select_rule`` /
    ``rule``, ``select_scope`` / ``scope``, ``tau``, ``gamma``, ``sigma`` (a
    :class:`~medchain.protocol.CollabConfig`, a dict, …); ``overrides`` (same names as
    :func:`select_update`'s keywords) win. layout: needed for ``scope="layer"``; with it θu counts
    over the trainable parameters only and ``bn_stats`` (``"shared"`` default | ``"local"``, from
    params or overrides) decides the statistics buffers (module docstring). Without a layout
    every coordinate is eligible (a bare vector has no parameter/buffer split).
    Random choices (random rule, noise) use ``numpy.random.default_rng([seed, institution, round])``:
    different per round and per institution, identical across runs.
    """
    bad = set(overrides) - set(_SELECT_KEYS)
    if bad:
        raise TypeError(f"unknown selection option(s) {sorted(bad)}; use {list(_SELECT_KEYS)}")
    opts = {
        "theta_u": _param(params, "theta_u", 1.0),
        "rule": _param(params, "select_rule", _param(params, "rule", "largest")),
        "scope": _param(params, "select_scope", _param(params, "scope", "global")),
        "tau": _param(params, "tau"), "gamma": _param(params, "gamma"),
        "sigma": _param(params, "sigma"), "bn_stats": _param(params, "bn_stats", "shared"),
    }
    opts.update(overrides)
    theta_u = opts.pop("theta_u")
    bn_stats = opts.pop("bn_stats")
    if bn_stats not in BN_POLICIES:
        raise ValueError(f"bn_stats must be one of {BN_POLICIES}, got {bn_stats!r}")
    eligible = trainable_mask(layout) if layout is not None else None
    shared_buffers = (np.flatnonzero(~eligible) if eligible is not None and bn_stats == "shared"
                      else np.zeros(0, np.int64))
    _check_theta(theta_u, "theta_u")
    if opts["rule"] not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {opts['rule']!r}")
    if opts["scope"] == "layer" and layout is None:
        raise ValueError("scope='layer' needs layout=")
    seed, institution = int(seed), int(institution)

    def select(delta: np.ndarray, round: int) -> tuple[np.ndarray, np.ndarray]:
        if layout is not None and np.shape(delta) != (layout.size,):
            raise ValueError(f"delta has shape {np.shape(delta)}, the layout needs ({layout.size},)")
        rng = np.random.default_rng([seed, institution, int(round)])
        idx, vals = select_update(delta, theta_u, layout=layout, rng=rng, eligible=eligible, **opts)
        if shared_buffers.size:
            idx = np.concatenate([idx, shared_buffers])
            vals = np.concatenate([vals, np.asarray(delta, np.float32)[shared_buffers]])
            order = np.argsort(idx, kind="stable")
            idx, vals = idx[order], vals[order]
        return idx, vals

    select.options = {"theta_u": theta_u, **opts, "bn_stats": bn_stats, "seed": seed,
                      "institution": institution}
    return select


def download_mask(global_new, global_old, theta_d: float, layout: Layout | None = None, *,
                  scope: str = "global") -> np.ndarray:
    """bool (P,): the ``round(θd·P)`` coordinates (at least 1) where ``|global_new − global_old|``
    is largest — the part of the new global model an institution downloads (Shokri's θd).

    global_new, global_old: float (P,). theta_d: fraction in (0, 1] (1 → every coordinate).
    scope: ``"global"`` (default) or ``"layer"`` (θd of each tensor of ``layout``). Ties go to the
    lower coordinate. Use with :func:`apply_download`.
    """
    new = _check_vector(global_new, "global_new")
    old = _check_vector(global_old, "global_old")
    if new.shape != old.shape:
        raise ValueError(f"global_new {new.shape} and global_old {old.shape} differ in shape")
    _check_theta(theta_d, "theta_d")
    mag = np.abs(new.astype(np.float64) - old.astype(np.float64))
    mask = np.zeros(new.size, dtype=bool)
    for start, stop in _segments(new.size, scope, layout):
        k = n_selected(theta_d, stop - start)
        if k:
            mask[start + _pick(mag[start:stop], k, "largest", None, None)] = True
    return mask


def apply_download(local, global_new, mask) -> np.ndarray:
    """The institution's model after a partial download: ``global_new`` where ``mask``, ``local``
    elsewhere (float32 (P,), a new array)."""
    local = _check_vector(local, "local")
    global_new = _check_vector(global_new, "global_new")
    mask = np.asarray(mask)
    if mask.dtype != bool or mask.shape != local.shape or global_new.shape != local.shape:
        raise ValueError(f"need local, global_new (P,) floats and mask (P,) bool; got "
                         f"{local.shape}, {global_new.shape}, {mask.shape} {mask.dtype}")
    return np.where(mask, global_new, local).astype(np.float32)

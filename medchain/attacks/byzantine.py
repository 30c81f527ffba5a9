"""Byzantine members for drills and tests: the malicious update values a hostile institution uploads
(:func:`byzantine_select`), the drill behaviours it acts out beyond them (:data:`BEHAVIOURS`), and
the parsing and checking of drill specs such as ``"signflip:5+withhold-blob"``.

Only the update values are made here; the behaviours that need the chain client (submitting false
sample counts, attesting garbage, withholding a payload) are acted out by the node
(:mod:`medchain.node.hostile`): this layer may not import the chain client or the protocol."""
from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = ["ATTACKS", "BEHAVIOURS", "byzantine_select", "parse_drill", "check_byzantine"]

ATTACKS = ("signflip", "scale", "random", "huge")
#: Drill behaviours of a hostile member beyond its update's values (combine with '+'): try to submit
#: with 0 and with 2**64-1 samples, attest a garbage digest, post a digest whose payload it never stores.
BEHAVIOURS = ("zero-samples", "huge-samples", "garbage-attest", "withhold-blob")


def byzantine_select(kind: str, scale: float | None = None, seed: int = 0
                     ) -> Callable[[np.ndarray, int], tuple[None, np.ndarray]]:
    """A ``select`` hook for :class:`~medchain.protocol.Institution` that replaces the honest update
    by a malicious one (for drills and tests): ``signflip`` (−scale·Δ, default scale 10), ``scale``
    (scale·Δ, default 10), ``random`` (Gaussian noise, std = scale × std(Δ), default 10), ``huge``
    (±scale on every coordinate, default 500: within the default max_abs_update of 1e3; above it
    the payload is refused at replay)."""
    if kind not in ATTACKS:
        raise ValueError(f"unknown attack {kind!r}; choose one of {ATTACKS}")
    s = float({"huge": 500.0}.get(kind, 10.0) if scale is None else scale)

    def select(delta: np.ndarray, r: int) -> tuple[None, np.ndarray]:
        d = delta.astype(np.float64)
        if kind == "signflip":
            v = -s * d
        elif kind == "scale":
            v = s * d
        elif kind == "random":
            rng = np.random.default_rng([seed, r])
            v = rng.normal(0.0, s * (float(d.std()) or 1e-3), d.shape)
        else:
            v = np.where(np.arange(d.size) % 2 == 0, s, -s)
        return None, v.astype(np.float32)
    return select


def parse_drill(spec: str) -> tuple[str | None, float | None, frozenset[str]]:
    """``"signflip:5+withhold-blob"`` → ``("signflip", 5.0, {"withhold-blob"})``: at most one value
    attack (:data:`ATTACKS`, optional scale) and any of :data:`BEHAVIOURS`, joined by '+'.
    ValueError naming the known kinds otherwise."""
    attack, scale, behaviours = None, None, set()
    for part in filter(None, (p.strip() for p in str(spec).split("+"))):
        kind, _, sc = part.partition(":")
        if kind in BEHAVIOURS and not sc:
            behaviours.add(kind)
            continue
        if kind not in ATTACKS:
            raise ValueError(f"unknown attack {kind!r}; choose one of {ATTACKS} (with an optional :SCALE) "
                             f"and/or {BEHAVIOURS}, joined by '+'")
        if attack is not None:
            raise ValueError(f"drill {spec!r} names two value attacks ({attack}, {kind}); give at most one")
        try:
            value = float(sc) if sc else None
        except ValueError:
            raise ValueError(f"drill {spec!r}: the scale {sc!r} is not a number") from None
        if value is not None and not (np.isfinite(value) and value > 0):
            raise ValueError(f"drill {spec!r}: the scale must be a finite number > 0")
        attack, scale = kind, value
    if attack is None and not behaviours:
        raise ValueError(f"empty drill {spec!r}; choose from {ATTACKS} and/or {BEHAVIOURS}")
    return attack, scale, frozenset(behaviours)


def check_byzantine(byzantine: dict[int, str], processes: int) -> dict[int, str]:
    """``byzantine`` ({index: "kind[:scale]"}) if every index names one of the ``processes``
    institutions and every attack is known; ValueError naming the valid range otherwise (an index
    out of range would otherwise be ignored silently while the summary records the drill)."""
    out = {}
    for i, spec in byzantine.items():
        if not isinstance(i, (int, np.integer)) or not 0 <= int(i) < processes:
            raise ValueError(f"--byzantine index {i} is out of range: with {processes} process(es) the "
                             f"institutions are numbered 0..{processes - 1}")
        try:
            parse_drill(spec)                    # unknown kind: ValueError naming the known ones
        except ValueError as exc:
            raise ValueError(f"--byzantine {i}:{spec}: {exc}") from None
        out[int(i)] = str(spec)
    return out

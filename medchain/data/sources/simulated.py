"""The ``"simulated[:k=v,...]"`` source: medchain's own simulated chest-CT nodule data set
(:func:`medchain.data.simulate.simulate_ct`) with its options parsed from the source string."""
from __future__ import annotations

import inspect
import re
from typing import Any

import numpy as np

from ..types import Dataset
from .registry import register_source


def _parse_value(v: str) -> Any:
    v = v.strip()
    if "/" in v:
        return tuple(_parse_value(p) for p in v.split("/"))
    if re.fullmatch(r"[+-]?\d+", v):
        return int(v)
    try:
        return float(v)
    except ValueError:
        pass
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    if v.lower() == "none":
        return None
    return v


@register_source("simulated")
def load_simulated(text: str, *, image_size: int, **_) -> Dataset:
    """``text`` is the whole source string (``"simulated"`` or ``"simulated:n=2000,sites=5"``);
    ``image_size`` is the side unless ``size=`` is among the options."""
    from ..simulate import simulate_ct  # lazy: the simulator is heavy and optional at import

    opts: dict[str, Any] = {}
    _, _, rest = text.partition(":")
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise ValueError(f"bad option {item!r} in {text!r}: options are k=v pairs separated by "
                             "commas, e.g. 'simulated:n=2000,sites=5,seed=0'")
        if key in opts:
            raise ValueError(f"option {key!r} given twice in {text!r}")
        opts[key] = _parse_value(value)
    params = inspect.signature(simulate_ct).parameters
    allowed = [k for k, p in params.items()
               if k != "progress" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} in {text!r}; simulate_ct accepts "
                         f"{', '.join(allowed)}")
    if "size" in params and "size" not in opts:
        opts["size"] = image_size
    cp = opts.get("class_probs")
    if isinstance(cp, tuple) and all(isinstance(v, (int, float)) for v in cp):
        # one label mix written a/b/c: the same mix at every site
        n_sites = opts.get("sites", params["sites"].default if "sites" in params else 1)
        if not isinstance(n_sites, int) or not 1 <= n_sites <= 10**6:
            raise ValueError(f"bad simulation option in {text!r}: sites must be an integer from 1 "
                             f"to 1000000, got {n_sites!r}")
        opts["class_probs"] = np.tile(np.asarray(cp, dtype=np.float64), (int(n_sites), 1))
    try:
        ds = simulate_ct(**opts)
    except (TypeError, ValueError) as exc:  # e.g. a text value where a number is needed
        raise ValueError(f"bad simulation option in {text!r}: {exc}") from exc
    if not ds.source:
        ds.source = text
    return ds

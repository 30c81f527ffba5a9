"""The two references every collaborative result is compared with: centralized training on the
pooled data of all institutions, and each institution training alone (local-only). Both are
served from :mod:`medchain.runcache` when the same data, partition, model, recipe, seed and
code ran before (``MEDCHAIN_RUN_CACHE=off`` switches that off)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from torch import nn

from medchain import runcache
from medchain.data.types import ImageSet, InstitutionData
from medchain.metrics import majority_rate
from medchain.models import build_model
from medchain.training import FitResult, TrainConfig, evaluate, fit


@dataclass
class BaselineResult:
    """A trained reference. rows: tidy metric rows (method, institution, split, metric, value...)."""

    method: str
    models: list[nn.Module]
    fits: list[FitResult]
    rows: list[dict] = field(default_factory=list)
    cached: bool = False            # served from medchain.runcache


def pooled_test(institutions: list[InstitutionData]) -> ImageSet:
    """The global test set: every institution's test split, pooled."""
    return ImageSet.concat([inst.test for inst in institutions])


def score_rows(method: str, model: nn.Module, institutions: list[InstitutionData], *,
               institution: int | None = None, **extra) -> list[dict]:
    """Metric rows of `model` on the pooled test set and on each institution's own test split.
    institution: which institution owns the model (-1 / None: a shared model)."""
    rows = [{"method": method, "model_of": -1 if institution is None else institution,
             "eval_on": "pooled", **extra, **evaluate(model, pooled_test(institutions))}]
    for inst in institutions:
        if institution is not None and inst.index != institution:
            continue
        rows.append({"method": method, "model_of": -1 if institution is None else institution,
                     "eval_on": f"inst{inst.index}", **extra, **evaluate(model, inst.test)})
    return rows


def centralized(institutions: list[InstitutionData], model_name: str, n_classes: int,
                cfg: TrainConfig, *, quiet: bool = True) -> BaselineResult:
    """Train one model on the pooled train splits, select on the pooled val splits."""
    def run() -> BaselineResult:
        train = ImageSet.concat([i.train for i in institutions])
        val = ImageSet.concat([i.val for i in institutions])
        model = build_model(model_name, train.n_channels, n_classes, cfg.seed)
        result = fit(model, train, val, cfg, quiet=quiet, desc="centralized", track=pooled_test(institutions))
        return BaselineResult("centralized", [model], [result], score_rows("centralized", model, institutions))
    return _cached("centralized", institutions, model_name, n_classes, cfg, run)


def local_only(institutions: list[InstitutionData], model_name: str, n_classes: int,
               cfg: TrainConfig, *, quiet: bool = True) -> BaselineResult:
    """Each institution trains alone on its own train split and selects on its own val split.
    Scored on the pooled test set and on its own test split."""
    def run() -> BaselineResult:
        models, fits, rows = [], [], []
        test = pooled_test(institutions)
        for inst in institutions:
            model = build_model(model_name, inst.train.n_channels, n_classes, cfg.seed)
            fits.append(fit(model, inst.train, inst.val, cfg, quiet=quiet, desc=f"local {inst.index}",
                            track=test))
            models.append(model)
            rows += score_rows("local_only", model, institutions, institution=inst.index)
            rows.append({"method": "majority", "model_of": inst.index, "eval_on": f"inst{inst.index}",
                         "acc": majority_rate(inst.train.labels, inst.test.labels), "n": len(inst.test)})
        return BaselineResult("local_only", models, fits, rows)
    return _cached("local_only", institutions, model_name, n_classes, cfg, run)


def _cached(method: str, institutions: list[InstitutionData], model_name: str, n_classes: int,
            cfg: TrainConfig, run: Callable[[], BaselineResult]) -> BaselineResult:
    """run(), or its stored result when the run cache holds one for the same key."""
    k, material = runcache.key(method, institutions, model=model_name, n_classes=n_classes, recipe=cfg.to_dict())
    hit = runcache.load(k)
    if hit is None:
        res = run()
        runcache.store(k, {"key": material, "rows": res.rows,
                           "fits": [{"best_epoch": f.best_epoch, "best_val": f.best_val, "history": f.history}
                                    for f in res.fits]},
                       [m.state_dict() for m in res.models])
        return res
    meta, states = hit
    channels = institutions[0].train.n_channels
    models, fits = [], []
    for state, f in zip(states, meta["fits"]):
        model = build_model(model_name, channels, n_classes, cfg.seed)
        model.load_state_dict(state)
        model.eval()                # as evaluate() left the trained one
        models.append(model)
        fits.append(FitResult(model, f["best_epoch"], f["best_val"], f["history"]))
    return BaselineResult(method, models, fits, meta["rows"], cached=True)


def mean_local_only(rows: list[dict]) -> float:
    """Mean over institutions of local-only ACC on the pooled test set."""
    accs = [r["acc"] for r in rows if r["method"] == "local_only" and r["eval_on"] == "pooled"]
    return float(np.mean(accs))

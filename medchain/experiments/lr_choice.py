"""Each claim-1 method's learning rate, chosen on validation data only.

Before the seeds are run, every collaborative method and the centralized reference train once per
candidate factor of their learning rate (``lr_scales``, e.g. [1.0, 2.5]) on a tuning seed that is
not among the reported seeds (its own partition, initialization and shuffling); each keeps the
factor whose selected round (epoch for centralized) scores best on the pooled validation splits
(:func:`medchain.training.selection_key`). Local-only uses the centralized factor (the same plain
training). Test data play no part in the choice.
"""
from __future__ import annotations

from dataclasses import replace

from medchain.baselines import centralized
from medchain.data import Dataset
from medchain.experiments.collaborative import baseline_config, split
from medchain.experiments.methods import method_config, run_method
from medchain.protocol import CollabConfig
from medchain.training import selection_key

__all__ = ["pick_scales", "choose_lr_scales"]


def pick_scales(val: dict[float, dict[str, dict]]) -> dict[str, float]:
    """``val[scale][name]``: validation metrics (acc, loss) of `name` trained at lr × scale →
    {name: the scale with the best selection key} (ties: the scale listed first)."""
    if not val:
        raise ValueError("pick_scales needs validation metrics for at least one learning-rate scale")
    names = list(next(iter(val.values())))
    out = {}
    for name in names:
        best = None
        for scale, metrics in val.items():
            if best is None or selection_key(metrics[name]) > selection_key(val[best][name]):
                best = scale
        out[name] = float(best)
    return out


def choose_lr_scales(dataset: Dataset, scheme: str, cfg: CollabConfig, scales: list[float], *,
                     seed: int, methods: list[str], institutions: int = 5, alpha: float = 0.5,
                     centralized_epochs: int | None = None, chain: str | None = "embedded",
                     quiet: bool = True) -> dict:
    """Train centralized and each method at lr × every scale on tuning seed `seed`; return
    {"seed", "scales", "chosen": {name: scale} (names: "centralized" and the methods),
    "val_acc": {name: {scale: validation ACC}}}. One scale: nothing is trained, it is chosen."""
    scales = [float(s) for s in dict.fromkeys(scales)]
    if not scales or any(not s > 0 for s in scales):
        raise ValueError(f"lr_scales must be positive factors of the learning rate, got {scales}")
    names = ["centralized", *dict.fromkeys(methods)]
    if len(scales) == 1:
        return {"seed": None, "scales": scales, "chosen": {n: scales[0] for n in names}, "val_acc": {}}
    for m in methods:
        method_config(cfg, m)                              # unknown method: fail before training
    tune = replace(cfg, seed=seed)
    insts = split(dataset, scheme, institutions=institutions, alpha=alpha, seed=seed)
    epochs = centralized_epochs or cfg.rounds * cfg.local_epochs
    val: dict[float, dict[str, dict]] = {}
    for s in scales:
        cen = centralized(insts, cfg.model, dataset.n_classes, baseline_config(tune, epochs, s), quiet=quiet)
        val[s] = {"centralized": cen.fits[0].best_val}
        for m in methods:
            val[s][m] = run_method(m, insts, dataset.n_classes, tune, chain=chain, quiet=quiet, lr_scale=s).val
    return {"seed": seed, "scales": scales, "chosen": pick_scales(val),
            "val_acc": {n: {s: float(val[s][n]["acc"]) for s in scales} for n in names}}

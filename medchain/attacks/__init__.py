"""Leakage attacks on what the chain reveals (breaching-style: *cases* and *attacks* apart).

Gradient inversion (:mod:`medchain.attacks.inversion`)
    An :class:`InversionCase` builds a threat setting — ``worst_case`` (one image, one gradient
    step, untrained sigmoid LeNet) or ``protocol`` (an institution's real local update of E epochs
    over B images with the trained CNN) — and returns the on-chain payload (bytes, encoded with
    :mod:`medchain.codec` after partial-update selection, :mod:`medchain.privacy`) plus the public
    task information a chain member knows. :func:`invert` reads only those two: it decodes the
    payload exactly as any chain member does and runs DLG, iDLG or Inverting Gradients, as a
    ``naive`` or ``mask_aware`` attacker; the case's private images only score the result.

Membership inference (:mod:`medchain.attacks.membership`)
    :func:`loss_attack` (Yeom et al. 2018) and :func:`lira_attack` (LiRA, Carlini et al. 2022) on a
    shared model; both return :class:`MIAResult` (AUC, TPR at 1 % and 0.1 % FPR).

Byzantine members (:mod:`medchain.attacks.byzantine`)
    :func:`byzantine_select` makes the malicious update values a hostile member uploads in drills
    (``signflip``, ``scale``, ``random``, ``huge``); :func:`parse_drill` and
    :func:`check_byzantine` read and check drill specs such as ``"signflip:5+withhold-blob"``.

The names below load their submodule on first use: a node process that only needs the Byzantine
drills (numpy) does not load the attacks' scikit-learn and scipy.

>>> case = InversionCase.worst_case(image, label, num_classes=3, theta_u=0.1)   # doctest: +SKIP
>>> rec = invert(case.payload, case, method="ig", attacker="mask_aware")       # doctest: +SKIP
>>> rec.metrics["psnr"], rec.metrics["ssim"]                                     # doctest: +SKIP
"""
import importlib

_EXPORTS = {
    "inversion": ("ATTACKERS", "METHODS", "InversionCase", "NothingToInvert", "PublicInfo", "Reconstruction",
                  "decode_target", "invert", "recover_labels"),
    "membership": ("MIAResult", "lira_attack", "lira_scores", "logit_confidence", "loss_attack", "mia_metrics",
                   "per_example_loss"),
    "byzantine": ("ATTACKS", "BEHAVIOURS", "byzantine_select", "parse_drill", "check_byzantine"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [name for names in _EXPORTS.values() for name in names]


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

"""DP-SGD for an institution's local training (Abadi et al. 2016), with Opacus.

Each institution trains its own model with per-sample gradient clipping (``max_grad_norm``) and
Gaussian noise (``noise_multiplier`` × ``max_grad_norm``) on Poisson-sampled batches, so what it
posts — every round's update, whatever part of it is shared — is (ε, δ)-DP with respect to its
own training set (post-processing). The privacy unit is one training image of that institution.

:func:`plan` calibrates the noise multiplier with Opacus's RDP accountant so that the whole task
(``rounds × local_epochs`` epochs, sample rate ``1 / ceil(n / batch_size)``) spends the task's
ε at δ = 1/n (n = the institution's training-set size, the sample count its updates report on
chain) — every number it uses is on chain. :func:`dp_train_epochs` trains and charges each step
to the institution's accountant, whose ε at the end of the task is the ε on chain
(tests/test_dp.py checks it).

Per-sample gradients need a model without BatchNorm: claim 2's DP tasks use the ``cnn_tanh``
(Papernot et al. 2021; the GroupNorm ``cnn_gn`` works too but does not learn in the task's budget).
The noise is drawn from a seeded generator so that runs are reproducible (Opacus's
``secure_mode=False``); the attacks never use that seed, but a deployment should draw it securely.
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medchain.data.types import ImageSet
from medchain.training import TrainConfig, make_optimizer, step_lr, to_tensor

__all__ = ["DPPlan", "plan", "new_accountant", "dp_train_epochs", "check_dp_model"]


@dataclass(frozen=True)
class DPPlan:
    """One institution's DP-SGD budget for a whole task. epsilon: what the accountant reports for
    ``noise_multiplier`` over ``steps`` steps at ``sample_rate`` (≤ the target, within Opacus's
    0.01 search tolerance); delta: 1/n unless the task fixes it."""

    target_epsilon: float
    epsilon: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    n: int


def new_accountant():
    """A fresh RDP accountant (Opacus; Mironov 2017, with Poisson subsampling)."""
    from opacus.accountants import RDPAccountant
    return RDPAccountant()


def plan(target_epsilon: float, n: int, *, batch_size: int, rounds: int, local_epochs: int,
         max_grad_norm: float, delta: float | None = None) -> DPPlan:
    """Noise multiplier reaching ``target_epsilon`` at δ (default 1/n) after the task's steps:
    ``rounds × local_epochs × ceil(n / batch_size)`` steps at sample rate ``1 / ceil(n / batch_size)``
    (Opacus's Poisson loader of a ``batch_size`` loader). Memoized: Opacus's noise search takes
    seconds at a few steps and a large sample rate, and every institution of a task (and every
    shadow of the update attack) with the same n asks the same question; the plan is frozen."""
    return _plan(target_epsilon, n, batch_size, rounds, local_epochs, max_grad_norm, delta)


@functools.lru_cache(maxsize=256)
def _plan(target_epsilon, n, batch_size, rounds, local_epochs, max_grad_norm, delta) -> DPPlan:
    from opacus.accountants.utils import get_noise_multiplier

    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"DP-SGD needs a finite epsilon > 0, got {target_epsilon!r}")
    if n < 1:
        raise ValueError(f"DP-SGD needs a non-empty training set, got n={n}")
    delta = 1.0 / n if delta is None else float(delta)
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    per_epoch = max(1, math.ceil(n / batch_size))
    q, steps = 1.0 / per_epoch, rounds * local_epochs * per_epoch
    sigma = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=q,
                                 steps=steps, accountant="rdp")
    acc = new_accountant()
    acc.history = [(sigma, q, steps)]
    return DPPlan(float(target_epsilon), float(acc.get_epsilon(delta)), delta, float(sigma),
                  float(max_grad_norm), q, steps, int(n))


def check_dp_model(model: nn.Module, name: str) -> None:
    """Refuse a model Opacus cannot give per-sample gradients for (BatchNorm mixes the images of
    a batch), naming the fix."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(f"model {name!r} cannot train with DP-SGD ({str(errors[0]).split('.')[0]}); use model 'cnn_tanh' "
                         "(the DP literature's tanh CNN) or 'cnn_gn' (the cnn with GroupNorm)")


def dp_train_epochs(model: nn.Module, data: ImageSet, cfg: TrainConfig, dp: DPPlan, accountant, *,
                    lr_range: tuple[float, float] | None = None, seed: int | None = None) -> dict:
    """Train ``model`` in place for ``cfg.epochs`` epochs of DP-SGD (Poisson batches of expected
    size ``cfg.batch_size``, clipping at ``dp.max_grad_norm``, noise ``dp.noise_multiplier``), with
    cfg's optimizer and the cosine ``lr_range`` of :func:`medchain.training.train_epochs`. Every
    step is charged to ``accountant``. Deterministic for a seed (sampling and noise generators).
    Returns {"loss", "steps"}."""
    from opacus import PrivacyEngine

    if len(data) == 0:
        raise ValueError("cannot train on an empty ImageSet")
    seed = cfg.seed if seed is None else seed
    ds = TensorDataset(to_tensor(data.images), torch.from_numpy(data.labels.astype(np.int64)))
    loader = DataLoader(ds, batch_size=cfg.batch_size, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # Opacus warns about secure_mode=False (seeded noise is wanted here)
        engine = PrivacyEngine(accountant="rdp")
        engine.accountant = accountant
        gsm, opt, dl = engine.make_private(
            module=model, optimizer=make_optimizer(model.parameters(), cfg), data_loader=loader,
            noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm, poisson_sampling=True,
            noise_generator=torch.Generator().manual_seed(seed * 2 + 1))
    lr0, lr1 = lr_range if lr_range is not None else (cfg.lr, cfg.lr)
    total = cfg.epochs * len(dl)
    loss_fn, losses, step = nn.CrossEntropyLoss(), [], 0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")   # inputs need no grad
        try:
            for _ in range(cfg.epochs):
                for xb, yb in dl:
                    lr = step_lr((lr0, lr1), step, total)
                    for g in opt.param_groups:
                        g["lr"] = lr
                    opt.zero_grad(set_to_none=True)
                    loss = loss_fn(gsm(xb), yb)
                    loss.backward()
                    opt.step()
                    if len(yb):
                        losses.append(float(loss.detach()))
                    step += 1
        finally:
            gsm._close()     # remove Opacus's hooks: ``model`` is a plain module again
    return {"loss": float(np.mean(losses)) if losses else 0.0, "steps": step}

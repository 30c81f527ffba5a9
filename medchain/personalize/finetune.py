"""Local fine-tuning of the global model on one institution's train split, the epoch selected on
its validation split by the metric it is judged on (:func:`finetune`)."""
from __future__ import annotations

import copy
import fnmatch
import types
from dataclasses import asdict, dataclass
from typing import Iterable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from medchain.data.types import ImageSet, InstitutionData
from medchain.personalize.choices import HEAD_PATTERNS, SELECT_METRICS
from medchain.training import FitResult, TrainConfig, cosine_lr, evaluate, selection_key, train_epochs


@dataclass
class FinetuneConfig:
    """Local fine-tuning. head_only: train only the tensors matching ``head_patterns`` and keep
    the rest (BatchNorm statistics included) frozen. keep_start: the start model competes in the
    validation selection as "epoch 0" (fine-tuning can then never look worse on validation than
    not fine-tuning). lr follows a cosine decay to lr·lr_floor over the epochs.
    select: the validation metric that picks the epoch, ``"acc"`` or ``"balanced_acc"`` (ties:
    lower validation loss) — the metric the result will be judged on.
    from_prior: start from a *prior-corrected* global model — a label-prior shift (given to
    :func:`finetune`; the one matching `select`: :func:`prior_shift` of the local prior for ACC,
    of the uniform prior for balanced ACC) is added to the head's bias, which for a linear head is
    exactly the logit adjustment — so that fine-tuning is measured beyond label-mix adaptation."""

    epochs: int = 5
    lr: float = 5e-4
    head_only: bool = False
    batch_size: int = 64
    optimizer: str = "adam"
    weight_decay: float = 0.0
    lr_floor: float = 0.05
    keep_start: bool = True
    from_prior: bool = False
    head_patterns: tuple[str, ...] = HEAD_PATTERNS
    seed: int = 0
    select: str = "acc"

    def __post_init__(self):
        if self.select not in SELECT_METRICS:
            raise ValueError(f"FinetuneConfig.select must be one of {SELECT_METRICS}, got {self.select!r}")
        if self.epochs < 0:
            raise ValueError(f"FinetuneConfig.epochs must be >= 0, got {self.epochs}")

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                           optimizer=self.optimizer, weight_decay=self.weight_decay,
                           schedule="cosine", lr_floor=self.lr_floor, seed=self.seed)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["head_patterns"] = list(self.head_patterns)
        return d


@dataclass
class FinetuneResult:
    """model: the fine-tuned copy (the start model is untouched). best_epoch: 0 when the start
    model won the validation selection. fit: training.fit's result (None for epochs = 0)."""

    model: nn.Module
    best_epoch: int
    val: dict
    start_val: dict
    fit: FitResult | None = None


def add_to_head_bias(model: nn.Module, shift) -> None:
    """In place: ``model.head.bias += shift`` (K,) — the logit adjustment folded into the model."""
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear) or head.bias is None:
        raise ValueError("folding a label-prior shift into the model needs a linear `head` with a bias")
    s = torch.as_tensor(np.asarray(shift, dtype=np.float64), dtype=head.bias.dtype)
    if s.shape != head.bias.shape or not torch.isfinite(s).all():
        raise ValueError(f"shift must be finite with shape {tuple(head.bias.shape)}, got {tuple(s.shape)}")
    with torch.no_grad():
        head.bias.add_(s)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _pin_eval(module: nn.Module) -> None:
    """Keep `module` in eval mode even when its parent calls .train() (frozen BatchNorm)."""
    module.train = types.MethodType(lambda self, mode=True: nn.Module.train(self, False), module)
    module.eval()


def _freeze_body(model: nn.Module, head_patterns: Iterable[str]) -> tuple[list[nn.Module], dict[str, bool]]:
    """requires_grad only for head tensors; BatchNorm layers outside the head pinned to eval.
    Returns what :func:`_unfreeze` needs to undo it (pinned modules, previous requires_grad)."""
    heads = tuple(head_patterns)
    trainable = [n for n, p in model.named_parameters() if _matches(n, heads)]
    if not trainable:
        names = [n for n, _ in model.named_parameters()]
        raise ValueError(f"head patterns {list(heads)} match no parameter; names are {names[:8]}…")
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(before[n] and _matches(n, heads))
    pinned = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not _matches(name + ".weight", heads):
            _pin_eval(m)
            pinned.append(m)
    return pinned, before


def _unfreeze(model: nn.Module, frozen: tuple[list[nn.Module], dict[str, bool]] | None) -> None:
    if frozen is not None:
        pinned, before = frozen
        for m in pinned:
            del m.train          # back to nn.Module.train
        for n, p in model.named_parameters():
            p.requires_grad_(before[n])
    model.eval()


@dataclass
class Selection:
    """What :func:`fit_selecting` kept. best: metric → (epoch, validation metrics, state_dict)
    of that metric's best epoch (ties: lower validation loss; epoch 0 only when no epoch ran).
    history: one row per epoch, as :func:`medchain.training.fit`'s."""

    best: dict[str, tuple[int, dict, dict]]
    history: list[dict]

    def load(self, model: nn.Module, metric: str) -> nn.Module:
        """A copy of `model` holding `metric`'s best weights, in eval mode."""
        out = copy.deepcopy(model)
        out.load_state_dict(self.best[metric][2])
        return out.eval()


def fit_selecting(model: nn.Module, train: ImageSet, val: ImageSet, tcfg: TrainConfig,
                  selects: Iterable[str] = SELECT_METRICS, *, quiet: bool = True,
                  desc: str = "fit") -> Selection:
    """Train `model` in place for ``tcfg.epochs`` as :func:`medchain.training.fit` does (same
    cosine schedule, same shuffling seeds, so with selects=("acc",) the same best epoch and
    weights), but keep the best epoch for *each* validation metric in `selects` (ACC and/or
    balanced ACC; ties: lower loss). The model ends with its last epoch's weights."""
    selects = tuple(selects)
    bad = [m for m in selects if m not in SELECT_METRICS]
    if bad or not selects:
        raise ValueError(f"selects must be a non-empty subset of {SELECT_METRICS}, got {selects}")
    total = max(tcfg.epochs, 1)
    per_epoch = TrainConfig(**{**tcfg.to_dict(), "epochs": 1})
    best: dict[str, tuple[int, dict, dict]] = {}
    keys: dict[str, tuple] = {}
    history = []
    if tcfg.epochs == 0:
        m = evaluate(model, val)
        state = copy.deepcopy(model.state_dict())
        return Selection({s: (0, m, state) for s in selects}, history)
    for epoch in tqdm(range(tcfg.epochs), desc=desc, disable=quiet, leave=False):
        if tcfg.schedule == "cosine":
            lr_range = (cosine_lr(tcfg.lr, epoch, total, tcfg.lr_floor),
                        cosine_lr(tcfg.lr, epoch + 1, total, tcfg.lr_floor))
        else:
            lr_range = (tcfg.lr, tcfg.lr)
        stats = train_epochs(model, train, per_epoch, lr_range=lr_range, seed=tcfg.seed * 1000 + epoch)
        m = evaluate(model, val)
        history.append({"epoch": epoch + 1, "lr": lr_range[0], "train_loss": stats["loss"],
                        **{f"val_{k}": v for k, v in m.items()}})
        state = None
        for s in selects:
            key = selection_key(m, s)
            if s not in keys or key > keys[s]:
                state = state if state is not None else copy.deepcopy(model.state_dict())
                keys[s], best[s] = key, (epoch + 1, m, state)
    return Selection(best, history)


def finetune(model: nn.Module, inst: InstitutionData, cfg: FinetuneConfig, *, quiet: bool = True,
             shift=None) -> FinetuneResult:
    """Fine-tune a copy of `model` on ``inst.train``; select the epoch on ``inst.val`` by
    ``cfg.select`` (ties: lower loss), the start model included when ``cfg.keep_start``.
    Deterministic by cfg.seed (the institution's index is mixed in, so institutions shuffle
    differently); with select="acc" it trains and selects exactly as :func:`medchain.training.fit`.
    shift: the label-prior shift (K,) matching ``cfg.select``, required when ``cfg.from_prior``
    (see :func:`prior_shift`); added to the bias of the model's ``head`` (an ``nn.Linear``)."""
    tuned = copy.deepcopy(model)
    if cfg.from_prior:
        if shift is None:
            raise ValueError("from_prior=True needs the institution's label-prior shift (shift=...)")
        add_to_head_bias(tuned, shift)
    start_val = evaluate(tuned, inst.val)
    start_state = copy.deepcopy(tuned.state_dict())
    frozen = _freeze_body(tuned, cfg.head_patterns) if cfg.head_only else None
    tcfg = cfg.train_config()
    tcfg.seed = cfg.seed * 1_000 + 7 * inst.index + 1
    key = lambda m: selection_key(m, cfg.select)
    try:
        sel = fit_selecting(tuned, inst.train, inst.val, tcfg, (cfg.select,), quiet=quiet,
                            desc=f"fine-tune {'head' if cfg.head_only else 'all'} {inst.index}")
    finally:
        _unfreeze(tuned, frozen)
    result = None
    best_epoch, best_val = 0, start_val
    if cfg.epochs > 0:
        best_epoch, best_val, state = sel.best[cfg.select]
        tuned.load_state_dict(state)
        result = FitResult(tuned, best_epoch, best_val, sel.history)
    if cfg.keep_start and key(start_val) >= key(best_val):
        tuned.load_state_dict(start_state)
        best_epoch, best_val = 0, start_val
    return FinetuneResult(tuned, best_epoch, best_val, start_val, result)

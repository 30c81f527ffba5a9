"""Personalized models per institution, after (or during) collaborative training — claim 4.

Every method ends with one model per institution, scored on that institution's own test split.

Methods
-------
``finetune_all`` / ``finetune_head``
    Local fine-tuning of the final global model on the institution's own train split (all layers,
    or only the classifier head with the feature extractor frozen — its BatchNorm statistics
    included), selecting the epoch on the institution's validation split by the metric it is
    judged on (:func:`finetune`; one model per metric).
    Nothing is communicated.
``fedper``
    FedPer (Arivazhagan et al., 2019): the classifier head (``head.*``) stays local *during*
    collaborative training — it is never uploaded, never overwritten by the global model
    (:class:`medchain.protocol.Institution`'s ``local_mask``), see :func:`run_local_mask`.
``fedbn``
    FedBN (Li et al., ICLR 2021): every BatchNorm layer (affine weights and running statistics)
    stays local in the same way.

References
----------
``majority`` (the institution's training majority class), ``local_only`` (the institution alone),
``global`` (the collaborative model as is) and two no-training *label-prior corrections* of the
global model (logit adjustment, Menon et al. 2021), one per metric:

``global_prior``
    add ``log p_local(y) − log p_train(y)`` to the logits, where ``p_local`` are the institution's
    training label frequencies and ``p_train`` those of all institutions' training data pooled
    (what the global model learnt). The Bayes rule for the institution's own label mix: it
    maximizes plain **ACC**, and can lower balanced ACC.
``global_uniform``
    subtract ``log p_train(y)`` (the target prior is uniform): the Bayes rule for **balanced ACC**
    (the mean per-class recall), which weighs every class equally whatever the local mix.

Both need no images, only K class counts per institution. Under label skew most of a
personalization gain can be this label-mix adaptation alone, so each metric is judged against its
matching correction (:data:`MATCHING_REFERENCE`), and each personalization method is selected on
the validation metric it is judged on.

Balanced ACC of a test split holding one class is the accuracy on that class (a majority vote
scores 1.0); :func:`split_metrics` reports NaN there and records ``classes_in_test``.

"Stays local" is checked on the chain itself: :func:`audit_local_only` decodes every payload of
every round from the ledger and the blob store and proves that no local-only coordinate was
ever shared, and that each institution's personal model carries its own local values.
"""
from __future__ import annotations

import copy
import fnmatch
import types
from dataclasses import asdict, dataclass, field, replace
from typing import Iterable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from medchain import codec
from medchain.blobstore import fetch_payload
from medchain.data.types import ImageSet, InstitutionData
from medchain.metrics import classification_metrics
from medchain.models import build_model
from medchain.params import Layout, mask_for_module_types, model_vector, select_names
from medchain.training import (FitResult, TrainConfig, cosine_lr, evaluate, selection_key, to_tensor,
                               train_epochs)

__all__ = [
    "METHODS", "REFERENCES", "HEAD_PATTERNS",
    "MATCHING_REFERENCE", "SELECT_METRICS",
    "label_frequencies", "prior_shift", "adjust_logits", "LogitAdjusted", "prior_corrected",
    "uniform_corrected", "split_metrics", "undefined_balanced", "majority_metrics",
    "Selection", "fit_selecting", "FinetuneConfig", "FinetuneResult", "finetune", "add_to_head_bias",
    "local_mask_for", "run_local_mask", "personal_models",
    "LocalOnlyAudit", "audit_local_only",
]

#: Personalization methods (each gives one model per institution).
METHODS: tuple[str, ...] = ("finetune_all", "finetune_head", "fedper", "fedbn")
#: References every method is compared with.
REFERENCES: tuple[str, ...] = ("majority", "local_only", "global", "global_prior", "global_uniform")
#: The metrics a method can be selected on and judged by.
SELECT_METRICS: tuple[str, ...] = ("acc", "balanced_acc")
#: Each metric's no-training reference: the label-prior correction that is Bayes-optimal for it.
MATCHING_REFERENCE: dict[str, str] = {"acc": "global_prior", "balanced_acc": "global_uniform"}
#: Tensor-name patterns of the classifier head (every medchain model names it ``head``).
HEAD_PATTERNS: tuple[str, ...] = ("head.*",)


# ============================================================================================
# label-prior correction (logit adjustment): no training
# ============================================================================================
def label_frequencies(labels, n_classes: int, smoothing: float = 1.0) -> np.ndarray:
    """Class frequencies float64 ``(n_classes,)`` of int labels ``(N,)``, with additive
    (Laplace) smoothing: ``(count_c + smoothing) / (N + K·smoothing)``.

    smoothing > 0 keeps a class that an institution never saw at a finite log-frequency; with
    smoothing = 0 an absent class has frequency 0 (log = −inf: it is never predicted).
    """
    y = np.asarray(labels).astype(np.int64).ravel()
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}), found [{y.min()}, {y.max()}]")
    if smoothing < 0 or not np.isfinite(smoothing):
        raise ValueError(f"smoothing must be a finite number >= 0, got {smoothing}")
    counts = np.bincount(y, minlength=n_classes).astype(np.float64) + float(smoothing)
    total = counts.sum()
    if total <= 0:
        raise ValueError("no labels and no smoothing: the frequencies are undefined")
    return counts / total


def prior_shift(local_freq, global_freq) -> np.ndarray:
    """The logit offset ``log local_freq − log global_freq``, float64 ``(K,)``.

    A class absent locally (frequency 0) gets −inf; a class absent from the global data
    (frequency 0) is an error (the global model never learnt it, there is nothing to correct)."""
    lf, gf = np.asarray(local_freq, np.float64), np.asarray(global_freq, np.float64)
    if lf.shape != gf.shape or lf.ndim != 1:
        raise ValueError(f"local and global frequencies must be (K,) vectors of equal length, "
                         f"got {lf.shape} and {gf.shape}")
    if (lf < 0).any() or (gf <= 0).any():
        raise ValueError("frequencies must be >= 0 locally and > 0 globally")
    with np.errstate(divide="ignore"):
        return np.log(lf) - np.log(gf)


def adjust_logits(logits, local_freq, global_freq) -> np.ndarray:
    """Label-prior corrected logits float64 ``(N, K)``: ``logits + log local − log global``."""
    z = np.asarray(logits, dtype=np.float64)
    shift = prior_shift(local_freq, global_freq)
    if z.ndim != 2 or z.shape[1] != shift.shape[0]:
        raise ValueError(f"logits must be (N, {shift.shape[0]}), got {z.shape}")
    return z + shift[None, :]


class LogitAdjusted(nn.Module):
    """``model`` whose logits are shifted by a fixed per-class offset (a buffer ``shift``, (K,)).
    Shares (does not copy) the wrapped model's weights."""

    def __init__(self, model: nn.Module, shift):
        super().__init__()
        self.model = model
        s = torch.as_tensor(np.asarray(shift, dtype=np.float64), dtype=torch.float32)
        self.register_buffer("shift", s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) + self.shift


def prior_corrected(model: nn.Module, local_labels, global_labels, n_classes: int, *,
                    smoothing: float = 1.0) -> LogitAdjusted:
    """The global ``model`` corrected to an institution's label prior (``global_prior``, for ACC;
    see module docstring). local_labels: the institution's training labels; global_labels: all
    institutions' training labels pooled (in a deployment: the sum of every institution's K
    class counts)."""
    shift = prior_shift(label_frequencies(local_labels, n_classes, smoothing),
                        label_frequencies(global_labels, n_classes, smoothing))
    return LogitAdjusted(model, shift)


def uniform_corrected(model: nn.Module, global_labels, n_classes: int, *,
                      smoothing: float = 1.0) -> LogitAdjusted:
    """The global ``model`` with the training prior removed (``global_uniform``, for balanced
    ACC): logits ``+ log(1/K) − log p_train``; the constant ``log(1/K)`` changes no decision and
    no probability. The same for every institution."""
    uniform = np.full(n_classes, 1.0 / n_classes)
    return LogitAdjusted(model, prior_shift(uniform, label_frequencies(global_labels, n_classes, smoothing)))


def undefined_balanced(metrics: dict, labels) -> dict:
    """`metrics` (a :func:`medchain.metrics.classification_metrics` dict of the split whose int
    labels are `labels`) with ``classes_in_test`` (how many classes occur) and ``balanced_acc``
    set to NaN when fewer than two occur: over one class balanced ACC is that class's recall (a
    majority vote scores 1.0), not a balanced measure. Over >= 2 present classes it is the mean
    recall of the classes present (scikit-learn drops classes absent from the labels)."""
    present = int(np.unique(np.asarray(labels)).size)
    out = {**metrics, "classes_in_test": present}
    if present < 2:
        out["balanced_acc"] = float("nan")
    return out


def split_metrics(model: nn.Module, data: ImageSet) -> dict:
    """:func:`medchain.training.evaluate` of `model` on `data`, through :func:`undefined_balanced`."""
    return undefined_balanced(evaluate(model, data), data.labels)


def majority_metrics(train_labels, test_labels, n_classes: int) -> dict[str, float]:
    """Metrics of always predicting the training majority class (ACC = the majority rate;
    balanced ACC = 1 / #classes in the test split if that class occurs there, else 0, and NaN
    when the split holds one class; AUC 0.5), with ``classes_in_test``."""
    maj = int(np.bincount(np.asarray(train_labels).astype(np.int64), minlength=n_classes).argmax())
    y = np.asarray(test_labels).astype(np.int64)
    proba = np.zeros((y.size, n_classes))
    proba[:, maj] = 1.0
    return undefined_balanced(classification_metrics(y, proba), y)


# ============================================================================================
# (a) local fine-tuning of the global model
# ============================================================================================
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


# ============================================================================================
# (b) FedPer and (c) FedBN: coordinates that stay local during collaborative training
# ============================================================================================
def local_mask_for(method: str, layout: Layout, *, head_patterns: Iterable[str] = HEAD_PATTERNS) -> np.ndarray:
    """bool ``(P,)`` of the coordinates that stay local: ``"fedper"`` the head's tensors
    (``head_patterns``), ``"fedbn"`` every BatchNorm weight, bias and running statistic."""
    if method == "fedper":
        mask = select_names(layout, include=tuple(head_patterns), strict=True)
    elif method == "fedbn":
        mask = mask_for_module_types(layout)
        if not mask.any():
            raise ValueError("fedbn: the model has no BatchNorm layer, nothing can stay local")
    else:
        raise ValueError(f"unknown local-mask method {method!r}; choose 'fedper' or 'fedbn'")
    if mask.all():
        raise ValueError(f"{method}: every coordinate would stay local, nothing would be shared")
    return mask


def run_local_mask(institutions: list[InstitutionData], n_classes: int, cfg, method: str, *,
                   chain: str | None = "embedded", store=None, quiet: bool = True,
                   initial_model: nn.Module | None = None):
    """Collaborative training (:func:`medchain.protocol.run_collaborative`) under the policy
    ``cfg`` with ``keep_local=method``: every institution keeps the coordinates of
    :func:`local_mask_for` local. Returns ``(CollabResult, mask)``; the personal models are
    :func:`personal_models` (result).

    initial_model: start from these weights (e.g. the final FedAvg model: personalization
    *after* collaborative training, ``cfg.rounds`` more rounds) instead of a fresh ``cfg.model``
    drawn from ``cfg.seed`` (personalization *during* collaborative training, from scratch).
    Note: ``result.model`` (the "global" model) keeps the *initial* values at the local
    coordinates — nobody shares them — so it is not a model anyone should use."""
    from medchain.protocol import run_collaborative
    cfg = replace(cfg, keep_local=method)
    result = run_collaborative(institutions, n_classes, cfg, chain=chain, store=store, quiet=quiet,
                               initial_model=initial_model)
    return result, local_mask_for(method, result.institutions[0].layout)


def personal_models(result) -> list[nn.Module]:
    """Each institution's deployable model after a run (its own copy): the global weights with
    its local-only coordinates (if any) in place."""
    return [copy.deepcopy(inst.personal_model()).eval() for inst in result.institutions]


@dataclass
class LocalOnlyAudit:
    """What the chain shows about a run with local-only coordinates.

    rounds / payloads: rounds read and update payloads decoded (every one verified against its
    on-chain digest). local_coordinates: |mask|. shared_local: how many times a local-only
    coordinate appeared in a payload (must be 0). shared_union: coordinates shared at least once.
    union_is_complement: the shared coordinates are exactly the non-local ones.
    global_local_unchanged: the aggregated global model still holds the initial values at the
    local coordinates. personal_uses_local: every institution's personal model holds its own
    local values there (and the global values elsewhere). personal_distinct: institutions' local
    values differ from each other and from the initial ones.
    """

    rounds: int
    payloads: int
    senders: int
    local_coordinates: int
    shared_local: int
    shared_union: int
    union_is_complement: bool
    global_local_unchanged: bool
    personal_uses_local: bool
    personal_distinct: bool
    payload_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.shared_local == 0 and self.union_is_complement and self.global_local_unchanged
                and self.personal_uses_local and self.personal_distinct and self.payloads > 0)

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def audit_local_only(result, mask: np.ndarray, *, ledger=None, store=None,
                     initial_model: nn.Module | None = None) -> LocalOnlyAudit:
    """Decode EVERY update payload of every round of a finished run from the ledger
    (``ledger.updates(r)`` → :func:`medchain.blobstore.fetch_payload`, which verifies the
    on-chain digest → :func:`medchain.codec.decode_update`) and check that no coordinate of
    `mask` was ever shared; then check each institution's personal model (see
    :class:`LocalOnlyAudit`). ledger / store default to the first institution's; initial_model:
    the run's initial model (default: a fresh ``cfg.model`` from ``cfg.seed``, as the protocol
    builds it)."""
    insts = result.institutions
    ledger = ledger if ledger is not None else insts[0].ledger
    store = store if store is not None else insts[0].store
    layout: Layout = insts[0].layout
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (layout.size,):
        raise ValueError(f"mask has shape {mask.shape}, expected ({layout.size},)")
    shared = np.zeros(layout.size, dtype=bool)
    payloads = shared_local = nbytes = 0
    senders: set[str] = set()
    rounds = len(result.history)
    for r in range(rounds):
        for rec in ledger.updates(r):
            payload = fetch_payload(rec.digest, rec.payload, store)
            dec = codec.decode_update(payload, expected_layout_id=layout.layout_id,
                                      expected_size=layout.size)
            shared_local += int(mask[dec.indices].sum())
            shared[dec.indices] = True
            payloads += 1
            nbytes += len(payload)
            senders.add(rec.sender)
    cfg = insts[0].cfg
    if initial_model is None:
        n_classes = _output_dim(insts[0].model, insts[0].data.train)
        initial_model = build_model(cfg.model, insts[0].data.train.n_channels, n_classes, cfg.seed)
    init = model_vector(initial_model, layout)
    glob = insts[0].global_vec
    global_unchanged = bool(np.array_equal(glob[mask], init[mask]))
    uses_local, notes = True, []
    locals_ = []
    for inst in insts:
        pers = model_vector(inst.personal_model(), layout)
        own = bool(np.array_equal(pers[mask], inst.local_vec[mask]))
        rest = bool(np.array_equal(pers[~mask], inst.global_vec[~mask]))
        if not (own and rest):
            uses_local = False
            notes.append(f"institution {inst.index}: personal model "
                         f"{'lacks its local values' if not own else 'differs from the global model outside the mask'}")
        locals_.append(pers[mask])
    distinct = all(not np.array_equal(a, init[mask]) for a in locals_) and \
        all(not np.array_equal(locals_[i], locals_[j]) for i in range(len(locals_)) for j in range(i))
    return LocalOnlyAudit(rounds, payloads, len(senders), int(mask.sum()), shared_local,
                          int(shared.sum()), bool(np.array_equal(shared, ~mask)), global_unchanged,
                          uses_local, distinct, nbytes, notes)


def _output_dim(model: nn.Module, data: ImageSet) -> int:
    """Number of logits `model` produces (a forward pass on two images, in eval mode)."""
    probe = copy.deepcopy(model).eval()
    with torch.no_grad():
        return int(probe(to_tensor(data.images[:2])).shape[1])

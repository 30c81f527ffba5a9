"""Local training and evaluation, shared by the baselines, the chain protocol, transfer and
personalization (one training loop for all of them).

Images arrive as uint8 ImageSets and become float32 tensors (N, C, H, W) scaled to [-1, 1].
Training is deterministic for a given seed, thread count and torch build.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from medchain.data.types import ImageSet
from medchain.metrics import classification_metrics
from medchain.optim import OPTIMIZERS, FusedOptimizer, fused_available



@dataclass
class TrainConfig:
    """Hyper-parameters of one training run. lr follows a cosine decay to lr*lr_floor over the
    run's steps unless schedule == "constant"."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9          # SGD only
    weight_decay: float = 0.0
    schedule: str = "cosine"       # "cosine" or "constant"
    lr_floor: float = 0.01
    seed: int = 0

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {OPTIMIZERS}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"unknown schedule {self.schedule!r}; choose 'cosine' or 'constant'")
        if self.epochs < 0 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"need epochs >= 0, batch_size >= 1, lr > 0; got {self.epochs}, "
                             f"{self.batch_size}, {self.lr}")

    def to_dict(self) -> dict:
        return asdict(self)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C) → float32 (N, C, H, W) in [-1, 1]."""
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(images))
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return x.float().div_(127.5).sub_(1.0).contiguous()


def cosine_lr(base: float, step: int, total: int, floor: float = 0.01) -> float:
    """Cosine decay from base (step 0) to base*floor (step total)."""
    if total <= 0:
        return base
    t = min(max(step / total, 0.0), 1.0)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def step_lr(lr_range: tuple[float, float], step: int, total: int) -> float:
    """The lr of step `step` of `total` steps: cosine from lr_range[0] (first step) to
    lr_range[1] (last step); constant when both are equal."""
    lr0, lr1 = lr_range
    return lr0 if lr0 == lr1 else lr1 + (lr0 - lr1) * 0.5 * (1 + math.cos(math.pi * step / max(total - 1, 1)))


def make_optimizer(params, cfg: TrainConfig):
    """cfg's optimizer: :class:`medchain.optim.FusedOptimizer` — torch's fused kernels (one kernel
    per step over all tensors: on CPU about 3x faster than the default per-tensor loop;
    deterministic), called without torch.optim's wrapper, which imports torch._dynamo (~0.8 s CPU,
    ~70 MB per process); its steps equal torch.optim's fused=True steps bit for bit. torch.optim's
    foreach implementation where this torch build has no fused kernel for the parameters' device."""
    params = list(params)
    device = str(params[0].device) if params else "cpu"
    momentum = cfg.momentum if cfg.optimizer == "sgd" else 0.0
    if fused_available(device):
        return FusedOptimizer(params, cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=momentum)
    if cfg.optimizer == "sgd":
        cls, kw = torch.optim.SGD, {"momentum": cfg.momentum}
    else:
        cls, kw = (torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW), {}
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True, **kw)


@contextlib.contextmanager
def channels_last(model: nn.Module):
    """Run the block with `model`'s 4-D tensors in channels_last memory format (CPU convolutions
    run ~1.5-2.5x faster), then put them back in contiguous format if they were so before.
    Values, shapes, state_dict order and the Parameter objects are unchanged (only strides), so
    optimizers built inside and medchain.params vectors are unaffected."""
    was_contiguous = all(t.is_contiguous() for t in [*model.parameters(), *model.buffers()] if t.ndim == 4)
    model.to(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        if was_contiguous:
            model.to(memory_format=torch.contiguous_format)


def train_epochs(model: nn.Module, data: ImageSet, cfg: TrainConfig, *,
                 lr_range: tuple[float, float] | None = None,
                 anchor: dict[str, torch.Tensor] | None = None, anchor_strength: float = 0.0,
                 seed: int | None = None, quiet: bool = True, desc: str = "train",
                 augment=None, grad_offset: dict[str, torch.Tensor] | None = None) -> dict:
    """Train `model` in place for cfg.epochs epochs over `data` with a fresh optimizer.

    lr_range: (lr at the first step, lr at the last step) with cosine decay between; default
      (cfg.lr, cfg.lr) — callers that schedule across calls (federated rounds) pass their own.
    anchor / anchor_strength: adds (strength/2)·Σ‖w − anchor[w]‖² over the named parameters —
      FedProx's proximal term (anchor = global model) or L2-SP (anchor = a source model); its
      gradient strength·(w − anchor) is added to the parameters' gradients directly.
    seed: shuffling seed (default cfg.seed). Returns {"loss": mean train loss, "steps": n,
      "unit_displacement": D}: with SGD, how far a constant gradient of 1 would have moved a weight
      over these steps (Σ_k lr_k·Σ_{j<=k} momentum^(k-j); K·lr for plain SGD), None otherwise.
    augment: ``(x (B, C, H, W), torch.Generator) -> x`` applied to each training batch
      (:class:`medchain.harmonize.Augmenter`), drawn from its own generator seeded by `seed`.
    grad_offset: {parameter name: tensor} added to that parameter's gradient at every step
      (SCAFFOLD's correction c − c_i).

    Speed (benchmarks/bench_training.py): images are converted once per call, the model and the
    inputs run in channels_last format (restored afterwards), the optimizer is fused and the loss
    stays a tensor until the end (no per-step host conversion).
    """
    if len(data) == 0:
        raise ValueError("cannot train on an empty ImageSet")
    seed = cfg.seed if seed is None else seed
    x = to_tensor(data.images).contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(data.labels.astype(np.int64))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    lr0, lr1 = lr_range if lr_range is not None else (cfg.lr, cfg.lr)
    steps_per_epoch = max(1, math.ceil(len(data) / cfg.batch_size))
    total, step, losses = cfg.epochs * steps_per_epoch, 0, []
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    bar = tqdm(total=total, desc=desc, disable=quiet, leave=False)
    with channels_last(model):
        opt = make_optimizer(model.parameters(), cfg)
        named = dict(model.named_parameters())
        # anchors copied once into each parameter's own layout (channels_last for conv weights)
        anchored = [(named[k], torch.empty_like(named[k]).copy_(v.detach()))
                    for k, v in (anchor or {}).items()
                    if k in named and named[k].requires_grad] if anchor_strength > 0 else []   # frozen: untouched
        weights, anchors = [w for w, _ in anchored], [a for _, a in anchored]
        offsets = [(named[k], torch.empty_like(named[k]).copy_(v.detach()))
                   for k, v in (grad_offset or {}).items() if k in named and named[k].requires_grad]
        aug_gen = torch.Generator().manual_seed(seed * 2 + 1) if augment is not None else None
        momentum = cfg.momentum if cfg.optimizer == "sgd" else None
        unit, velocity = 0.0, 0.0
        for _ in range(cfg.epochs):
            perm = torch.randperm(len(data), generator=gen)
            for start in range(0, len(data), cfg.batch_size):
                idx = perm[start:start + cfg.batch_size]
                if idx.numel() < 2 and len(data) > 1:
                    continue  # BatchNorm cannot train on a batch of one
                lr = step_lr((lr0, lr1), step, total)
                for g in opt.param_groups:
                    g["lr"] = lr
                xb = x[idx].contiguous(memory_format=torch.channels_last)
                if augment is not None:
                    xb = augment(xb, aug_gen)
                loss = loss_fn(model(xb), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if offsets:
                    with torch.no_grad():
                        for w, o in offsets:
                            w.grad = o.clone() if w.grad is None else w.grad.add_(o)
                if momentum is not None:
                    velocity = momentum * velocity + 1.0
                    unit += lr * velocity
                if anchored:
                    loss = loss.detach() + _add_proximal_grad(weights, anchors, anchor_strength)
                opt.step()
                losses.append(loss.detach())
                step += 1
                bar.update(1)
    bar.close()
    mean_loss = float(torch.stack(losses).double().mean()) if losses else 0.0
    return {"loss": mean_loss, "steps": step, "unit_displacement": unit if momentum is not None else None}


@torch.no_grad()
def _add_proximal_grad(weights: list[torch.Tensor], anchors: list[torch.Tensor],
                       strength: float) -> torch.Tensor:
    """grad += strength·(w − a) for each pair (the gradient of (strength/2)·‖w − a‖²), in two
    foreach kernels; returns that penalty's value."""
    diffs = torch._foreach_sub(weights, anchors)
    for w, d in zip(weights, diffs):
        if w.grad is None:          # a parameter the forward pass did not use
            w.grad = torch.zeros_like(w)
    torch._foreach_add_([w.grad for w in weights], diffs, alpha=strength)
    return 0.5 * strength * torch.stack(torch._foreach_norm(diffs)).pow(2).sum()


def predict_proba(model: nn.Module, data: ImageSet | np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Softmax probabilities float64 (N, n_classes) in eval mode, under torch.inference_mode, in
    channels_last format (~2-3x faster on CPU; the model's format is restored afterwards)."""
    images = data.images if isinstance(data, ImageSet) else data
    model.eval()
    out = []
    # convert the model outside inference_mode: parameters created inside it could not train later
    with channels_last(model), torch.inference_mode():
        for start in range(0, len(images), batch_size):
            xb = to_tensor(images[start:start + batch_size]).contiguous(memory_format=torch.channels_last)
            out.append(torch.softmax(model(xb).float(), dim=1).double().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def evaluate(model: nn.Module, data: ImageSet, batch_size: int = 1024) -> dict[str, float]:
    """ACC, balanced ACC, AUC, loss and n of `model` on `data` (see medchain.metrics)."""
    if len(data) == 0:
        raise ValueError("cannot evaluate on an empty ImageSet")
    return classification_metrics(data.labels, predict_proba(model, data, batch_size))


def selection_key(metrics: dict, metric: str = "acc") -> tuple[float, float]:
    """The model-selection rule every method uses on validation metrics: the higher `metric`,
    ties broken by the lower loss (compare keys with >)."""
    return (metrics[metric], -metrics["loss"])


@dataclass
class FitResult:
    """Outcome of fit(): the model holds the best-validation weights."""

    model: nn.Module
    best_epoch: int
    best_val: dict
    history: list[dict] = field(default_factory=list)   # one row per epoch


def fit(model: nn.Module, train: ImageSet, val: ImageSet, cfg: TrainConfig, *,
        quiet: bool = True, desc: str = "fit", anchor: dict[str, torch.Tensor] | None = None,
        anchor_strength: float = 0.0, track: ImageSet | None = None) -> FitResult:
    """Train for cfg.epochs with a cosine schedule over the whole run, evaluate on `val` after each
    epoch and keep the weights of the best validation accuracy (ties: lower val loss).
    epochs = 0 returns the model unchanged, scored on val.
    track: also score each epoch's model on this set (history columns track_*), for learning
    curves only — it never influences selection."""
    best_state, best_key, best_epoch, best_val = None, None, 0, None
    history = []
    total = max(cfg.epochs, 1)
    per_epoch = TrainConfig(**{**cfg.to_dict(), "epochs": 1})
    if cfg.epochs == 0:
        best_val = evaluate(model, val)
    for epoch in tqdm(range(cfg.epochs), desc=desc, disable=quiet, leave=False):
        if cfg.schedule == "cosine":
            lr_range = (cosine_lr(cfg.lr, epoch, total, cfg.lr_floor), cosine_lr(cfg.lr, epoch + 1, total, cfg.lr_floor))
        else:
            lr_range = (cfg.lr, cfg.lr)
        stats = train_epochs(model, train, per_epoch, lr_range=lr_range, seed=cfg.seed * 1000 + epoch,
                             anchor=anchor, anchor_strength=anchor_strength)
        m = evaluate(model, val)
        row = {"epoch": epoch + 1, "lr": lr_range[0], "train_loss": stats["loss"],
               **{f"val_{k}": v for k, v in m.items()}}
        if track is not None:
            row.update({f"track_{k}": v for k, v in evaluate(model, track).items()})
        history.append(row)
        key = selection_key(m)
        if best_key is None or key > best_key:
            best_key, best_epoch, best_val = key, epoch + 1, m
            best_state = copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    return FitResult(model, best_epoch, best_val, history)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: ImageSet, batch_size: int = 256) -> None:
    """Recompute every BatchNorm layer's running mean/var as exact averages over `data` with the
    current weights (torch's swa_utils.update_bn). After a few local steps the exponential running
    averages still remember the previous weights; federated rounds are short, so this matters."""
    x = to_tensor(data.images).contiguous(memory_format=torch.channels_last)
    with channels_last(model):
        torch.optim.swa_utils.update_bn([x[i:i + batch_size] for i in range(0, len(x), batch_size)], model)


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with `n` torch CPU threads, then restore the previous count. Trained weights
    depend on the thread count (summation order), so runs that must agree bit for bit fix it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)

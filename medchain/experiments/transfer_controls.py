"""Controls of claim 3 that are not collaborative chain-B runs (used by
:func:`medchain.experiments.transfer.run_sweep`):

* **linear probe** (:func:`linear_probe`): the relayed source model's feature extractor, frozen (eval
  mode), and a multinomial logistic regression (scikit-learn, standardized features) fitted on the
  target institutions' training subsets pooled — it measures how good the source's features are for
  the target, without adapting them. Centralized over the target institutions: a control, not a
  chain method.
* **pooled** (:func:`pooled_multitask`), the no-privacy upper bound: one centralized model trained
  on the source's and the target's training images together, with a shared feature extractor and
  two heads (the source's classes and the target's; the label spaces may differ). Every step takes
  one source batch and one target batch (the target's images cycled) and adds the two
  cross-entropies; ``epochs`` passes over the source data, Adam with cosine decay, no selection
  (the last epoch is scored, like the chain runs' last round); BatchNorm statistics are then
  recomputed on the target's training images, as every chain round does.
* **source as is**: :func:`medchain.experiments.transfer.source_on_target` (same classes only).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from medchain.data import ImageSet
from medchain.metrics import classification_metrics
from medchain.models import build_model
from medchain.training import channels_last, cosine_lr, evaluate, recalibrate_bn, to_tensor

__all__ = ["features_of", "linear_probe", "pooled_multitask"]


@torch.no_grad()
def features_of(model: nn.Module, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """The feature extractor's output float64 (N, D) of uint8 images, in eval mode."""
    model.eval()
    out = []
    with channels_last(model):
        for s in range(0, len(images), batch_size):
            xb = to_tensor(images[s:s + batch_size]).contiguous(memory_format=torch.channels_last)
            out.append(model.features(xb).flatten(1).double().numpy())
    return np.concatenate(out)


def linear_probe(model: nn.Module, train: ImageSet, test: ImageSet, n_classes: int, *, C: float = 1.0,
                 seed: int = 0) -> dict:
    """Test metrics (classification_metrics) of a logistic regression on ``model``'s frozen
    features, fitted on ``train``. Classes absent from ``train`` get probability 0."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    classes = np.unique(train.labels)
    if len(classes) < 2:
        raise ValueError(f"the probe's training images hold one class ({classes.tolist()}); "
                         "use a larger target fraction")
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, random_state=seed))
    clf.fit(features_of(model, train.images), train.labels)
    proba = np.zeros((len(test), n_classes))
    proba[:, classes] = clf.predict_proba(features_of(model, test.images))
    return classification_metrics(test.labels, proba)


class _Head(nn.Module):
    """The target's view of a two-head model: logits of columns ``lo:hi``."""

    def __init__(self, model: nn.Module, lo: int, hi: int):
        super().__init__()
        self.model, self.lo, self.hi = model, lo, hi

    def forward(self, x):
        return self.model(x)[:, self.lo:self.hi]


def pooled_multitask(source: ImageSet, n_source: int, target: ImageSet, n_target: int, test: ImageSet, *,
                     model: str, epochs: int, batch_size: int = 32, lr: float = 2e-3, lr_floor: float = 0.02,
                     seed: int = 0) -> dict:
    """Centralized joint training of the source task (``n_source`` classes) and the target task
    (``n_target`` classes) with a shared feature extractor; returns the target head's metrics on
    ``test`` (evaluate). One head of ``n_source + n_target`` outputs whose two column blocks are the
    two tasks' heads (each cross-entropy sees only its own block)."""
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if len(source) < 2 or len(target) < 2:
        raise ValueError("pooled training needs at least two images of each task")
    torch.manual_seed(seed)
    net = build_model(model, target.n_channels, n_source + n_target, seed)
    xs, ys = to_tensor(source.images), torch.from_numpy(source.labels.astype(np.int64))
    xt, yt = to_tensor(target.images), torch.from_numpy(target.labels.astype(np.int64))
    gen = torch.Generator().manual_seed(seed)
    steps = math.ceil(len(source) / batch_size)
    total, step = epochs * steps, 0
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    t_perm, t_pos = torch.randperm(len(target), generator=gen), 0
    net.train()
    with channels_last(net):
        for epoch in range(epochs):
            perm = torch.randperm(len(source), generator=gen)
            for s in range(0, len(source), batch_size):
                idx = perm[s:s + batch_size]
                if idx.numel() < 2:
                    continue
                tb = t_perm[t_pos:t_pos + min(batch_size, len(target))]
                t_pos += len(tb)
                if t_pos >= len(target):
                    t_perm, t_pos = torch.randperm(len(target), generator=gen), 0
                if tb.numel() < 2:
                    continue
                for g in opt.param_groups:
                    g["lr"] = cosine_lr(lr, step, total, lr_floor)
                loss = (loss_fn(net(xs[idx].contiguous(memory_format=torch.channels_last))[:, :n_source], ys[idx])
                        + loss_fn(net(xt[tb].contiguous(memory_format=torch.channels_last))[:, n_source:], yt[tb]))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
    recalibrate_bn(net, target)
    return evaluate(_Head(net, n_source, n_source + n_target), test)

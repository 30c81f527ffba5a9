"""Gradient-inversion threat settings (:mod:`medchain.attacks.inversion`): what every chain member
knows about an update besides its payload (:class:`PublicInfo`) and the cases an attack is run
on (:class:`InversionCase`: the literature's worst case here; the update the protocol posts in
:func:`medchain.experiments.posted_update.protocol_case`)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from medchain import codec
from medchain.models import build_model
from medchain.params import Layout, load_flat, model_vector
from medchain.privacy import select_update
from medchain.training import to_tensor

__all__ = ["PublicInfo", "InversionCase", "as_batch"]


# --------------------------------------------------------------------------------------------
# what is public, and the cases

@dataclass(frozen=True)
class PublicInfo:
    """What every chain member knows about one update besides its payload.

    model / model_kwargs: registry name and keyword arguments (:func:`medchain.models.build_model`).
    in_chans, num_classes, image_shape (H, W): the task's data format.
    global_vec: float32 (P,), the global model the round started from.
    lr, local_steps: the local learning rate and the number of local optimizer steps.
    n_images: the sample count recorded on chain with the update.
    train_mode: whether local training ran the model in train mode (BatchNorm batch statistics).
    optimizer: the local optimizer. With ``"adam"`` one step from a fresh state moves each
    coordinate by ``−lr·g/(|g|+ε)`` ≈ ``−lr·sign(g)``: the target ``−Δ/(lr·steps)`` is then the
    gradient's sign, whose direction the cosine-distance attack (``ig``) still matches.
    """

    model: str
    in_chans: int
    num_classes: int
    image_shape: tuple[int, int]
    global_vec: np.ndarray = field(repr=False)
    lr: float
    local_steps: int
    n_images: int
    train_mode: bool = True
    model_kwargs: dict = field(default_factory=dict)
    optimizer: str = "sgd"

    def build(self) -> tuple[nn.Module, Layout]:
        """The global model before the round (a fresh module) and its layout."""
        model = build_model(self.model, self.in_chans, self.num_classes, 0, **self.model_kwargs)
        layout = Layout.from_module(model)
        load_flat(model, self.global_vec, layout)
        return model, layout


_CHANNELS = (1, 3, 4)   # grey, RGB, RGBA: the last axis of a stored (H, W, C) image


def as_batch(images, labels) -> tuple[np.ndarray, np.ndarray]:
    """Images as a batch (B, H, W[, C]) and labels as (B,). One image may come as (H, W) or
    (H, W, C): a 3-D array is read as one colour image when the labels name one image (a scalar
    or length 1) and its last axis is a channel count (1, 3, 4), else as a batch of grey images."""
    x = np.asarray(images)
    if x.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (as stored), got {x.dtype}")
    y = np.atleast_1d(np.asarray(labels)).astype(np.int64)
    if y.ndim != 1:
        raise ValueError(f"labels must be an int or (B,), got shape {y.shape}")
    one_colour_image = x.ndim == 3 and y.shape[0] == 1 and x.shape[0] != 1 and x.shape[-1] in _CHANNELS
    if x.ndim == 2 or one_colour_image:
        x = x[None]
    if x.ndim not in (3, 4) or x.shape[0] != y.shape[0] or x.shape[0] < 1:
        raise ValueError(f"need one image (H, W[, C]) with one label, or images (B, H, W[, C]) with "
                         f"labels (B,); got {x.shape} and {y.shape}")
    return x, y


@dataclass
class InversionCase:
    """A threat setting: the on-chain ``payload`` (bytes) and the ``public`` information an attacker
    has, plus the institution's private ``images`` (uint8 (B, H, W[, C])) and ``labels`` (int64
    (B,)), used only to score an attack. ``selection``: how the payload was selected (θu, rule…)."""

    payload: bytes = field(repr=False)
    public: PublicInfo
    images: np.ndarray = field(repr=False)
    labels: np.ndarray
    setting: str
    selection: dict = field(default_factory=dict)

    @classmethod
    def worst_case(cls, images, labels, *, num_classes: int, theta_u: float = 1.0,
                   rule: str = "largest", model: str = "lenet", init: str = "dlg",
                   lr: float = 0.1, seed: int = 0, **select_kw) -> "InversionCase":
        """One gradient step on (usually) one image with an untrained model: ``Δ = −lr·∇L``.

        images: uint8 (H, W), (H, W, C) or (B, H, W[, C]); labels: int or (B,). init: ``"dlg"`` (every
        weight uniform in [−0.5, 0.5], as in DLG's LeNet) or ``"default"`` (PyTorch's init), both
        from ``seed``. theta_u, rule, select_kw (scope, tau, gamma, sigma): the partial-update
        selection (:func:`medchain.privacy.select_update`, rng = ``seed``).
        """
        x, y = as_batch(images, labels)
        in_chans = 1 if x.ndim == 3 else x.shape[-1]
        net = build_model(model, in_chans, num_classes, seed)
        if init == "dlg":
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in net.parameters():
                    p.copy_(torch.rand(p.shape, generator=gen) - 0.5)
        elif init != "default":
            raise ValueError(f"init must be 'dlg' or 'default', got {init!r}")
        layout = Layout.from_module(net)
        w0 = model_vector(net, layout)
        net.train()
        loss = F.cross_entropy(net(to_tensor(x)), torch.from_numpy(y))
        names = [n for n, _ in net.named_parameters()]
        grads = torch.autograd.grad(loss, [p for _, p in net.named_parameters()])
        delta = np.zeros(layout.size, dtype=np.float32)
        for n, g in zip(names, grads):
            delta[layout.slices[n]] = (-lr * g.detach().double()).reshape(-1).numpy()
        public = PublicInfo(model, in_chans, num_classes, tuple(x.shape[1:3]), w0, float(lr), 1,
                            int(x.shape[0]), True)
        return cls._finish(delta, layout, public, x, y, "worst_case", theta_u, rule, seed, select_kw)

    @classmethod
    def _finish(cls, delta, layout, public, x, y, setting, theta_u, rule, seed, select_kw,
                extra=None) -> "InversionCase":
        idx, vals = select_update(delta, theta_u, rule=rule, layout=layout, rng=seed, **select_kw)
        payload = codec.encode_update(vals, layout.layout_id, indices=idx, total_size=layout.size)
        selection = {"theta_u": theta_u, "rule": rule, **select_kw, "n_shared": int(idx.size),
                     "P": layout.size, "seed": seed, **(extra or {})}
        return cls(payload, public, x, y, setting, selection)

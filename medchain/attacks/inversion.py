"""Gradient inversion from on-chain updates: DLG, iDLG and Inverting Gradients.

A chain member sees, for every update, the encoded payload (:mod:`medchain.codec`; under partial
update only ``θu`` of the coordinates, *and which ones*), the sample count recorded with it, and
the task's public parameters: model architecture, the global model before the round, the learning
rate and number of local steps. That is all :func:`invert` uses (:class:`PublicInfo` + payload
bytes). It treats ``g = −Δ / (lr · steps)`` as the gradient of the mean cross-entropy over the
institution's images (exact for one SGD step; Geiping et al.'s approximation for several local
steps, their FedAvg attack) and searches for images whose gradient matches ``g``.

Methods (``method=``)
    ``"dlg"``  Zhu et al. 2019: dummy images and soft labels, L-BFGS on the squared gradient
               distance (normalised here by ‖g‖² over the matched coordinates, which has the same
               minimiser and keeps L-BFGS's tolerances meaningful whatever the gradient scale).
    ``"idlg"`` Zhao et al. 2020: DLG with the labels recovered analytically from the sign of the
               last layer's gradient (:func:`recover_labels`), images only.
    ``"ig"``   Geiping et al. 2020, *Inverting Gradients*: cosine distance + total variation,
               Adam (lr 0.1, step decay ×0.1 at 3/8, 5/8, 7/8 of the run) on signed gradients,
               images boxed to the data range after every step; labels as in iDLG.
    Where the labels cannot be recovered (no coordinate of the head was revealed, or the signs are
    ambiguous) iDLG and IG fall back to optimizing soft labels as DLG does
    (``Reconstruction.label_source == "optimized"``). For a batch of images IG optimizes the labels
    by default: the sign rule is exact only for one image, and its batch extension fails on trained
    models, whose last-layer gradients carry little label information.

Attacker models (``attacker=``)
    ``"naive"``       unshared coordinates count as 0 in the target gradient and are matched as 0.
    ``"mask_aware"``  the distance uses only the revealed coordinates (the chain reveals the
                      indices), i.e. the attacker knows what it does not know.
    Model *parameters* are matched; BatchNorm running statistics revealed by the payload (the
    task's ``bn_stats="shared"`` policy) enter only through ``bn_prior`` (Yin et al. 2021).

Threat settings (:class:`InversionCase`)
    ``worst_case``  one image, one gradient step ``Δ = −lr·∇``, an untrained sigmoid LeNet
                    (weights uniform in ±0.5 as in DLG by default): the literature's upper bound.
    ``protocol``    the update the protocol really posts
                    (:func:`medchain.experiments.posted_update.protocol_case`, above the
                    protocol layer): a one-round task run by
                    :class:`medchain.protocol.Institution` from the trained global model (the
                    task's model, local epochs, batch size, optimizer, selection, BN policy), read
                    back from the ledger; all ``B`` images of the target institution are
                    reconstructed at once and matched to the originals (Hungarian on MSE).

Images live in the models' input scale, ``[-1, 1]`` (:func:`medchain.training.to_tensor`);
reconstructions are returned as uint8 and scored with :func:`medchain.metrics.reconstruction_metrics`
(PSNR over the uint8 data range 255, SSIM, MSE, label accuracy).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from medchain import codec
from medchain.metrics import reconstruction_metrics
from medchain.models import build_model
from medchain.params import Layout, load_flat, model_vector
from medchain.privacy import select_update
from medchain.training import to_tensor

__all__ = ["METHODS", "ATTACKERS", "SETTINGS", "PublicInfo", "InversionCase", "Target",
           "Reconstruction", "NothingToInvert", "decode_target", "recover_labels", "invert"]

METHODS = ("dlg", "idlg", "ig")
ATTACKERS = ("naive", "mask_aware")
SETTINGS = ("worst_case", "protocol")
_DEFAULT_STEPS = {"dlg": 100, "idlg": 100, "ig": 2000}   # L-BFGS outer steps / Adam steps


class NothingToInvert(ValueError):
    """The payload reveals no coordinate of a trainable parameter to this attacker (e.g. a tiny θu
    whose top-k holds only BatchNorm running statistics): there is no gradient to match."""


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


# --------------------------------------------------------------------------------------------
# what the attacker extracts from the payload

@dataclass
class Target:
    """The attacker's view of one update: per model parameter (layout order) the estimated
    gradient ``−Δ/(lr·steps)`` (0 where not revealed) and the bool mask of revealed coordinates;
    ``bn_stats``: per BatchNorm module whose running statistics the payload reveals,
    ``(mean (C,), var (C,), revealed (C,) bool)`` = global statistics + Δ, i.e. the institution's
    statistics after the round (with BN recalibration: the exact per-channel moments of its images'
    activations, Yin et al. 2021's prior)."""

    names: list[str]
    grads: list[torch.Tensor]
    revealed: list[torch.Tensor]
    bn_stats: dict = field(default_factory=dict)

    @property
    def revealed_fraction(self) -> float:
        n = sum(int(m.sum()) for m in self.revealed)
        return n / max(1, sum(m.numel() for m in self.revealed))

    def get(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        if name not in self.names:
            return None
        i = self.names.index(name)
        return self.grads[i], self.revealed[i]


def decode_target(payload: bytes, public: PublicInfo,
                  model: nn.Module | None = None, layout: Layout | None = None) -> Target:
    """Decode ``payload`` exactly as a chain member does (strict :func:`medchain.codec.decode_update`
    against the task's layout) and turn it into the gradient estimate the attacks match."""
    if model is None or layout is None:
        model, layout = public.build()
    dec = codec.decode_update(payload, expected_layout_id=layout.layout_id,
                              expected_size=layout.size)
    scale = -1.0 / (public.lr * max(1, public.local_steps))
    full = np.zeros(layout.size, dtype=np.float64)
    full[dec.indices] = dec.values.astype(np.float64) * scale
    mask = dec.mask()
    names, grads, revealed = [], [], []
    for name, p in model.named_parameters():
        if name not in layout.slices:
            continue
        s = layout.slices[name]
        names.append(name)
        grads.append(torch.from_numpy(full[s].astype(np.float32)).reshape(p.shape))
        revealed.append(torch.from_numpy(mask[s].copy()).reshape(p.shape))
    after = public.global_vec.astype(np.float64).copy()
    after[dec.indices] += dec.values.astype(np.float64)
    bn_stats = {}
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, nn.modules.batchnorm._BatchNorm):
            continue
        mean_s = layout.slices.get(f"{mod_name}.running_mean")
        var_s = layout.slices.get(f"{mod_name}.running_var")
        if mean_s is None or var_s is None:
            continue
        seen = mask[mean_s] & mask[var_s]
        if seen.any():
            bn_stats[mod_name] = (torch.from_numpy(after[mean_s].astype(np.float32)),
                                  torch.from_numpy(after[var_s].astype(np.float32)),
                                  torch.from_numpy(seen.copy()))
    return Target(names, grads, revealed, bn_stats)


def recover_labels(target: Target, n_images: int, num_classes: int,
                   head: str = "head") -> np.ndarray | None:
    """Labels from the sign of the last layer's gradient (iDLG), or None when undetermined.

    For cross-entropy, ∂L/∂b_c = mean_i (p_ic − y_ic) and the row c of ∂L/∂W has that sign too when
    the head's inputs are non-negative (sigmoid / ReLU features, as in medchain's models): classes
    present in the batch show negative scores. Per class the score is the revealed bias gradient,
    else the sum of the revealed entries of its weight row. One image: the single negative class
    (or, if none is negative, the single class with nothing revealed). B images (a heuristic
    extension): every negative class at least once, the rest shared in proportion to −score.
    Returns int64 (n_images,) sorted, or None.
    """
    w = target.get(f"{head}.weight")
    b = target.get(f"{head}.bias")
    score = np.full(num_classes, np.nan)
    kind = np.zeros(num_classes, dtype=np.int64)        # 2: bias, 1: weight row, 0: unknown
    for c in range(num_classes):
        if b is not None and bool(b[1][c]):
            score[c], kind[c] = float(b[0][c]), 2
        elif w is not None and bool(w[1][c].any()):
            score[c], kind[c] = float(w[0][c][w[1][c]].double().sum()), 1
    known = ~np.isnan(score)
    if not known.any():
        return None
    neg = np.flatnonzero(known & (score < 0))
    if neg.size == 0:
        unknown = np.flatnonzero(~known)
        if n_images == 1 and unknown.size == 1:
            return unknown.astype(np.int64)
        return None
    if n_images == 1:
        # comparable scores only within one kind; prefer the bias
        best_kind = kind[neg].max()
        cand = neg[kind[neg] == best_kind]
        return np.array([cand[np.argmin(score[cand])]], dtype=np.int64)
    order = neg[np.argsort(score[neg], kind="stable")]       # most negative first
    if order.size >= n_images:
        return np.sort(order[:n_images]).astype(np.int64)
    weight = -score[order] / (-score[order]).sum()
    counts = np.ones(order.size, dtype=np.int64)
    extra = n_images - order.size
    share = weight * extra
    counts += np.floor(share).astype(np.int64)
    rest = n_images - counts.sum()
    if rest > 0:
        counts[np.argsort(-(share - np.floor(share)), kind="stable")[:rest]] += 1
    return np.sort(np.repeat(order, counts)).astype(np.int64)


# --------------------------------------------------------------------------------------------
# the attack

@dataclass
class Reconstruction:
    """Outcome of :func:`invert`.

    images: uint8 (B, H, W[, C]), reconstruction ``i`` matched to the case's original ``i``.
    labels: int64 (B,), the attacker's labels in the same (matched) order.
    images_float: float32 (B, C, H, W) in the model's input scale [-1, 1], in the attack's order.
    metrics: psnr (dB, mean over images, data range 255), ssim, mse (uint8 units), label_acc,
      label_count_acc, per-image lists and the matching (see medchain.metrics); seconds (wall)
      and cpu_seconds (this process's CPU time, independent of other load on the machine).
    label_source: ``"analytic"`` (recovered from the head's gradient) or ``"optimized"``.
    """

    images: np.ndarray = field(repr=False)
    labels: np.ndarray
    images_float: np.ndarray = field(repr=False)
    metrics: dict
    method: str
    attacker: str
    label_source: str
    revealed_fraction: float
    seconds: float
    final_loss: float
    loss_trace: list = field(default_factory=list, repr=False)


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    return ((x[..., 1:, :] - x[..., :-1, :]).abs().mean()
            + (x[..., :, 1:] - x[..., :, :-1]).abs().mean())


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    a = ((x.detach().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return a[:, 0] if a.shape[1] == 1 else a.transpose(0, 2, 3, 1)


def invert(payload: bytes, case: "InversionCase | PublicInfo", method: str = "ig",
           attacker: str = "mask_aware", *, steps: int | None = None, seed: int = 0,
           tv: float = 1e-4, signed: bool = True, lr: float = 0.1, max_iter: int = 20,
           labels: str = "auto", images: np.ndarray | None = None,
           true_labels: np.ndarray | None = None, bn_prior: float = 0.0,
           init: np.ndarray | None = None, bn_only: bool = False) -> Reconstruction:
    """Reconstruct the images behind an on-chain update.

    payload: the encoded update as stored on chain / in the blob store.
    case: an :class:`InversionCase` (its ``public`` info drives the attack; its private images and
      labels only score it) or a bare :class:`PublicInfo` (pass ``images``/``true_labels`` to score).
    method: ``"dlg"``, ``"idlg"`` or ``"ig"``. attacker: ``"naive"`` or ``"mask_aware"``.
    steps: L-BFGS outer steps (each up to ``max_iter`` iterations) for dlg/idlg, Adam steps for ig
      (defaults 100 / 2000). seed: the dummy initialisation (standard normal images).
    tv: total-variation weight (ig only). signed: signed gradients (ig only). lr: Adam's lr (ig).
    labels: ``"auto"`` (the method's own choice: dlg optimized; idlg analytic; ig analytic for one
      image, optimized for a batch, where the sign heuristic of :func:`recover_labels` fails on
      trained models), ``"analytic"`` (iDLG's recovery, falling back to optimized when it is
      undetermined) or ``"optimized"`` (soft labels optimized jointly with the images, as DLG).
    bn_prior: weight of Yin et al. 2021's BatchNorm prior — ``Σ_layers ‖μ(x) − μ̂‖₂ + ‖σ²(x) − σ̂²‖₂``
      between the dummy batch's per-channel moments at each BatchNorm input and the running
      statistics the payload reveals (:attr:`Target.bn_stats`); 0: off. With a payload that
      reveals BN statistics but no parameter coordinate the attack matches the statistics alone
      (what shared BN statistics reveal on their own); otherwise such a payload raises
      :class:`NothingToInvert`.
    bn_only: match the revealed BN statistics alone, ignoring every parameter coordinate
      (needs ``bn_prior > 0``): what shared statistics reveal on their own.
    init: float (C, H, W) or (B, C, H, W) in [-1, 1], the starting images (default: standard
      normal noise from ``seed``), e.g. the population's mean image, which every member may know.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if attacker not in ATTACKERS:
        raise ValueError(f"attacker must be one of {ATTACKERS}, got {attacker!r}")
    if labels not in ("auto", "analytic", "optimized"):
        raise ValueError(f"labels must be 'auto', 'analytic' or 'optimized', got {labels!r}")
    public = case.public if isinstance(case, InversionCase) else case
    if isinstance(case, InversionCase):
        images, true_labels = case.images, case.labels
    steps = _DEFAULT_STEPS[method] if steps is None else int(steps)
    t0, c0 = time.perf_counter(), time.process_time()

    model, layout = public.build()
    model.train(public.train_mode)
    target = decode_target(payload, public, model, layout)
    params = dict(model.named_parameters())
    masks = [m if attacker == "mask_aware" else torch.ones_like(m) for m in target.revealed]
    use = [] if bn_only else [i for i, m in enumerate(masks) if bool(m.any())]
    if bn_only and not (bn_prior > 0 and target.bn_stats):
        raise NothingToInvert("bn_only needs bn_prior > 0 and a payload that reveals BN statistics")
    if bn_prior < 0 or not math.isfinite(bn_prior):
        raise ValueError(f"bn_prior must be a finite weight >= 0, got {bn_prior}")
    bn_targets = target.bn_stats if bn_prior > 0 else {}
    if not use and not bn_targets:
        raise NothingToInvert("the payload reveals no parameter coordinate to a mask-aware attacker "
                              "(only buffers such as BatchNorm statistics; pass bn_prior > 0 to "
                              "invert those): nothing to invert")
    moments: dict = {}
    hooks = []
    for name, mod in model.named_modules():
        if name in bn_targets:
            def hook(module, inputs, output, name=name):
                a = inputs[0]
                dims = [d for d in range(a.dim()) if d != 1]
                moments[name] = (a.mean(dims), a.var(dims, unbiased=True))
            hooks.append(mod.register_forward_hook(hook))
    plist = [params[target.names[i]] for i in use]
    tgt = [target.grads[i] for i in use]
    msk = [masks[i].float() for i in use]
    tgt_sq = sum(float((t * t * m).sum()) for t, m in zip(tgt, msk))
    tgt_norm = math.sqrt(tgt_sq) if tgt_sq > 0 else 1.0

    B, K = public.n_images, public.num_classes
    H, W = public.image_shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((B, public.in_chans, H, W), generator=gen)
    if init is not None:
        x0 = torch.as_tensor(np.asarray(init, dtype=np.float32))
        x = (x0.expand(B, -1, -1, -1) if x0.dim() == 3 else x0).clone()
        if tuple(x.shape) != (B, public.in_chans, H, W):
            raise ValueError(f"init must be (C, H, W) or (B, C, H, W) = {(B, public.in_chans, H, W)}, "
                             f"got {tuple(x0.shape)}")
    x = x.requires_grad_(True)
    y_soft = torch.randn((B, K), generator=gen).requires_grad_(True)

    hard = None
    analytic = labels == "analytic" or (labels == "auto" and (method == "idlg"
                                                              or (method == "ig" and B == 1)))
    if analytic and plist:
        hard = recover_labels(target, B, K)
    label_source = "analytic" if hard is not None else "optimized" if plist else "none"
    y_hard = torch.from_numpy(hard) if hard is not None else None
    variables = [x] if (hard is not None or not plist) else [x, y_soft]
    cost = "cos" if method == "ig" else "l2"

    def bn_term() -> torch.Tensor:
        total = torch.zeros(())
        for name, (mu, var, seen) in bn_targets.items():
            m, v = moments[name]
            total = total + torch.linalg.vector_norm((m - mu)[seen]) + torch.linalg.vector_norm((v - var)[seen])
        return bn_prior * total

    def objective() -> torch.Tensor:
        out = model(x)
        if not plist:   # BN statistics only
            return bn_term() + (tv * _total_variation(x) if tv > 0 else 0.0)
        if y_hard is not None:
            loss = F.cross_entropy(out, y_hard)
        else:
            loss = torch.sum(-torch.softmax(y_soft, -1) * torch.log_softmax(out, -1), -1).mean()
        dg = torch.autograd.grad(loss, plist, create_graph=True)
        if bn_targets:
            return _match(dg) + bn_term()
        return _match(dg)

    def _match(dg) -> torch.Tensor:
        if cost == "l2":
            d = sum(((g - t) ** 2 * m).sum() for g, t, m in zip(dg, tgt, msk)) / (tgt_norm ** 2)
        else:
            dot = sum((g * t * m).sum() for g, t, m in zip(dg, tgt, msk))
            gn = torch.sqrt(sum((g * g * m).sum() for g, m in zip(dg, msk)) + 1e-20)
            d = 1 - dot / (gn * tgt_norm)
            if tv > 0:
                d = d + tv * _total_variation(x)
        return d

    best = {"loss": math.inf, "x": x.detach().clone(), "y": y_soft.detach().clone()}
    trace = []

    def record(val: float) -> None:
        if math.isfinite(val) and val < best["loss"]:
            best.update(loss=val, x=x.detach().clone(), y=y_soft.detach().clone())

    if method in ("dlg", "idlg"):
        opt = torch.optim.LBFGS(variables, lr=1.0, max_iter=max_iter, history_size=100,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-10,
                                tolerance_change=1e-12)

        def closure():
            opt.zero_grad(set_to_none=True)
            d = objective()
            grads = torch.autograd.grad(d, variables)
            for v, g in zip(variables, grads):
                v.grad = g
            record(float(d.detach()))
            return d

        prev = math.inf
        for _ in range(steps):
            d = float(opt.step(closure).detach())
            trace.append(d)
            if not math.isfinite(d) or best["loss"] < 1e-12 or abs(prev - d) < 1e-14:
                break
            prev = d
    else:
        opt = torch.optim.Adam(variables, lr=lr)
        sched = torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=[int(steps * f) for f in (3 / 8, 5 / 8, 7 / 8)], gamma=0.1)
        for it in range(steps):
            opt.zero_grad(set_to_none=True)
            d = objective()
            grads = torch.autograd.grad(d, variables)
            val = float(d.detach())
            if not math.isfinite(val):
                break
            record(val)
            for v, g in zip(variables, grads):
                v.grad = g.sign() if signed else g
            opt.step()
            sched.step()
            with torch.no_grad():
                x.clamp_(-1, 1)
            if it % 10 == 0:
                trace.append(val)

    for h in hooks:
        h.remove()
    xr = best["x"].clamp(-1, 1)
    rec_labels = hard if hard is not None else best["y"].argmax(-1).numpy().astype(np.int64)
    rec_u8 = _to_uint8(xr)
    seconds = time.perf_counter() - t0
    metrics: dict = {"seconds": seconds, "cpu_seconds": time.process_time() - c0,
                     "revealed_fraction": target.revealed_fraction}
    perm = np.arange(B)
    if images is not None:
        orig = np.asarray(images)
        m = reconstruction_metrics(rec_u8, orig, 255.0, recon_labels=rec_labels,
                                   labels=true_labels)
        perm = np.asarray(m["perm"])
        metrics.update(m)
    return Reconstruction(rec_u8[perm], np.asarray(rec_labels)[perm], xr.numpy().astype(np.float32),
                          metrics, method, attacker, label_source, target.revealed_fraction,
                          seconds, best["loss"], trace)

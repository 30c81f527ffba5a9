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

from medchain.attacks.cases import InversionCase, PublicInfo, as_batch  # noqa: F401  (re-exported)
from medchain.attacks.target import NothingToInvert, Target, decode_target, recover_labels
from medchain.metrics import reconstruction_metrics
from medchain.training import to_tensor

__all__ = ["METHODS", "ATTACKERS", "SETTINGS", "PublicInfo", "InversionCase", "Target",
           "Reconstruction", "NothingToInvert", "decode_target", "recover_labels", "invert"]

METHODS = ("dlg", "idlg", "ig")
ATTACKERS = ("naive", "mask_aware")
SETTINGS = ("worst_case", "protocol")
_DEFAULT_STEPS = {"dlg": 100, "idlg": 100, "ig": 2000}   # L-BFGS outer steps / Adam steps


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

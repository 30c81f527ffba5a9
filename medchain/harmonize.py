"""Input harmonization that needs no data sharing (claim 1 under scanner shift).

Two tools, both switched on by the task's parameters (:class:`medchain.protocol.CollabConfig`
``standardize`` and ``augment``, recorded on chain), so every institution applies the same ones:

* **per-image standardization** — each image, as the model sees it, is shifted and scaled to mean 0
  and standard deviation 1 over its pixels (:func:`standardize`): a scanner's display window
  (level, width) and calibration drift become invisible. It lives in the model as a forward
  pre-hook (:func:`attach_standardization`), so training, validation, test and any deployed copy
  apply it alike; the model's tensors, layout and digests are unchanged.
* **scanner augmentation** — during local training only, each image gets a random contrast factor,
  brightness offset, Gaussian blur and Gaussian noise, each drawn uniformly from a range the task
  creator published in the task's parameters (:data:`AUGMENT_KEYS`; :class:`Augmenter`): every
  site then trains on images that look as if taken by other scanners, without seeing any.

Images are float32 tensors ``(N, C, H, W)`` in [-1, 1] (:func:`medchain.training.to_tensor`); ranges
are in those units (brightness: the [-1, 1] scale; blur and noise sigma: pixels / intensity units).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

__all__ = ["AUGMENT_KEYS", "AUGMENT_LIMITS", "DEFAULT_AUGMENT", "validate_augment", "Augmenter",
           "standardize", "attach_standardization"]

#: What an augmentation draws per image, in the order it is applied.
AUGMENT_KEYS: tuple[str, ...] = ("contrast", "brightness", "blur_sigma", "noise_sigma")
#: The allowed span of each range (inclusive) — wider would destroy the image.
AUGMENT_LIMITS: dict[str, tuple[float, float]] = {"contrast": (0.1, 10.0), "brightness": (-1.0, 1.0),
                                                  "blur_sigma": (0.0, 3.0), "noise_sigma": (0.0, 1.0)}
#: Generic CT ranges a task creator can publish without seeing anyone's data: window width ±50 %
#: (contrast), window level ±15 % of the grey scale (brightness), up to one pixel of blur and up
#: to 10 % noise. (The simulator's scanners, medchain.data.simulate.site_profile, fall inside.)
DEFAULT_AUGMENT: dict[str, list[float]] = {"contrast": [0.67, 1.5], "brightness": [-0.3, 0.3],
                                           "blur_sigma": [0.0, 1.0], "noise_sigma": [0.0, 0.1]}
_BLUR_RADIUS = 4          # kernel taps each side: covers 4 sigma of the largest blur drawn (<= 1 px)


def validate_augment(ranges) -> dict[str, list[float]]:
    """The augmentation ranges in canonical form (``{key: [low, high]}``, keys in
    :data:`AUGMENT_KEYS` order, floats) — {} for None or {} (no augmentation). Raises ValueError
    naming the problem for an unknown key, a range that is not two finite numbers low <= high,
    or one outside :data:`AUGMENT_LIMITS`."""
    if ranges is None:
        return {}
    if not isinstance(ranges, dict):
        raise ValueError(f"augment must be a dict of ranges {{key: [low, high]}} with keys from "
                         f"{AUGMENT_KEYS}, got {ranges!r}")
    unknown = sorted(set(ranges) - set(AUGMENT_KEYS))
    if unknown:
        raise ValueError(f"augment has unknown key(s) {unknown}; the keys are {AUGMENT_KEYS}")
    out = {}
    for key in AUGMENT_KEYS:
        if key not in ranges:
            continue
        r = ranges[key]
        ok = isinstance(r, (list, tuple)) and len(r) == 2 and all(
            isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            and math.isfinite(float(v)) for v in r)
        if not ok or float(r[0]) > float(r[1]):
            raise ValueError(f"augment[{key!r}] must be [low, high] with finite low <= high, got {r!r}")
        lo, hi = AUGMENT_LIMITS[key]
        if float(r[0]) < lo or float(r[1]) > hi:
            raise ValueError(f"augment[{key!r}] = {list(r)} leaves the allowed span [{lo}, {hi}]")
        out[key] = [float(r[0]), float(r[1])]
    return out


class Augmenter:
    """Draws and applies one random scanner per image: ``x (N, C, H, W) float32 → same shape``.

    Per image, uniformly from its range: contrast factor c (x ← m + c·(x − m), m the image mean),
    brightness offset b (x ← x + b), Gaussian blur of std sigma pixels (separable, reflect padding),
    additive Gaussian noise of std s. Keys absent from ``ranges`` are skipped. Deterministic for a
    given torch.Generator state."""

    def __init__(self, ranges: dict):
        self.ranges = validate_augment(ranges)
        if not self.ranges:
            raise ValueError("Augmenter needs at least one range (see AUGMENT_KEYS)")

    def _draw(self, key: str, n: int, gen: torch.Generator) -> torch.Tensor:
        lo, hi = self.ranges[key]
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n = x.shape[0]
        shape = (n,) + (1,) * (x.ndim - 1)
        if "contrast" in self.ranges:
            m = x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)
            x = m + self._draw("contrast", n, gen).view(shape) * (x - m)
        if "brightness" in self.ranges:
            x = x + self._draw("brightness", n, gen).view(shape)
        if "blur_sigma" in self.ranges:
            x = _blur(x, self._draw("blur_sigma", n, gen))
        if "noise_sigma" in self.ranges:
            s = self._draw("noise_sigma", n, gen).view(shape)
            x = x + s * torch.randn(x.shape, generator=gen)
        return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of each image with its own std ``sigma`` (N,) in pixels (0: none)."""
    n, c, h, w = x.shape
    taps = torch.arange(-_BLUR_RADIUS, _BLUR_RADIUS + 1, dtype=x.dtype)
    s = sigma.to(x.dtype).clamp_min(1e-3).view(n, 1)
    k = torch.exp(-0.5 * (taps.view(1, -1) / s) ** 2)
    k = k / k.sum(dim=1, keepdim=True)                               # (N, taps); sigma→0: a delta
    k = k.repeat_interleave(c, dim=0)                                 # one kernel per (image, channel)
    y = x.reshape(1, n * c, h, w)
    pad = _BLUR_RADIUS
    y = nn.functional.pad(y, (pad, pad, 0, 0), mode="reflect")
    y = nn.functional.conv2d(y, k.view(n * c, 1, 1, -1), groups=n * c)
    y = nn.functional.pad(y, (0, 0, pad, pad), mode="reflect")
    y = nn.functional.conv2d(y, k.view(n * c, 1, -1, 1), groups=n * c)
    return y.reshape(n, c, h, w)


def standardize(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Per image: subtract its mean and divide by its std over (C, H, W); (N, C, H, W) → same.
    A std below eps counts as eps (a flat image stays finite: it becomes 0)."""
    dims = tuple(range(1, x.ndim))
    m = x.mean(dim=dims, keepdim=True)
    s = x.std(dim=dims, keepdim=True, unbiased=False)
    return (x - m) / s.clamp_min(eps)


def _standardize_hook(module: nn.Module, args: tuple) -> tuple:
    return (standardize(args[0]),) + tuple(args[1:])


def attach_standardization(model: nn.Module) -> nn.Module:
    """Make `model` standardize each input image first (a forward pre-hook; no tensors added, so
    the layout, parameters and digests are unchanged; deep copies keep the hook). Idempotent.
    Returns the model."""
    if not getattr(model, "_medchain_standardized", False):
        model.register_forward_pre_hook(_standardize_hook)
        model._medchain_standardized = True
    return model

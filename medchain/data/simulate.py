"""Simulated chest-CT nodule dataset: the embedded default data of medchain.

Nothing can be downloaded at run time on the machines medchain targets, so medchain generates
its own three-class chest-CT data set, physics-based and deterministic by seed:

1. **Phantom** (Hounsfield units, HU) on a fine grid of ``2*size`` pixels over a 320 mm field of
   view (FOV_MM): body ellipse with a fat rim, two lungs with smooth parenchymal texture, heart, vertebra,
   vessel cross-sections in the lungs (distractors), and at most one nodule in a lung.
2. **Lesion classes** with overlapping size distributions: 0 no nodule; 1 benign (small, smooth,
   round, solid, a share of them calcified); 2 malignant (larger, lobulated, often spiculated,
   lower and heterogeneous density).
3. **Scanner** of the image's site: parallel-beam projection with a precomputed sparse system
   matrix, photon (Poisson) noise at the site's dose, electronic noise, filtered back-projection
   with the site's number of views and reconstruction filter, post-reconstruction blur, HU
   calibration drift (gain / offset) and the site's display window, then 2x2 area reduction to
   ``size`` x ``size`` uint8.

A site's scanner and its default patient label mix are a deterministic function of the *site id*
only (:func:`site_profile`), never of ``seed``: site 7 is the same hospital in every data set, which is
what lets a transfer task draw unseen sites with ``site_offset``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from medchain.data.limits import check_memory
from medchain.data.types import Dataset, ImageSet

__all__ = ["CLASS_NAMES", "FILTERS", "SiteProfile", "site_profile", "simulate_ct"]

CLASS_NAMES = ["no nodule", "benign", "malignant"]
FILTERS = ("ram-lak", "shepp-logan", "cosine", "hamming", "hann")

FOV_MM = 320.0            # reconstructed field of view (square side), mm
MU_WATER = 0.0193         # linear attenuation of water at ~70 keV, 1/mm
MIN_PER_SITE = 20         # fewer images per site cannot fill three stratified splits
_CHUNK = 500              # images rendered at once (bounds memory to ~150 MB per worker)
_MAX_WORKERS = 4          # render threads
_MAX_VESSELS = 6
_EXACT_POISSON_BELOW = 10.0
_MAX_SPICULES = 8
_SITE_SALT = 0x5C47E      # seeds of site profiles: independent of the data seed
_DATA_SALT = 0xC7DA7A

# Default label mix of site s is row s % 5: any 5 consecutive sites pool to (0.4, 0.3, 0.3),
# while single sites differ strongly (label shift).
CLASS_MIX_TABLE = np.array([
    [0.55, 0.25, 0.20],
    [0.30, 0.45, 0.25],
    [0.40, 0.20, 0.40],
    [0.25, 0.35, 0.40],
    [0.50, 0.25, 0.25],
])

# Lesion model: the class-overlap knobs that set how hard the task is.
NODULE = {
    "benign_radius_mm": 9.5,          # median; lognormal spread below
    "malignant_radius_mm": 16.0,
    "radius_spread": 0.22,
    "benign_hu": (35.0, 15.0),        # mean, std
    "calcified_share": 0.35,
    "calcified_hu": (250.0, 800.0),   # uniform range
    "malignant_hu": (-200.0, 40.0),   # uniform range: ground-glass to solid
    "malignant_texture_hu": 60.0,     # std of the heterogeneity field
    "benign_lobulation": 0.03,
    "malignant_lobulation": 0.18,
    "spiculated_share": 0.75,
}

_PROJECTORS: dict[tuple[int, int], tuple[sp.csr_matrix, int]] = {}
_FILTERS_CACHE: dict[tuple, np.ndarray] = {}


# --------------------------------------------------------------------------- sites / scanners

@dataclass(frozen=True)
class SiteProfile:
    """One acquisition site: its scanner and its patients' label mix.

    dose: unattenuated photons per detector bin and view. electronic_noise: std of additive
    detector noise, photons. n_views: projections over 180 degrees. recon_filter: one of FILTERS.
    blur: std of the post-reconstruction Gaussian, fine-grid pixels. gain, offset_hu: HU
    calibration (HU_out = gain * HU + offset). drift_gain, drift_hu: per-image std of that
    calibration. window_level, window_width: display window, HU. class_mix: (3,) label mix.
    """

    site: int
    dose: float
    electronic_noise: float
    n_views: int
    recon_filter: str
    blur: float
    gain: float
    offset_hu: float
    drift_gain: float
    drift_hu: float
    window_level: float
    window_width: float
    class_mix: tuple[float, float, float]


def site_profile(site: int) -> SiteProfile:
    """Scanner parameters and default label mix of site ``site`` (int >= 0).

    Drawn from a generator seeded by the site id alone (never by a data seed); the label mix is
    row ``site % 5`` of CLASS_MIX_TABLE. Dose 400-5000 photons, 64-120 views and the window
    ranges below give 10-110 HU of image noise at 28 x 28 depending on the site.
    """
    if int(site) != site or site < 0:
        raise ValueError(f"site id must be a non-negative integer, got {site!r}")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([_SITE_SALT, int(site)])))
    mix = CLASS_MIX_TABLE[int(site) % len(CLASS_MIX_TABLE)]
    return SiteProfile(
        site=int(site),
        dose=float(np.exp(rng.uniform(np.log(400.0), np.log(5e3)))),
        electronic_noise=float(rng.uniform(0.5, 4.0)),
        n_views=int(rng.choice([64, 80, 100, 120])),
        recon_filter=str(rng.choice(FILTERS)),
        blur=float(rng.uniform(0.2, 1.0)),
        gain=float(rng.uniform(0.92, 1.08)),
        offset_hu=float(rng.uniform(-50.0, 50.0)),
        drift_gain=float(rng.uniform(0.005, 0.03)),
        drift_hu=float(rng.uniform(5.0, 20.0)),
        window_level=float(rng.uniform(-700.0, -450.0)),
        window_width=float(rng.uniform(1100.0, 1800.0)),
        class_mix=tuple(float(p) for p in mix),
    )


# --------------------------------------------------------------------------- projector / FBP

def _projector(m: int, n_views: int) -> tuple[sp.csr_matrix, int]:
    """Parallel-beam system matrix A, float32 (n_views*n_det, m*m), and n_det; cached.

    Pixel-driven with linear interpolation onto detector bins of one pixel width, so
    ``A @ image`` gives line integrals in pixel units and ``A.T`` is the classic
    linear-interpolation back-projector.
    """
    key = (m, n_views)
    if key not in _PROJECTORS:
        n_det = int(math.ceil(m * math.sqrt(2.0))) + 3
        c = np.arange(m) - (m - 1) / 2.0
        x = np.tile(c, m)                  # column coordinate of each pixel (row-major)
        y = np.repeat(c, m)
        theta = np.pi * np.arange(n_views) / n_views
        u = np.cos(theta)[:, None] * x + np.sin(theta)[:, None] * y + (n_det - 1) / 2.0
        d0 = np.floor(u).astype(np.int64)
        w1 = (u - d0).astype(np.float32)
        row0 = np.arange(n_views)[:, None] * n_det + d0
        cols = np.broadcast_to(np.arange(m * m), u.shape)
        a = sp.coo_matrix(
            (np.concatenate([(1 - w1).ravel(), w1.ravel()]),
             (np.concatenate([row0.ravel(), row0.ravel() + 1]), np.concatenate([cols.ravel()] * 2))),
            shape=(n_views * n_det, m * m), dtype=np.float32).tocsr()
        _PROJECTORS[key] = (a, n_det)
    return _PROJECTORS[key]


def _filter_matrix(n_det: int, name: str) -> np.ndarray:
    """Ramp filter ``name`` as a Toeplitz matrix H, float32 (n_det, n_det): filtered = sino @ H.

    The ramp comes from the band-limited spatial kernel (Kak & Slaney, eq. 61), which has no DC
    error; the apodisation window is applied in frequency. A dense matmul beats an FFT here.
    """
    key = ("filter", n_det, name)
    if key not in _FILTERS_CACHE:
        n_fft = 1 << int(math.ceil(math.log2(2 * n_det)))
        k = np.concatenate([np.arange(0, n_fft // 2 + 1), np.arange(-n_fft // 2 + 1, 0)])
        h = np.zeros(n_fft)
        h[0] = 0.25
        odd = k % 2 == 1
        h[odd] = -1.0 / (np.pi * k[odd]) ** 2
        f = np.fft.rfftfreq(n_fft)                  # cycles per detector bin, 0 .. 0.5
        window = {
            "ram-lak": np.ones_like(f),
            "shepp-logan": np.sinc(f),
            "cosine": np.cos(np.pi * f),
            "hamming": 0.54 + 0.46 * np.cos(2 * np.pi * f),
            "hann": 0.5 * (1 + np.cos(2 * np.pi * f)),
        }[name]
        kernel = np.fft.irfft(np.abs(np.fft.rfft(h)) * window, n=n_fft)
        lag = np.arange(n_det)[None, :] - np.arange(n_det)[:, None]
        _FILTERS_CACHE[key] = kernel[lag % n_fft].astype(np.float32)
    return _FILTERS_CACHE[key]


def _fbp(sino: np.ndarray, m: int, n_views: int, recon_filter: str) -> np.ndarray:
    """Filtered back-projection: sinogram (B, n_views*n_det) -> image (B, m*m), pixel units."""
    a, n_det = _projector(m, n_views)
    q = sino.reshape(-1, n_det) @ _filter_matrix(n_det, recon_filter)
    return (q.reshape(len(sino), -1) @ a) * np.float32(np.pi / n_views)


# --------------------------------------------------------------------------- phantom

def _grid(m: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in mm, x to the right, y downwards (anterior at the top): (1, m, m)."""
    c = (np.arange(m, dtype=np.float32) - (m - 1) / 2.0) * np.float32(FOV_MM / m)
    return c[None, None, :], c[None, :, None]


def _cover(dist_in_mm: np.ndarray, px: float) -> np.ndarray:
    """Approximate pixel coverage (0..1) from a signed distance inside a boundary, mm."""
    return np.clip(0.5 + dist_in_mm / px, 0.0, 1.0)


def _ellipse(x, y, cx, cy, a, b, px) -> np.ndarray:
    """Coverage of ellipses centred (cx, cy) with semi-axes (a, b), all (B, 1, 1) mm -> (B, m, m)."""
    # distance inside the boundary ~ (1 - rho^2) / 2 * min(a, b) near it (rho: elliptic radius)
    k = np.minimum(a, b) / np.float32(2.0 * px)
    cov = ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2
    cov *= -k
    cov += 0.5 + k
    return np.clip(cov, 0.0, 1.0, out=cov)


def _gauss_matrix(m: int, sigma_px: float, wrap: bool) -> np.ndarray:
    """Gaussian smoothing along one axis as a matrix G, float32 (m, m): smoothed = G @ a.

    wrap: circulant (periodic) kernel of unit sum; else rows renormalised to unit sum at the
    borders so that flat regions stay flat.
    """
    key = ("gauss", m, round(float(sigma_px), 9), wrap)
    if key not in _FILTERS_CACHE:
        d = np.arange(m)[:, None] - np.arange(m)[None, :]
        if wrap:
            d = (d + m // 2) % m - m // 2
        g = np.exp(-0.5 * (d / max(sigma_px, 1e-6)) ** 2)
        g[g < 1e-6] = 0.0          # float32 denormals would make the GEMMs ~50x slower
        _FILTERS_CACHE[key] = (g / g.sum(axis=1, keepdims=True)).astype(np.float32)
    return _FILTERS_CACHE[key]


def _blur(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 2-D smoothing of images (B, m, m) with the matrix g (m, m) from _gauss_matrix."""
    b, m, _ = a.shape
    t = (a.reshape(b * m, m) @ g.T).reshape(b, m, m)                    # along x (one GEMM)
    t = np.ascontiguousarray(t.transpose(0, 2, 1)).reshape(b * m, m) @ g.T  # along y
    return np.ascontiguousarray(t.reshape(b, m, m).transpose(0, 2, 1))


def _smooth_field(rng: np.random.Generator, b: int, m: int, sigma_px: float) -> np.ndarray:
    """Periodic Gaussian random field (b, m, m), unit variance, correlation length ``sigma_px`` pixels."""
    g = _gauss_matrix(m, sigma_px, wrap=True)
    w = rng.standard_normal((b, m, m), dtype=np.float32)
    return _blur(w, g) / np.float32((g[0] ** 2).sum())    # std of G w G^T is sum(g0^2)


def _gauss(exponent: np.ndarray) -> np.ndarray:
    """exp(exponent) floored at exp(-20), keeping float32 products clear of slow denormals."""
    return np.exp(np.maximum(exponent, -20.0))


def _col(v) -> np.ndarray:
    """(B,) -> (B, 1, 1) float32 for broadcasting against the image grid."""
    return np.asarray(v, dtype=np.float32)[:, None, None]


def _anatomy(rng: np.random.Generator, b: int, m: int) -> tuple[np.ndarray, dict]:
    """Background chest anatomy in HU (b, m, m) and the lung geometry used to place lesions."""
    x, y = _grid(m)
    px = FOV_MM / m
    jit = lambda s: rng.normal(0.0, s, b)        # noqa: E731
    a_body = np.clip(rng.normal(148.0, 8.0, b), 125.0, 162.0)
    b_body = np.clip(rng.normal(108.0, 7.0, b), 90.0, 122.0)
    cx, cy = jit(5.0), jit(5.0)
    fat = rng.uniform(8.0, 22.0, b)
    hu = np.full((b, m, m), -1000.0, dtype=np.float32)
    body = _ellipse(x, y, _col(cx), _col(cy), _col(a_body), _col(b_body), px)
    hu += body * (_col(rng.normal(-100.0, 10.0, b)) + 1000.0)
    soft = _ellipse(x, y, _col(cx), _col(cy), _col(a_body - fat), _col(b_body - fat), px)
    hu += soft * (_col(rng.normal(40.0, 8.0, b)) - hu)

    lung_hu = _col(rng.normal(-850.0, 25.0, b)) + 25.0 * _smooth_field(rng, b, m, 1.5)
    lungs = []
    lung_cov = np.zeros_like(hu)
    for side in (-1.0, 1.0):
        lcx = cx + side * a_body * rng.uniform(0.42, 0.48, b)
        lcy = cy + b_body * rng.uniform(-0.08, 0.02, b)
        la = a_body * rng.uniform(0.30, 0.36, b)
        lb = b_body * rng.uniform(0.62, 0.74, b)
        lungs.append((lcx, lcy, la, lb))
        lung_cov = np.maximum(lung_cov, _ellipse(x, y, _col(lcx), _col(lcy), _col(la), _col(lb), px))
    hu += lung_cov * (lung_hu - hu)

    heart = (cx + a_body * rng.uniform(0.05, 0.12, b), cy - b_body * rng.uniform(0.05, 0.15, b),
             a_body * rng.uniform(0.22, 0.28, b), b_body * rng.uniform(0.28, 0.36, b))
    heart_cov = _ellipse(x, y, *(_col(v) for v in heart), px)
    hu += heart_cov * (_col(rng.normal(40.0, 8.0, b)) - hu)

    r_vert = rng.uniform(13.0, 19.0, b)
    vcx, vcy = cx + jit(3.0), cy + b_body - fat - r_vert - rng.uniform(8.0, 16.0, b)
    vert = _ellipse(x, y, _col(vcx), _col(vcy), _col(r_vert), _col(r_vert * rng.uniform(0.85, 1.0, b)), px)
    hu += vert * (_col(rng.normal(700.0, 80.0, b)) - hu)
    space = lung_cov * (1.0 - heart_cov)         # where vessels and nodules may be visible
    return hu, {"lungs": lungs, "heart": heart, "space": space}


def _in_lung(rng: np.random.Generator, lungs: list, heart: tuple, margin: np.ndarray,
             reach: float, tries: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Random points (B,) mm inside a random lung, preferring points clear of the heart."""
    b = len(margin)
    px_out, py_out = np.zeros(b), np.zeros(b)
    done = np.zeros(b, dtype=bool)
    hx, hy, ha, hb = heart
    for t in range(tries):
        side = rng.integers(0, 2, b)
        lcx, lcy, la, lb = (np.where(side == 0, lungs[0][i], lungs[1][i]) for i in range(4))
        rho = reach * np.sqrt(rng.uniform(0.0, 1.0, b))
        phi = rng.uniform(0.0, 2 * np.pi, b)
        qx, qy = lcx + rho * la * np.cos(phi), lcy + rho * lb * np.sin(phi)
        clear = ((qx - hx) / (ha + margin)) ** 2 + ((qy - hy) / (hb + margin)) ** 2 > 1.0
        take = ~done & (clear | (t == tries - 1))   # last try: accept wherever it fell
        px_out[take], py_out[take] = qx[take], qy[take]
        done |= take
    return px_out, py_out


def _vessels(rng: np.random.Generator, hu: np.ndarray, geo: dict) -> np.ndarray:
    """Add 2..6 vessel cross-sections (Gaussian blobs, radius 1.5-5 mm, ~40 HU) inside the lungs."""
    b, m, _ = hu.shape
    x, y = _grid(m)
    count = rng.integers(2, _MAX_VESSELS + 1, b)
    for k in range(_MAX_VESSELS):
        r = rng.uniform(1.5, 5.0, b)
        vx, vy = _in_lung(rng, geo["lungs"], geo["heart"], r, 0.9, tries=2)
        # Gaussian of the disc's mass; widened to >= 0.45 px (peak lowered to keep the mass)
        # so that sub-pixel vessels are not lost between pixel centres.
        sigma = r / np.sqrt(2.0)
        sigma_eff = np.maximum(sigma, 0.45 * FOV_MM / m)
        peak = (sigma / sigma_eff) ** 2 * (k < count)
        inv = _col(-0.5 / sigma_eff ** 2)
        prof = _col(peak) * _gauss(inv * (y - _col(vy)) ** 2) * _gauss(inv * (x - _col(vx)) ** 2)
        hu += geo["space"] * prof * (_col(rng.normal(40.0, 15.0, b)) - hu)
    return hu


def _lesion_params(rng: np.random.Generator, malign: np.ndarray) -> dict:
    """Per-nodule shape and density draws for nodules (K,); ``malign`` (K,) bool."""
    k = len(malign)
    benign_r = rng.lognormal(np.log(NODULE["benign_radius_mm"]), NODULE["radius_spread"], k)
    malign_r = rng.lognormal(np.log(NODULE["malignant_radius_mm"]), NODULE["radius_spread"], k)
    calcified = ~malign & (rng.uniform(size=k) < NODULE["calcified_share"])
    dens = np.where(malign, rng.uniform(*NODULE["malignant_hu"], k), rng.normal(*NODULE["benign_hu"], k))
    return {
        "r0": np.where(malign, malign_r, benign_r),
        # lobulation: relative amplitude of radial harmonics 2..5
        "amp": np.where(malign, NODULE["malignant_lobulation"], NODULE["benign_lobulation"])[:, None]
        * rng.uniform(0.0, 1.0, (k, 4)),
        "phase": rng.uniform(0.0, 2 * np.pi, (k, 4)),
        "n_spicules": np.where(malign & (rng.uniform(size=k) < NODULE["spiculated_share"]),
                               rng.integers(3, _MAX_SPICULES + 1, k), 0),
        "hu": np.where(calcified, rng.uniform(*NODULE["calcified_hu"], k), dens),
        "hetero_hu": np.where(malign, NODULE["malignant_texture_hu"], 10.0),
    }


def _nodules(rng: np.random.Generator, hu: np.ndarray, labels: np.ndarray, geo: dict) -> np.ndarray:
    """Paint one nodule in a lung of every image with label 1 (benign) or 2 (malignant); in place."""
    idx = np.flatnonzero(labels > 0)
    if len(idx) == 0:
        return hu
    m = hu.shape[1]
    x, y = _grid(m)
    px = FOV_MM / m
    malign = labels[idx] == 2
    p = _lesion_params(rng, malign)
    lungs = [tuple(v[idx] for v in lung) for lung in geo["lungs"]]
    nx, ny = _in_lung(rng, lungs, tuple(v[idx] for v in geo["heart"]), p["r0"], 0.7)
    dx, dy = x - _col(nx), y - _col(ny)
    r = np.sqrt(dx ** 2 + dy ** 2)
    th = np.arctan2(dy, dx)
    boundary = np.ones_like(r)
    for i, k in enumerate(range(2, 6)):
        boundary += _col(p["amp"][:, i]) * np.cos(k * th + _col(p["phase"][:, i]))
    mask = _cover(boundary * _col(p["r0"]) - r, px)

    # Spicules: thin radial spikes (sub-pixel width) reaching 1.5-2.8 r0 from the centre.
    for j in range(_MAX_SPICULES):
        psi = rng.uniform(0.0, 2 * np.pi, len(idx))
        length = p["r0"] * rng.uniform(1.5, 2.8, len(idx))
        sel = np.flatnonzero(j < p["n_spicules"])
        if len(sel) == 0:
            continue
        c, s_ = _col(np.cos(psi[sel])), _col(np.sin(psi[sel]))
        along = dx[sel] * c + dy[sel] * s_
        perp = -dx[sel] * s_ + dy[sel] * c
        spike = _gauss(-0.5 * (perp / (0.35 * px)) ** 2) * _cover(_col(length[sel]) - along, px) * (along > 0)
        mask[sel] = np.maximum(mask[sel], 0.8 * spike)

    value = _col(p["hu"]) + _col(p["hetero_hu"]) * _smooth_field(rng, len(idx), m, 1.0)
    hu[idx] += mask * (value - hu[idx])
    return hu


def _phantoms(rng: np.random.Generator, labels: np.ndarray, m: int) -> np.ndarray:
    """Ground-truth chest slices in HU, float32 (B, m, m), for the given labels (B,)."""
    hu, geo = _anatomy(rng, len(labels), m)
    hu = _vessels(rng, hu, geo)
    return _nodules(rng, hu, labels, geo)


# --------------------------------------------------------------------------- scanner

def _noisy_counts(rng: np.random.Generator, lam: np.ndarray, electronic: float) -> np.ndarray:
    """Detected counts for expected photons ``lam`` (B, R): Poisson plus Gaussian electronic noise.

    Poisson draws are exact below _EXACT_POISSON_BELOW expected photons (photon starvation);
    above it photon and electronic noise are drawn as one Gaussian of variance lam + electronic**2,
    which differs little from Poisson there and costs one normal draw per ray.
    """
    sd = np.sqrt(lam + np.float32(electronic) ** 2)
    counts = lam + sd * rng.standard_normal(lam.shape, dtype=np.float32)
    low = lam < _EXACT_POISSON_BELOW
    lam_low = lam[low]
    counts[low] = rng.poisson(lam_low) + np.float32(electronic) * rng.standard_normal(
        lam_low.shape, dtype=np.float32)
    return counts


def _scan(rng: np.random.Generator, hu: np.ndarray, prof: SiteProfile) -> np.ndarray:
    """Acquire and reconstruct phantoms (B, m, m) HU with the site's scanner -> HU (B, m, m)."""
    b, m, _ = hu.shape
    px = FOV_MM / m
    a, _n_det = _projector(m, prof.n_views)
    mu = np.maximum(MU_WATER * (1.0 + hu.reshape(b, -1) / 1000.0), 0.0) * px   # 1/pixel
    line = mu.astype(np.float32, copy=False) @ a.T             # line integrals, dimensionless
    lam = np.float32(prof.dose) * np.exp(-line)
    counts = np.maximum(_noisy_counts(rng, lam, prof.electronic_noise), 1.0)
    sino = np.log(np.float32(prof.dose) / counts)
    rec = _fbp(sino, m, prof.n_views, prof.recon_filter).reshape(b, m, m) / np.float32(px)
    rec = _blur(rec, _gauss_matrix(m, prof.blur, wrap=False))
    return (1000.0 * (rec / MU_WATER - 1.0)).astype(np.float32)


def _display(rng: np.random.Generator, hu_fine: np.ndarray, prof: SiteProfile) -> np.ndarray:
    """Reduce HU (B, 2s, 2s) by 2x2 means, apply calibration drift and the site window -> uint8 (B, s, s)."""
    b, m, _ = hu_fine.shape
    hu = hu_fine.reshape(b, m // 2, 2, m // 2, 2).mean(axis=(2, 4))
    gain = prof.gain * (1.0 + prof.drift_gain * rng.standard_normal(b))
    offset = prof.offset_hu + prof.drift_hu * rng.standard_normal(b)
    hu = _col(gain) * hu + _col(offset)
    lo = prof.window_level - prof.window_width / 2.0
    grey = np.clip((hu - lo) / prof.window_width, 0.0, 1.0) * 255.0
    return np.rint(grey).astype(np.uint8)


def _render(rng: np.random.Generator, labels: np.ndarray, prof: SiteProfile, size: int) -> np.ndarray:
    """Simulated uint8 images (B, size, size) of one site for labels (B,)."""
    hu = _phantoms(rng, labels, 2 * size)
    return _display(rng, _scan(rng, hu, prof), prof)


# --------------------------------------------------------------------------- data set

def _largest_remainder(total: int, probs: np.ndarray) -> np.ndarray:
    """Integer counts (K,) summing to ``total`` and closest to ``total * probs``."""
    raw = total * np.asarray(probs, dtype=np.float64)
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


def _check_args(n, sites, seed, size, site_offset, class_probs, split) -> np.ndarray | None:
    """Validate simulate_ct's arguments; return class_probs as float (sites, 3) or None."""
    for name, v in (("sites", sites), ("seed", seed), ("size", size), ("site_offset", site_offset), ("n", n)):
        if int(v) != v:
            raise ValueError(f"{name} must be an integer, got {v!r}")
    if sites < 1:
        raise ValueError(f"sites must be >= 1, got {sites}")
    if seed < 0 or site_offset < 0:
        raise ValueError(f"seed and site_offset must be >= 0, got seed={seed}, site_offset={site_offset}")
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}")
    if n < MIN_PER_SITE * sites:
        raise ValueError(f"n={n} is too small for {sites} sites: need at least {MIN_PER_SITE} images "
                         f"per site (n >= {MIN_PER_SITE * sites}) to fill stratified train/val/test splits")
    check_memory(simulation_bytes(int(n), int(size)),
                 f"simulate_ct(n={int(n):,}, size={int(size)})",
                 "simulate fewer images (n) or smaller ones (size), or generate several data sets "
                 "with different seeds / site_offset and train on them one at a time")
    fr = np.asarray(split, dtype=np.float64)
    if fr.shape != (3,) or np.any(fr <= 0) or not np.isclose(fr.sum(), 1.0):
        raise ValueError(f"split must be three positive fractions (train, val, test) summing to 1, "
                         f"got {split!r}")
    if class_probs is None:
        return None
    p = np.asarray(class_probs, dtype=np.float64)
    if p.shape != (sites, len(CLASS_NAMES)):
        raise ValueError(f"class_probs must have shape (sites, {len(CLASS_NAMES)}) = ({sites}, "
                         f"{len(CLASS_NAMES)}), got {p.shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError("class_probs must be finite and non-negative")
    if not np.allclose(p.sum(axis=1), 1.0, atol=1e-6):
        raise ValueError(f"each row of class_probs must sum to 1, got row sums "
                         f"{p.sum(axis=1).round(6).tolist()}")
    return p


def simulation_bytes(n: int, size: int) -> int:
    """Peak memory of :func:`simulate_ct` (estimate, bytes): every image is held three times
    (rendered, pooled per split, shuffled copy) with its label, site id and share of the chunk
    seeds (64 B), plus the render buffers of the worker threads (one chunk of ``_CHUNK`` images
    at ``2*size``: about 150 MB per worker at size 28, scaled with the image area)."""
    per_image = 3 * size * size + 64
    render = _MAX_WORKERS * 150e6 * (size / 28.0) ** 2
    return int(n * per_image + render)


def _stratified_counts(class_counts: np.ndarray, split: np.ndarray) -> np.ndarray:
    """Integer table (classes, splits) rounding ``class_counts * split`` cell by cell (each cell
    is its floor or ceiling) so that rows sum to ``class_counts`` and columns to the
    largest-remainder split of the total (a controlled rounding; 3 x 3 is small enough to
    enumerate every up/down pattern and keep the one closest to the exact table)."""
    raw = class_counts[:, None] * split[None, :]
    table = np.floor(raw).astype(np.int64)
    row_left = class_counts - table.sum(axis=1)
    col_left = _largest_remainder(int(class_counts.sum()), split) - table.sum(axis=0)
    k = table.size
    ups = ((np.arange(2 ** k)[:, None] >> np.arange(k)) & 1).reshape(-1, *table.shape)
    rows_ok = (ups.sum(axis=2) == row_left).all(axis=1) & ~((raw == table) & (ups == 1)).any(axis=(1, 2))
    ok = rows_ok & (ups.sum(axis=1) == col_left).all(axis=1)
    if not ok.any():        # never seen; keep the class counts exact and let split totals move by 1
        ok = rows_ok
    score = (ups * (raw - table)).sum(axis=(1, 2))
    best = np.flatnonzero(ok)[np.argmax(score[ok])]
    return table + ups[best]


def _split_site(labels: np.ndarray, split: np.ndarray) -> list[np.ndarray]:
    """Indices of train / val / test for one site, stratified by label (labels already shuffled)."""
    classes = np.arange(len(CLASS_NAMES))
    table = _stratified_counts(np.bincount(labels, minlength=len(classes)), split)
    parts: list[list[np.ndarray]] = [[], [], []]
    for c in classes:
        ends = np.cumsum(table[c])[:-1]
        for j, chunk in enumerate(np.split(np.flatnonzero(labels == c), ends)):
            parts[j].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def _run_jobs(jobs: list, size: int, progress_total: int) -> None:
    """Render chunks ``(images, labels, slice, profile, seed_seq)`` into their images, in threads.

    Each chunk has its own seed, so the result does not depend on the thread schedule. numpy
    and scipy.sparse release the GIL in the heavy kernels; BLAS is held to one thread per
    worker because its small GEMMs only lose from nested threading.
    """
    def render(job) -> int:
        images, labels, sl, prof, css = job
        images[sl] = _render(np.random.Generator(np.random.PCG64(css)), labels[sl], prof, size)
        return len(labels[sl])

    bar = None
    if progress_total:
        from tqdm.auto import tqdm
        bar = tqdm(total=progress_total, desc="simulate_ct", unit="img")
    for prof in {job[3] for job in jobs}:            # fill the caches before the threads share them
        _a, n_det = _projector(2 * size, prof.n_views)
        _filter_matrix(n_det, prof.recon_filter)
        _gauss_matrix(2 * size, prof.blur, wrap=False)
    workers = max(1, min(_MAX_WORKERS, os.cpu_count() or 1, len(jobs)))
    try:
        from threadpoolctl import threadpool_limits
        limits = threadpool_limits(1, user_api="blas")
    except ImportError:        # optional: only a speed matter
        limits = contextlib.nullcontext()
    with limits, ThreadPoolExecutor(workers) as pool:
        for done in pool.map(render, jobs):
            if bar is not None:
                bar.update(done)
    if bar is not None:
        bar.close()


def simulate_ct(n: int = 10000, sites: int = 5, seed: int = 0, *, size: int = 28,
                site_offset: int = 0, class_probs: "np.ndarray | None" = None,
                split: tuple[float, float, float] = (0.7, 0.1, 0.2), progress: bool = False) -> Dataset:
    """Simulate a three-class chest-CT nodule data set acquired at ``sites`` sites.

    n: total images, shared out evenly over the sites (at least MIN_PER_SITE per site).
    sites, site_offset: the sites are ids ``site_offset .. site_offset + sites - 1``; a site's
    scanner and default label mix depend on its id only (see :func:`site_profile`).
    seed: data seed (patients, lesions, noise); the same arguments give byte-identical arrays.
    size: output side, pixels (rendered at 2*size and area-reduced).
    class_probs: optional (sites, 3) label mix per site, rows summing to 1; default: each
    site's own mix (label shift between sites). Per-site class counts are exact roundings.
    split: train / val / test fractions, applied per site and per class.
    Returns a Dataset whose ImageSets hold uint8 (N, size, size) images, int64 labels and site ids.
    """
    probs = _check_args(n, sites, seed, size, site_offset, class_probs, split)
    n, sites, seed, size, site_offset = (int(v) for v in (n, sites, seed, size, site_offset))
    fr = np.asarray(split, dtype=np.float64)
    per_site = _largest_remainder(n, np.full(sites, 1.0 / sites))
    site_data, jobs = [], []
    for i in range(sites):
        site = site_offset + i
        prof = site_profile(site)
        n_site = int(per_site[i])
        mix = probs[i] if probs is not None else np.asarray(prof.class_mix)
        # One seed stream per (seed, site): a site's images do not depend on the other sites.
        ss = np.random.SeedSequence([_DATA_SALT, int(seed), site])
        label_ss, *chunk_ss = ss.spawn(1 + -(-n_site // _CHUNK))
        labels = np.repeat(np.arange(len(CLASS_NAMES)), _largest_remainder(n_site, mix))
        labels = np.random.Generator(np.random.PCG64(label_ss)).permutation(labels).astype(np.int64)
        images = np.empty((n_site, size, size), dtype=np.uint8)
        site_data.append((site, labels, images))
        jobs += [(images, labels, slice(k * _CHUNK, (k + 1) * _CHUNK), prof, css)
                 for k, css in enumerate(chunk_ss)]
    _run_jobs(jobs, size, n if progress else 0)

    pieces: list[list[ImageSet]] = [[], [], []]
    for site, labels, images in site_data:
        site_ids = np.full(len(labels), site, dtype=np.int64)
        for j, idx in enumerate(_split_site(labels, fr)):
            pieces[j].append(ImageSet(images[idx], labels[idx], site_ids[idx]))
    shuffle = np.random.Generator(np.random.PCG64(np.random.SeedSequence([_DATA_SALT, int(seed)])))
    splits = []
    for parts in pieces:
        s = ImageSet.concat(parts)
        splits.append(s.subset(shuffle.permutation(len(s))))
    params = {"n": n, "sites": sites, "seed": seed, "size": size, "site_offset": site_offset,
              "class_probs": None if probs is None else probs.tolist(),
              "split": [float(f) for f in fr]}
    generator = "medchain.data.simulate.simulate_ct"
    digest = hashlib.sha256(json.dumps({"generator": generator, "params": params},
                                       sort_keys=True).encode()).hexdigest()
    return Dataset(name="simulated_ct", train=splits[0], val=splits[1], test=splits[2],
                   n_classes=len(CLASS_NAMES), class_names=list(CLASS_NAMES),
                   source=f"simulated:n={n},sites={sites},seed={seed},site_offset={site_offset},size={size}",
                   origin={"kind": "simulated", "generator": generator, "params": params,
                           "sha256": digest})

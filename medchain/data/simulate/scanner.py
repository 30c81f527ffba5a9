"""The simulated scanner: parallel-beam projection with a cached sparse system matrix, photon
and electronic noise, filtered back-projection, blur, HU calibration drift and display window."""
from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from medchain.data.simulate.kernels import _blur, _col, _filter_matrix, _gauss_matrix
from medchain.data.simulate.sites import FOV_MM, SiteProfile


MU_WATER = 0.0193         # linear attenuation of water at ~70 keV, 1/mm


_EXACT_POISSON_BELOW = 10.0


_PROJECTORS: dict[tuple[int, int], tuple[sp.csr_matrix, int]] = {}


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


def _fbp(sino: np.ndarray, m: int, n_views: int, recon_filter: str) -> np.ndarray:
    """Filtered back-projection: sinogram (B, n_views*n_det) -> image (B, m*m), pixel units."""
    a, n_det = _projector(m, n_views)
    q = sino.reshape(-1, n_det) @ _filter_matrix(n_det, recon_filter)
    return (q.reshape(len(sino), -1) @ a) * np.float32(np.pi / n_views)


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

"""The cached matrices the simulator applies along image rows and columns: Gaussian blurs
(:func:`_gauss_matrix`, :func:`_blur`) and the FBP reconstruction filters (:func:`_filter_matrix`)."""
from __future__ import annotations

import math

import numpy as np


_FILTERS_CACHE: dict[tuple, np.ndarray] = {}


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


def _col(v) -> np.ndarray:
    """(B,) -> (B, 1, 1) float32 for broadcasting against the image grid."""
    return np.asarray(v, dtype=np.float32)[:, None, None]

"""Ground-truth chest slices in Hounsfield units: body, lungs with parenchymal texture, heart,
vertebra, vessels and at most one nodule per slice, benign or malignant (:data:`NODULE`)."""
from __future__ import annotations

import numpy as np

from medchain.data.simulate.kernels import _blur, _col, _gauss_matrix
from medchain.data.simulate.sites import FOV_MM


_MAX_VESSELS = 6


_MAX_SPICULES = 8


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


def _smooth_field(rng: np.random.Generator, b: int, m: int, sigma_px: float) -> np.ndarray:
    """Periodic Gaussian random field (b, m, m), unit variance, correlation length ``sigma_px`` pixels."""
    g = _gauss_matrix(m, sigma_px, wrap=True)
    w = rng.standard_normal((b, m, m), dtype=np.float32)
    return _blur(w, g) / np.float32((g[0] ** 2).sum())    # std of G w G^T is sum(g0^2)


def _gauss(exponent: np.ndarray) -> np.ndarray:
    """exp(exponent) floored at exp(-20), keeping float32 products clear of slow denormals."""
    return np.exp(np.maximum(exponent, -20.0))


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

"""Sites of the simulated chest-CT data: each site's scanner and default label mix, a function of
the site id alone (:func:`site_profile`), and the constants the simulator shares (class names,
reconstruction filters, field of view)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


CLASS_NAMES = ["no nodule", "benign", "malignant"]
FILTERS = ("ram-lak", "shepp-logan", "cosine", "hamming", "hann")


FOV_MM = 320.0            # reconstructed field of view (square side), mm


_SITE_SALT = 0x5C47E      # seeds of site profiles: independent of the data seed


# Default label mix of site s is row s % 5: any 5 consecutive sites pool to (0.4, 0.3, 0.3),
# while single sites differ strongly (label shift).
CLASS_MIX_TABLE = np.array([
    [0.55, 0.25, 0.20],
    [0.30, 0.45, 0.25],
    [0.40, 0.20, 0.40],
    [0.25, 0.35, 0.40],
    [0.50, 0.25, 0.25],
])


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

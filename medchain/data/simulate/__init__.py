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

Modules: :mod:`~medchain.data.simulate.sites`, :mod:`~medchain.data.simulate.kernels`,
:mod:`~medchain.data.simulate.phantom`, :mod:`~medchain.data.simulate.scanner`, :mod:`~medchain.data.simulate.dataset`.
"""
from medchain.data.simulate.dataset import simulate_ct, simulation_bytes
from medchain.data.simulate.sites import CLASS_NAMES, FILTERS, SiteProfile, site_profile

__all__ = ["CLASS_NAMES", "FILTERS", "SiteProfile", "site_profile", "simulate_ct", "simulation_bytes"]

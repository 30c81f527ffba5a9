"""Simulated chest-CT generator benchmark: images per second for the embedded default data set.
Writes benchmarks/results/simulate.json.

    python benchmarks/bench_simulate.py                  # 10,000 images, 5 sites, seed 0
    python benchmarks/bench_simulate.py --n 2000 --out /tmp/sim.json

What is measured
* wall time and process CPU time of one ``simulate_ct(n, sites, seed)`` call in a fresh process,
  so it includes building the cached sparse projectors (reported apart as ``projector_build_s``,
  measured by a second, untimed-for-throughput build in a clean cache);
* images per second = n / wall time; CPU / wall shows how much the render threads overlapped.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import scipy  # noqa: E402

from medchain.data import simulate as sim  # noqa: E402


def projector_build_seconds(sites: int, site_offset: int, size: int) -> float:
    """Time to build the projectors (and filters) of the given sites from an empty cache, s."""
    saved = dict(sim._PROJECTORS), dict(sim._FILTERS_CACHE)
    sim._PROJECTORS.clear()
    sim._FILTERS_CACHE.clear()
    t0 = time.perf_counter()
    for site in range(site_offset, site_offset + sites):
        prof = sim.site_profile(site)
        _a, n_det = sim._projector(2 * size, prof.n_views)
        sim._filter_matrix(n_det, prof.recon_filter)
    elapsed = time.perf_counter() - t0
    sim._PROJECTORS.update(saved[0])
    sim._FILTERS_CACHE.update(saved[1])
    return elapsed


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "simulate.json")
    args = ap.parse_args(argv)

    cpu0, t0 = time.process_time(), time.perf_counter()
    ds = sim.simulate_ct(args.n, args.sites, args.seed, size=args.size)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    n_out = len(ds.train) + len(ds.val) + len(ds.test)
    assert n_out == args.n

    result = {
        "benchmark": "simulate_ct",
        "n": args.n,
        "sites": args.sites,
        "seed": args.seed,
        "size": args.size,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "images_per_s": round(args.n / wall, 1),
        "projector_build_s": round(projector_build_seconds(args.sites, 0, args.size), 3),
        "n_views_per_site": [sim.site_profile(s).n_views for s in range(args.sites)],
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

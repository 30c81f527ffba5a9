"""Running one experiment over several seeds, serially or one process (one torch thread) per seed.

A seed drives the partition, the initialization, the shuffling and attack initialization of one
run; the dataset itself stays fixed (it is the population the claim is about). Per-seed results
must be plain data (dicts, DataFrames, arrays) so they cross process boundaries.
"""
from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from typing import Callable

from tqdm.auto import tqdm


def parse_seeds(seeds, seed: int | None = None) -> list[int]:
    """A notebook's `seeds` parameter as a list of distinct ints ([0, 1, 2], "0-4", 3 → [3]).
    `seed` (the old single-seed parameter) is used when seeds is None."""
    if seeds is None:
        seeds = [0 if seed is None else seed]
    if isinstance(seeds, str):
        lo, sep, hi = seeds.partition("-")
        if not sep or not lo.strip().isdigit() or not hi.strip().isdigit():
            raise ValueError(f"seeds {seeds!r} is not a list or a range like '0-4'")
        seeds = list(range(int(lo), int(hi) + 1))
    if isinstance(seeds, int):
        seeds = [seeds]
    out = [int(s) for s in seeds]
    if not out or len(set(out)) != len(out) or min(out) < 0:
        raise ValueError(f"seeds must be distinct non-negative integers, got {seeds!r}")
    return out


def _one_thread_call(fn: Callable, seed: int):
    import torch

    torch.set_num_threads(1)
    return fn(seed=seed)


def map_seeds(fn: Callable, seeds: list[int], *, jobs: int = 1, desc: str = "seeds",
              progress: bool = True, **kwargs) -> list:
    """[fn(seed=s, **kwargs) for s in seeds], in seed order.

    jobs > 1 runs seeds in separate processes (spawned: no state leaks between seeds), each with
    one torch thread, so every seed's numbers are those of a serial one-thread run. fn and kwargs
    must be picklable (a module-level function)."""
    seeds = parse_seeds(seeds)
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    call = partial(fn, **kwargs)
    if jobs == 1 or len(seeds) == 1:
        return [call(seed=s) for s in tqdm(seeds, desc=desc, disable=not progress)]
    with ProcessPoolExecutor(max_workers=min(jobs, len(seeds)), mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_one_thread_call, call, s) for s in seeds]
        return [f.result() for f in tqdm(futures, desc=desc, disable=not progress)]

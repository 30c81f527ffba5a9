"""Helpers shared by the deployment-mode tests (test_deploy, test_faults, test_hostile, test_chaos):
a tiny learnable toy data set, the in-process reference run, and starting a local drill
(:class:`medchain.node.Deployment`) up to an open round 0."""
from __future__ import annotations

import numpy as np

from medchain.training import torch_threads

SIZE = 12          # 12×12 toy images: the cnn accepts any size and trains fast (lenet needs 28×28)


def toy_dataset(n_train: int = 120, n_val: int = 60, n_test: int = 90, seed: int = 0, amp: int = 60,
                size: int = SIZE):
    """A 2-class toy set of size×size images: class 1 has a brighter 4×4 square (amp grey levels
    above the noise)."""
    from medchain.data.types import Dataset, ImageSet

    def split(n, s):
        rng = np.random.default_rng([seed, s])
        y = rng.integers(0, 2, n)
        x = rng.integers(0, 100, (n, size, size))
        x[y == 1, 3:7, 3:7] += amp
        return ImageSet(np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64))
    return Dataset("toy", split(n_train, 1), split(n_val, 2), split(n_test, 3), 2, ["neg", "pos"])


def toy_source(folder, **kw) -> str:
    """The toy set written as a MedMNIST-layout npz, usable as `--data PATH`."""
    from medchain.data import save_npz
    return str(save_npz(toy_dataset(**kw), folder / "toy.npz"))


def one_thread():
    """Node processes train with 1 torch thread; the in-process reference must too (the thread
    count changes the trained weights)."""
    return torch_threads(1)


def reference_run(source: str, n: int, cfg, partition: str = "iid"):
    """The in-process simulation (chain-free reference) on the same split the nodes use."""
    from medchain.data import load_dataset, partition as split
    from medchain.protocol import run_collaborative

    ds = load_dataset(source)
    insts = split(ds, n, partition, seed=cfg.seed)
    with one_thread():
        return run_collaborative(insts, ds.n_classes, cfg, chain=None)


def start_drill(dep):
    """Start the chain, create the task (1 channel, 2 classes), launch the nodes, start the task;
    returns a read-only ledger client for the test's waits."""
    from medchain.chain import LedgerClient

    dep.start_chain()
    dep.create_task(1, 2)
    dep.launch()
    dep.start_task()
    return LedgerClient(dep.w3, dep.ledger.address)


def final_digests(dep, indices=None) -> set[str]:
    """The final global digests the given nodes (default all) reported in their metrics."""
    return {m["final_digest"] for p in dep.nodes if indices is None or p.index in indices
            for m in p.metrics() if m["event"] == "final"}

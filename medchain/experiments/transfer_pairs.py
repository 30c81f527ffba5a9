"""Task pairs for claim 3 with a stated relation between the source task (chain A) and the target
task (chain B), and the controls that can refute the claim. Used by notebook 03.

A *pair* is one target task and several source tasks, each labelled with its relation to it:

* ``"similar"`` — the same modality, another question (or population);
* ``"same_task"`` — the paper's own setting: the same question at other sites (more data of the
  same task, shifted in scanner and class mix);
* ``"unrelated"`` — another modality: what any pre-training gives, the control that "similar"
  has to beat.

Presets (:data:`PAIRS`):

``"ct_detection"`` (simulated, nothing downloaded) — target: three-class nodule grading (no nodule
/ benign / malignant) at two unseen sites with a referral lesion mix; similar: nodule present vs
absent (labels ``(0, 1, 1)``) at sites 0–4; same_task: the three-class task at sites 0–4;
unrelated: handwritten digits (:func:`digits_dataset`, bundled with scikit-learn, not medical).
Source and target images are generated with different data seeds at different sites.

``"retina_referable"`` (real images only for the similar pair) — RetinaMNIST (DeepDRiD fundus
photographs, five diabetic-retinopathy grades). Target: the five-grade task; similar: referable
retinopathy vs not (grade ≥ 2, moderate non-proliferative or worse: labels ``(0, 0, 1, 1, 1)``);
same_task: the five-grade task on the source's images; unrelated: the simulated CT (grey repeated
to RGB). Disjointness (:func:`split_by_image`): the official train and val splits are pooled and
split *by image index* before anything else — a permutation drawn from ``data_seed``, the first
``source_share`` to the source, the rest to the target; the target's test split is the official
test split (DeepDRiD's separate evaluation set), which no source sees. No image is byte-identical
across the two sides (:func:`shared_images`, checked on every build). The file holds no patient
ids, so two images of one patient (DeepDRiD has several per eye) may fall on both training sides;
the target's *test* patients are never in a source.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from medchain.data import Dataset, ImageSet

__all__ = ["RELATIONS", "PAIRS", "TaskPair", "make_pair", "split_by_image", "shared_images", "digits_dataset",
           "REFERABLE_MAP", "DETECTION_MAP", "DIGITS_TRAIN"]

RELATIONS = {"similar": "similar task (same modality, another question)",
             "same_task": "same task at other sites (the paper's setting)",
             "unrelated": "unrelated task (another modality)"}

#: RetinaMNIST grade → referable diabetic retinopathy (grade ≥ 2: moderate NPDR or worse).
REFERABLE_MAP = (0, 0, 1, 1, 1)
#: Training images of :func:`digits_dataset` (70 % of scikit-learn's 1,797).
DIGITS_TRAIN = int(0.7 * 1797)
#: Simulated CT class → nodule present (benign or malignant) vs absent.
DETECTION_MAP = (0, 1, 1)

PAIRS = {
    "ct_detection": "simulated CT: nodule detection at sites 0–4 (chain A) → three-class grading at unseen sites "
                    "(chain B); same_task: grading at sites 0–4; unrelated: handwritten digits",
    "retina_referable": "RetinaMNIST: referable vs not on one set of images (chain A) → five grades on a disjoint "
                        "set (chain B); same_task: five grades on the source images; unrelated: simulated CT",
}


@dataclass
class TaskPair:
    """One target task and its source tasks, keyed by relation (:data:`RELATIONS`)."""

    name: str
    target: Dataset
    sources: dict[str, Dataset]
    description: str
    disjointness: str
    shared: dict[str, int] = field(default_factory=dict)   # relation -> images shared with the target (0)


def _image_hashes(ds: Dataset) -> set[bytes]:
    return {hashlib.sha256(np.ascontiguousarray(im).tobytes()).digest()
            for s in (ds.train, ds.val, ds.test) for im in s.images}


def shared_images(a: Dataset, b: Dataset) -> int:
    """How many distinct images (byte-identical pixel arrays) occur in both data sets, any split."""
    return len(_image_hashes(a) & _image_hashes(b))


def _with_splits(ds: Dataset, name: str, train: ImageSet, val: ImageSet, test: ImageSet, note: str) -> Dataset:
    return Dataset(name=name, train=train, val=val, test=test, n_classes=ds.n_classes,
                   class_names=list(ds.class_names), source=f"{ds.source};{note}", origin=dict(ds.origin))


def split_by_image(ds: Dataset, source_share: float = 0.5, *, seed: int = 0,
                   val_share: float = 0.1) -> tuple[Dataset, Dataset]:
    """Split ``ds`` into a source side and a target side that share no image index.

    The train and val splits are pooled (N images) and permuted with ``seed``; the first
    ``round(source_share · N)`` go to the source, the rest to the target. Each side keeps
    ``val_share`` of its images for validation; the source keeps as many again as its own test
    split (to score the source task); the target's test split is ``ds.test`` unchanged.
    Returns ``(source, target)``; their ``source`` strings record the split."""
    if not 0 < source_share < 1:
        raise ValueError(f"source_share must lie strictly between 0 and 1, got {source_share}")
    if not 0 < val_share < 0.5:
        raise ValueError(f"val_share must lie in (0, 0.5), got {val_share}")
    pool = ImageSet.concat([ds.train, ds.val])
    perm = np.random.default_rng(seed).permutation(len(pool))
    n_src = int(round(source_share * len(pool)))
    src_idx, tgt_idx = perm[:n_src], perm[n_src:]
    if min(len(src_idx), len(tgt_idx)) < 20:
        raise ValueError(f"{ds.name}: {len(pool)} images split {len(src_idx)}/{len(tgt_idx)} leave a side with "
                         "fewer than 20 images; pick source_share nearer 0.5")
    nv_s, nv_t = (max(1, int(round(val_share * len(i)))) for i in (src_idx, tgt_idx))
    note = f"split=image-index,seed={seed},source_share={source_share:g}"
    source = _with_splits(ds, ds.name, pool.subset(src_idx[2 * nv_s:]), pool.subset(src_idx[:nv_s]),
                          pool.subset(src_idx[nv_s:2 * nv_s]), f"{note},side=source")
    target = _with_splits(ds, ds.name, pool.subset(tgt_idx[nv_t:]), pool.subset(tgt_idx[:nv_t]), ds.test,
                          f"{note},side=target")
    return source, target


def digits_dataset(size: int = 28, seed: int = 0) -> Dataset:
    """Handwritten digits 0–9 (scikit-learn's bundled copy of the UCI set, 1,797 images of 8×8),
    resized to ``size``×``size`` grey uint8 and split 70/10/20 at random (``seed``): an unrelated,
    non-medical source task available offline."""
    from skimage.transform import resize
    from sklearn.datasets import load_digits
    d = load_digits()
    imgs = np.stack([resize(im / 16.0, (size, size), order=1, anti_aliasing=False) for im in d.images])
    imgs = np.clip(np.round(imgs * 255), 0, 255).astype(np.uint8)
    labels = d.target.astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(labels))
    n_tr, n_va = DIGITS_TRAIN, int(0.1 * len(perm))
    part = lambda i: ImageSet(imgs[i], labels[i])  # noqa: E731
    return Dataset(name="digits", train=part(perm[:n_tr]), val=part(perm[n_tr:n_tr + n_va]),
                   test=part(perm[n_tr + n_va:]), n_classes=10, class_names=[str(c) for c in range(10)],
                   source=f"sklearn:digits,size={size},seed={seed}",
                   origin={"kind": "in-memory", "generator": "sklearn.datasets.load_digits"})


def make_pair(name: str, *, relations: Sequence[str] | None = None, source_n: int = 10_000, source_sites: int = 5,
              target_n: int = 4_800, target_sites: int = 2, target_site_offset: int = 5,
              target_class_probs: Sequence[float] | None = None, source_share: float = 0.5,
              data_seed: int = 0) -> TaskPair:
    """The task pair ``name`` (:data:`PAIRS`) with the sources ``relations`` (None: all three).

    The simulated-CT arguments size the simulated tasks (``target_class_probs`` None: the
    default referral mix of :func:`medchain.experiments.transfer.make_tasks`); ``source_share``
    is the RetinaMNIST share of images on the source side. Every source is checked to share no
    image with the target (ValueError otherwise). Grey and RGB tasks are lifted to RGB together."""
    from medchain.experiments.transfer import TARGET_CLASS_PROBS, grey_to_rgb, make_tasks, relabel
    if name not in PAIRS:
        raise ValueError(f"unknown pair {name!r}; choose one of {sorted(PAIRS)}")
    relations = list(RELATIONS) if relations is None else list(relations)
    bad = [r for r in relations if r not in RELATIONS]
    if bad or not relations or len(set(relations)) != len(relations):
        raise ValueError(f"relations {relations} must be distinct names from {list(RELATIONS)}")
    probs = TARGET_CLASS_PROBS if target_class_probs is None else target_class_probs
    sources: dict[str, Dataset] = {}
    if name == "ct_detection":
        src, target = make_tasks("simulated", "simulated", source_n=source_n, source_sites=source_sites,
                                 target_n=target_n, target_sites=target_sites, target_site_offset=target_site_offset,
                                 target_class_probs=probs, data_seed=data_seed)
        build = {"similar": lambda: relabel(src, DETECTION_MAP), "same_task": lambda: src,
                 "unrelated": lambda: digits_dataset(src.image_shape[0], data_seed)}
        disjoint = (f"source images simulated with data seed {data_seed} at sites 0–{source_sites - 1}, target "
                    f"images with data seed {data_seed + 1} at sites {target_site_offset}–"
                    f"{target_site_offset + target_sites - 1}; the digits are another data set")
    else:
        from medchain.data import load_dataset, simulate_ct
        src, target = split_by_image(load_dataset("retinamnist"), source_share, seed=data_seed)
        build = {"similar": lambda: relabel(src, REFERABLE_MAP), "same_task": lambda: src,
                 "unrelated": lambda: grey_to_rgb(simulate_ct(source_n, source_sites, data_seed))}
        disjoint = (f"RetinaMNIST train+val pooled and split by image index (permutation of seed {data_seed}): "
                    f"{source_share:.0%} to the source side, the rest to the target's train/val; the target's test "
                    "split is the official test split, which no source sees; no patient ids in the file, so "
                    "patient-disjointness of the two training sides is not guaranteed")
    for r in relations:
        sources[r] = build[r]()
    shared = {r: shared_images(ds, target) for r, ds in sources.items()}
    if any(shared.values()):
        raise ValueError(f"pair {name!r}: sources share images with the target ({shared}); the split is broken")
    return TaskPair(name, target, sources, PAIRS[name], disjoint, shared)

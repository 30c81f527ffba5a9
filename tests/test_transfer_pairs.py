"""Claim 3 between genuinely different tasks: the task pairs with a stated relation
(medchain.experiments.transfer_pairs), the controls (transfer_controls) and the multi-source sweep
whose verdict needs the similar source to beat both no transfer and the unrelated source
(transfer_sweep)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import SHARED_MEDMNIST, toy_images

from medchain.chain import connect
from medchain.data import Dataset, ImageSet
from medchain.experiments.transfer import train_source
from medchain.experiments.transfer_controls import linear_probe, pooled_multitask
from medchain.experiments.transfer_pairs import (DETECTION_MAP, REFERABLE_MAP, digits_dataset, make_pair,
                                                 shared_images, split_by_image)
from medchain.experiments.transfer_summary import score_table, summarize
from medchain.experiments.transfer_sweep import arms_for, parse_arm, run_sweep
from medchain.models import build_model
from medchain.protocol import CollabConfig

torch.set_num_threads(1)
MODEL = "cnn_small"


@pytest.fixture
def retina(monkeypatch):
    if not (SHARED_MEDMNIST / "retinamnist.npz").exists():
        pytest.skip(f"real RetinaMNIST not found in {SHARED_MEDMNIST} (only on the project's machines)")
    monkeypatch.setenv("MEDCHAIN_DATA", str(SHARED_MEDMNIST))
    from medchain.data import load_dataset
    return load_dataset("retinamnist")


def _keys(s: ImageSet) -> set[bytes]:
    return {im.tobytes() for im in s.images}


# ============================================================================ pairs and their data
def test_split_by_image_shares_no_image_and_keeps_the_official_test_split(retina):
    src, tgt = split_by_image(retina, 0.5, seed=3)
    pool = len(retina.train) + len(retina.val)
    assert sum(len(s) for s in (src.train, src.val, src.test, tgt.train, tgt.val)) == pool
    assert abs(len(src.train) + len(src.val) + len(src.test) - pool / 2) <= 1
    assert np.array_equal(tgt.test.images, retina.test.images) and np.array_equal(tgt.test.labels, retina.test.labels)
    assert shared_images(src, tgt) == 0
    every_src = set().union(*(_keys(s) for s in (src.train, src.val, src.test)))
    assert not every_src & (_keys(tgt.train) | _keys(tgt.val) | _keys(tgt.test))
    again, _ = split_by_image(retina, 0.5, seed=3)
    assert np.array_equal(again.train.images, src.train.images)             # deterministic by seed
    other, _ = split_by_image(retina, 0.5, seed=4)
    assert not np.array_equal(other.train.labels, src.train.labels)
    assert "side=source" in src.source and "side=target" in tgt.source
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="source_share"):
            split_by_image(retina, bad)
    # a side that cannot be split is refused, and a broken split is caught by the image check
    with pytest.raises(ValueError, match="fewer than 20"):
        split_by_image(retina, 0.99)
    assert shared_images(src, src) == len(every_src)


def test_retina_pair_referable_source_and_five_grade_target(retina):
    pair = make_pair("retina_referable", source_n=300, source_sites=3)
    assert set(pair.sources) == {"similar", "same_task", "unrelated"}
    assert pair.shared == {"similar": 0, "same_task": 0, "unrelated": 0}
    sim, same, unrel, tgt = pair.sources["similar"], pair.sources["same_task"], pair.sources["unrelated"], pair.target
    assert tgt.n_classes == same.n_classes == 5 and sim.n_classes == 2 and unrel.n_classes == 3
    assert len(sim.class_names) == 2 and " + " in sim.class_names[1]
    # referable = grade >= 2, on exactly the same-task source's images
    assert np.array_equal(sim.train.images, same.train.images)
    assert np.array_equal(sim.train.labels, (same.train.labels >= 2).astype(np.int64))
    assert list(REFERABLE_MAP) == [0, 0, 1, 1, 1]
    assert unrel.n_channels == tgt.n_channels == 3                         # grey CT lifted to RGB
    assert "by image index" in pair.disjointness and "official test" in pair.disjointness
    with pytest.raises(ValueError, match="unknown pair"):
        make_pair("retina")
    with pytest.raises(ValueError, match="relations"):
        make_pair("retina_referable", relations=["similar", "similar"])


def test_ct_pair_detection_source_grading_target_at_unseen_sites():
    pair = make_pair("ct_detection", source_n=300, source_sites=3, target_n=240, relations=["similar", "unrelated"])
    sim, unrel, tgt = pair.sources["similar"], pair.sources["unrelated"], pair.target
    assert sim.n_classes == 2 and tgt.n_classes == 3 and unrel.n_classes == 10
    assert set(np.unique(sim.train.site)) == {0, 1, 2} and set(np.unique(tgt.train.site)) == {5, 6}
    assert pair.shared == {"similar": 0, "unrelated": 0}
    assert list(DETECTION_MAP) == [0, 1, 1] and sim.class_names == ["no nodule", "benign + malignant"]
    assert unrel.image_shape == tgt.image_shape == (28, 28)


def test_digits_are_an_offline_grey_ten_class_set():
    d = digits_dataset(28, seed=1)
    assert d.image_shape == (28, 28) and d.train.images.dtype == np.uint8 and d.n_classes == 10
    assert (len(d.train), len(d.val), len(d.test)) == (1257, 179, 361)
    assert d.train.images.max() > 200 and set(np.unique(d.train.labels)) == set(range(10))
    assert np.array_equal(digits_dataset(28, seed=1).train.images, d.train.images)


# ============================================================================ controls
def test_linear_probe_reads_frozen_features_and_pads_missing_classes():
    train, test = toy_images(200, seed=0), toy_images(200, seed=1)
    net = build_model(MODEL, 1, 2, seed=0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    m = linear_probe(net, train, test, n_classes=3)       # a third class the training images lack
    assert m["acc"] > 0.9                                  # the bright square is linearly readable
    assert m["n"] == 200
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k                # features frozen, BatchNorm stats too
    with pytest.raises(ValueError, match="one class"):
        linear_probe(net, ImageSet(train.images[:5], np.zeros(5, np.int64)), test, 2)


def test_pooled_multitask_learns_the_target_head_with_another_label_space():
    src = toy_images(256, seed=2)
    src = ImageSet(src.images, (src.labels * 2 + (np.arange(256) % 2)).astype(np.int64))  # 4 classes
    tgt, test = toy_images(64, seed=3), toy_images(200, seed=4)
    kw = dict(model=MODEL, epochs=3, batch_size=32, seed=0)
    a = pooled_multitask(src, 4, tgt, 2, test, **kw)
    assert a["acc"] > 0.9
    assert pooled_multitask(src, 4, tgt, 2, test, **kw) == a                # deterministic
    with pytest.raises(ValueError, match="epochs"):
        pooled_multitask(src, 4, tgt, 2, test, **{**kw, "epochs": 0})


def test_arms_and_their_names():
    assert parse_arm("none") == ("none", None)
    assert parse_arm("warm_start@similar", ["similar", "unrelated"]) == ("warm_start", "similar")
    assert parse_arm("l2sp", ["source"]) == ("l2sp", "source")
    with pytest.raises(ValueError, match="must name its source"):
        parse_arm("l2sp", ["similar", "unrelated"])
    with pytest.raises(ValueError, match="unknown method"):
        parse_arm("finetune@similar")
    with pytest.raises(ValueError, match="has"):
        parse_arm("probe@other", ["similar"])
    arms = arms_for(["warm_start", "pooled", "as_is"], ["similar", "same_task", "unrelated"],
                    {"similar": False, "same_task": True, "unrelated": False})
    assert arms == ["none", "warm_start@similar", "pooled@similar", "warm_start@same_task", "pooled@same_task",
                    "as_is@same_task", "warm_start@unrelated"]


# ============================================================================ verdict logic
def _curves(gains_sim, gains_unrel, rounds=4):
    """Synthetic learning curves at 5 %: no transfer rises to 0.5; the similar / unrelated warm starts
    end at 0.5 + gain (per seed)."""
    rows = []
    for seed, (gs, gu) in enumerate(zip(gains_sim, gains_unrel)):
        for arm, final in (("none", 0.5), ("warm_start@similar", 0.5 + gs), ("warm_start@unrelated", 0.5 + gu)):
            for r in range(1, rounds + 1):
                acc = final * r / rounds
                rows.append({"fraction": 0.05, "method": arm, "seed": seed, "round": r, "n_train": 20,
                             "acc": acc, "balanced_acc": acc, "auc": 0.5 + acc / 2, "loss": 1.0})
    return pd.DataFrame(rows)


class _Sweep:
    def __init__(self, curves, rounds=4):
        self.curves, self.rounds = curves, rounds


def test_verdict_needs_the_similar_source_to_beat_no_transfer_and_the_unrelated_source():
    sim = [0.10, 0.12, 0.09, 0.11, 0.13]
    holds = summarize(_Sweep(_curves(sim, [0.01, -0.01, 0.02, 0.0, 0.01])))
    (v,) = holds["verdicts"]
    assert v["verdict"] == "holds" and "unrelated source" in v["claim"]
    deciding = [d for d in v["decisions"] if d["metric"] == "acc"]
    assert [d["b"] for d in deciding] == ["no transfer", "warm start (unrelated)"]
    assert all(d["verdict"] == "holds" for d in deciding)
    # any pre-training would do: the similar source beats no transfer, not the unrelated one
    same = summarize(_Sweep(_curves(sim, [0.11, 0.10, 0.10, 0.12, 0.12])))["verdicts"][0]
    assert same["verdict"] != "holds"
    assert [d["verdict"] for d in same["decisions"] if d["metric"] == "acc"][0] == "holds"
    # the speed-up is counted against no transfer's final ACC, which it reaches at its last round
    e = holds["per_fraction"]["0.05"]["warm_start@similar"]
    assert e["reference_rounds_mean"] == 4 and e["rounds_to_target"] == [4, 4, 4, 4, 4]
    assert e["at_round_1"] == 0 and e["speedup_per_seed"]["mean"] == pytest.approx(1.0)
    assert "speed-up" in v["detail"] and "at round 1" in v["detail"]
    table = score_table(holds)
    assert set(table.arm) == {"no transfer", "warm start (similar)", "warm start (unrelated)"}
    assert table.acc.str.contains(r"\[").all()                            # mean [95 % CI]


# ============================================================================ the multi-source sweep
def test_two_sources_relayed_to_one_chain_b_with_every_arm():
    pair = make_pair("ct_detection", source_n=300, source_sites=3, target_n=240)
    w3 = connect(None)
    cfg = CollabConfig(rounds=2, local_epochs=1, batch_size=32, model=MODEL, seed=0)
    sources = {r: train_source(d, cfg, institutions=3, chain=w3) for r, d in pair.sources.items()}
    assert len({s.ledger.address for s in sources.values()}) == 3           # one chain A, three task ledgers
    arms = arms_for(["warm_start", "l2sp", "probe", "pooled", "as_is"], list(sources),
                    {r: s.n_classes == pair.target.n_classes for r, s in sources.items()})
    assert "as_is@same_task" in arms and "as_is@similar" not in arms and "pooled@unrelated" not in arms
    sweep = run_sweep(sources, pair.target, CollabConfig(rounds=2, batch_size=32, model=MODEL), fractions=[0.5],
                      methods=arms, seeds=[0, 1], min_local_steps=2, pooled_epochs=1)
    for seed, info in sweep.chains.items():
        accepted = {m.digest: m for m in sweep.targets[seed].bridge.messages()}
        assert len(accepted) == 3 and set(info["messages"]) == {"similar", "same_task", "unrelated"}
        for rel, msg in info["messages"].items():
            assert sources[rel].result.final_digest in accepted
            assert accepted[sources[rel].result.final_digest].id.hex() == msg["message_id"][2:]
    c = sweep.curves
    assert set(c.method) == set(arms)
    for arm in arms:
        n = len(c[(c.method == arm) & (c.seed == 0)])
        assert n == (2 if arm.partition("@")[0] in ("none", "warm_start", "l2sp") else 1), arm
    as_is = c[c.method == "as_is@same_task"].acc
    assert as_is.nunique() == 1                                              # one source model, one test set
    s = summarize(sweep, verdict_fraction=0.5)
    claims = [v["claim"] for v in s["verdicts"]]
    assert len(claims) == 4 and all("unrelated source" in t for t in claims)   # similar + same task × 2 methods
    for v in s["verdicts"]:
        assert {d["b"] for d in v["decisions"]} >= {"no transfer"} and len(v["decisions"]) == 4
    e = s["per_fraction"]["0.5"]
    assert "speedup" not in e["probe@similar"] and "speedup" in e["warm_start@similar"]

    # two sources trained on separate in-process chains share chain id and ledger address: refused
    alone = train_source(pair.sources["unrelated"], cfg, institutions=3)
    with pytest.raises(ValueError, match="one chain A"):
        run_sweep({"similar": train_source(pair.sources["similar"], cfg, institutions=3), "unrelated": alone},
                  pair.target, cfg, fractions=[0.5], methods=["none"], seeds=[0])
    with pytest.raises(ValueError, match="same classes"):
        run_sweep({"similar": sources["similar"]}, pair.target, cfg, methods=["as_is@similar"], seeds=[0])


def test_pooled_needs_the_source_images():
    pair = make_pair("ct_detection", source_n=300, source_sites=3, target_n=240, relations=["similar"])
    cfg = CollabConfig(rounds=1, local_epochs=1, batch_size=32, model=MODEL, seed=0)
    src = train_source(pair.sources["similar"], cfg, institutions=3)
    assert isinstance(src.data, Dataset)
    src.data = None
    with pytest.raises(ValueError, match="source's images"):
        run_sweep({"similar": src}, pair.target, cfg, methods=["pooled@similar"], seeds=[0])

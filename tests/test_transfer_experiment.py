"""Claim 3's experiment (medchain.experiments.transfer): a source task on chain A, its attested
global model relayed into chain B's bridge, target tasks on chain B that receive and use it."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from medchain.chain import LedgerClient
from medchain.experiments.transfer import (METHODS, genesis_hash, local_epochs_for, make_tasks, open_target_chain,
                                           receive_source_model, run_target, source_on_target, split_institutions,
                                           train_source)
from medchain.experiments.transfer_sweep import per_seed_table, rounds_to, run_sweep, summarize
from medchain.models import build_model
from medchain.params import Layout, digest_vector, model_vector
from medchain.protocol import CollabConfig

torch.set_num_threads(1)

MODEL = "cnn_small"
SOURCE_CFG = CollabConfig(rounds=2, local_epochs=1, batch_size=32, model=MODEL, seed=0)
TARGET_CFG = CollabConfig(rounds=2, local_epochs=1, batch_size=32, model=MODEL, seed=0)


def _tasks():
    return make_tasks(source_n=300, source_sites=3, target_n=240, target_sites=2, target_site_offset=5,
                      data_seed=0)


def _pipeline():
    src, tgt = _tasks()
    source = train_source(src, SOURCE_CFG, institutions=3)
    sweep = run_sweep(source, tgt, TARGET_CFG, fractions=[0.5], seeds=[0], min_local_steps=2)
    return src, tgt, source, sweep


@pytest.fixture(scope="module")
def world():
    return _pipeline()


def test_tasks_are_related_but_different():
    src, tgt = _tasks()
    assert src.n_classes == tgt.n_classes == 3
    assert set(np.unique(src.train.site)) == {0, 1, 2}
    assert set(np.unique(tgt.train.site)) == {5, 6}            # unseen scanners
    mix = np.bincount(tgt.train.labels, minlength=3) / len(tgt.train)
    assert mix[2] > mix[0]                                       # a more malignant lesion mix
    with pytest.raises(ValueError, match="unseen sites"):
        make_tasks(source_n=300, source_sites=3, target_n=240, target_site_offset=2)


def test_another_label_definition():
    _, tgt = make_tasks(source_n=300, source_sites=3, target_n=240, target_label_map=(0, 0, 1))
    assert tgt.n_classes == 2 and tgt.class_names == ["no nodule + benign", "malignant"]
    _, orig = _tasks()
    assert np.array_equal(tgt.test.labels, (orig.test.labels == 2).astype(np.int64))
    assert np.array_equal(tgt.test.images, orig.test.images)
    from medchain.experiments.transfer import relabel
    for bad in ((0, 1), (0, 0, 0), (0, 2, 2), (-1, 0, 1)):
        with pytest.raises(ValueError, match="label_map"):
            relabel(orig, bad)


def test_source_members_published_their_attested_model(world):
    _, _, source, _ = world
    ledger = source.ledger
    assert ledger.finished()
    last = SOURCE_CFG.rounds - 1
    assert ledger.majority_digest(last) == source.result.final_digest
    assert len(source.members) == 3
    assert all(d[last] == source.result.final_digest for d in source.own_digests)
    assert digest_vector(source.vector, source.layout) == source.result.final_digest
    assert source.store.get(source.result.final_digest)[:32] == source.layout.layout_id
    as_is = source_on_target(source, world[1])
    assert 0 <= as_is["acc"] <= 1 and as_is["n"] == len(world[1].test)


def test_bridge_message_recorded_matches_the_accepted_one(world):
    _, _, source, sweep = world
    info, chain_b = sweep.chains[0], sweep.targets[0]
    accepted = chain_b.bridge.messages()
    assert ["0x" + m.id.hex() for m in accepted] == [info["message_id"]]
    assert accepted[0].digest == source.result.final_digest
    assert list(accepted[0].signers) == info["signers"] and len(info["signers"]) == 3   # all members agreed
    assert set(info["signers"]) <= {m.address for m in source.members}
    assert info["bridge"] == chain_b.bridge.address and info["bridge_identity"].endswith(info["bridge"])
    # every target run's ledger lives on the bridge's chain B; no address repeats chain A's ledger
    for run in sweep.runs:
        assert LedgerClient(chain_b.w3, run["ledger_address"]).task().finished
        assert run["ledger_address"] != source.ledger.address
    assert info["bridge"] != source.ledger.address
    assert info["genesis_hash"] != genesis_hash(source.ledger.w3)
    assert info["final_block_hash"] == "0x" + bytes(chain_b.w3.eth.get_block(info["block_number"])["hash"]).hex()


def test_bridge_accepts_the_relayed_message_and_warm_start_copies_features():
    src, tgt = _tasks()
    source = train_source(src, SOURCE_CFG, institutions=3)
    chain_b = open_target_chain()
    from medchain.experiments.transfer import bridge_transfer
    relay = bridge_transfer(source, chain_b, quorum=2)
    # the id the experiment records is the message the bridge accepted, carrying chain A's digest
    accepted = chain_b.bridge.messages()
    assert [m.id for m in accepted] == [relay.id]
    assert chain_b.bridge.accepted(relay.id)
    rec = chain_b.bridge.message(relay.id)
    assert rec.digest == source.result.final_digest == source.ledger.majority_digest(SOURCE_CFG.rounds - 1)
    assert (rec.source_chain_id, rec.source_ledger) == (source.chain_id, source.ledger.address)
    assert rec.signer_count == 3 and chain_b.bridge.quorum(source.chain_id, source.ledger.address) == 2

    # a target with another number of classes: the features arrive, the head is its own fresh one
    net, anchor = receive_source_model(chain_b, relay.id, source, MODEL, 1, 2, seed=5, method="l2sp")
    fresh = build_model(MODEL, 1, 2, seed=5)
    src_state = build_model(MODEL, 1, 3, seed=99)
    from medchain.params import load_flat
    load_flat(src_state, source.vector, source.layout)
    src_sd, net_sd, fresh_sd = src_state.state_dict(), net.state_dict(), fresh.state_dict()
    features = [k for k in net_sd if k.startswith("features.") and net_sd[k].is_floating_point()]
    assert features
    for k in features:
        assert torch.equal(net_sd[k], src_sd[k]), k
    for k in ("head.weight", "head.bias"):
        assert net_sd[k].shape[0] == 2
        assert torch.equal(net_sd[k], fresh_sd[k]), k
    params = {n for n, _ in net.named_parameters() if not n.startswith("head.")}
    assert set(anchor) == params
    for k, v in anchor.items():
        assert torch.equal(v, src_sd[k])

    # a warm-started target task on chain B: its ledger records the warm-started initial model
    insts = split_institutions(tgt, None, fraction=0.5, seed=0)
    res = run_target(insts, tgt.n_classes, TARGET_CFG, "warm_start", chain_b, message_id=relay.id,
                     source=source)
    init, _ = receive_source_model(chain_b, relay.id, source, MODEL, 1, tgt.n_classes, TARGET_CFG.seed,
                                   "warm_start")
    lay = Layout.from_module(init)
    task = LedgerClient(chain_b.w3, res.ledger_address).task()
    assert task.initial_model_digest == digest_vector(model_vector(init, lay), lay)
    assert task.finished and len(res.history) == TARGET_CFG.rounds
    scratch = run_target(insts, tgt.n_classes, TARGET_CFG, "none", chain_b)
    assert LedgerClient(chain_b.w3, scratch.ledger_address).task().initial_model_digest != task.initial_model_digest
    with pytest.raises(ValueError, match="message_id"):
        run_target(insts, tgt.n_classes, TARGET_CFG, "l2sp", chain_b)
    with pytest.raises(ValueError, match="unknown method"):
        run_target(insts, tgt.n_classes, TARGET_CFG, "finetune", chain_b)


def test_sweep_records_and_summary(world):
    _, _, source, sweep = world
    assert set(sweep.curves.method) == set(METHODS)
    assert len(sweep.curves) == len(METHODS) * TARGET_CFG.rounds
    assert len(sweep.runs) == len(METHODS)
    assert len({r["ledger_address"] for r in sweep.runs}) == len(METHODS)   # one task ledger per run
    s = summarize(sweep, verdict_fraction=0.5)
    e = s["per_fraction"]["0.5"]
    for m in METHODS:
        assert 0 <= e[m]["final_acc_mean"] <= 1
        assert math.isclose(e[m]["gain_mean"], e[m]["final_acc_mean"] - e["none"]["final_acc_mean"], abs_tol=1e-12)
    assert e["none"]["gain_mean"] == 0 and e["none"]["speedup"] == 1
    assert len(s["verdicts"]) == 2   # one per transfer method; one seed decides nothing
    for v in s["verdicts"]:
        assert v["verdict"] == "inconclusive" and v["holds"] is None and "1 seed" in v["detail"]


def test_sweep_is_deterministic_by_seed(world):
    _, _, source, sweep = world
    again = _pipeline()[3]
    assert again.source.result.final_digest == source.result.final_digest
    assert again.chains[0]["message_id"] == sweep.chains[0]["message_id"]
    assert [r["final_digest"] for r in again.runs] == [r["final_digest"] for r in sweep.runs]
    pd.testing.assert_frame_equal(again.curves, sweep.curves)


def test_rounds_to_and_per_seed_table():
    assert rounds_to([0.2, 0.5, 0.4, 0.6], 0.5) == 2
    assert rounds_to([0.2, 0.3], 0.5) is None
    curves = pd.DataFrame([
        {"fraction": 0.05, "method": m, "seed": 0, "round": r + 1, "n_train": 10, "acc": a, "auc": 0.5}
        for m, accs in (("none", [0.3, 0.4, 0.5, 0.5]), ("warm_start", [0.5, 0.6, 0.6, 0.62]),
                        ("l2sp", [0.3, 0.35, 0.4, 0.45]))
        for r, a in enumerate(accs)])
    t = per_seed_table(curves).set_index("method")
    assert t.loc["none", "rounds_to_target"] == 3 and t.loc["warm_start", "rounds_to_target"] == 1
    assert t.loc["warm_start", "speedup"] == 3 and math.isclose(t.loc["warm_start", "gain"], 0.12)
    assert pd.isna(t.loc["l2sp", "rounds_to_target"])


def test_local_epochs_for_scarce_data():
    src, _ = _tasks()
    insts = split_institutions(src, 3, fraction=0.1, seed=0)      # ~7 images each: 1 step per epoch
    assert local_epochs_for(insts, 32, 8) == 8
    assert local_epochs_for(split_institutions(src, 3, seed=0), 32, 2) == 1


def _rgb_npz(path, n_classes=5, seed=0, size=28):
    """A small RetinaMNIST-like .npz: RGB uint8 images, `n_classes` classes."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for s, n in (("train", 60), ("val", 20), ("test", 20)):
        arrays[f"{s}_images"] = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        arrays[f"{s}_labels"] = (np.arange(n) % n_classes).reshape(-1, 1)
    np.savez(path, **arrays)
    return str(path)


def test_grey_source_and_rgb_target_share_three_channels(tmp_path):
    # before: "the source has 1 image channel(s), the target 3" stopped notebook 03 on RetinaMNIST
    src, tgt = make_tasks("simulated", _rgb_npz(tmp_path / "colour.npz"), source_n=300, source_sites=3)
    assert src.n_channels == tgt.n_channels == 3 and tgt.n_classes == 5
    assert src.train.images.shape[1:] == (28, 28, 3) and src.source.endswith(";rgb")
    assert np.array_equal(src.train.images[..., 0], src.train.images[..., 2])   # the grey channel repeated
    grey, _ = _tasks()
    assert np.array_equal(src.train.images[..., 1], grey.train.images)
    assert src.origin == grey.origin                                              # provenance kept
    model = build_model(MODEL, src.n_channels, tgt.n_classes, 0)
    from medchain.training import predict_proba
    assert predict_proba(model, tgt.test).shape == (20, 5)
    src2, tgt2 = make_tasks(_rgb_npz(tmp_path / "colour.npz"), "simulated", target_n=240)   # and the other way
    assert src2.n_channels == tgt2.n_channels == 3 and tgt2.source.endswith(";rgb")


def test_same_images_as_source_and_target_are_refused(tmp_path):
    path = _rgb_npz(tmp_path / "colour.npz")
    with pytest.raises(ValueError, match="same images"):
        make_tasks(path, path)
    with pytest.raises(ValueError, match="same image size"):
        make_tasks("simulated", _rgb_npz(tmp_path / "big.npz", size=32), source_n=300, source_sites=3)


def test_relabel_keeps_provenance():
    _, tgt = make_tasks(source_n=300, source_sites=3, target_n=240, target_label_map=(0, 0, 1))
    _, orig = _tasks()
    assert tgt.origin == orig.origin and tgt.origin

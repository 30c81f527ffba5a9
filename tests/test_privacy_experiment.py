"""medchain.experiments.privacy / privacy_summary (notebook 02): the attacked payload is byte for byte
what the chain records, determinism, the BN-statistics policy on every payload of a run, and the
verdict logic of summarize_seeds()."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest


from medchain import codec
from medchain.experiments.posted_update import protocol_case
from medchain.data import load_dataset
from medchain.experiments import privacy as P
from medchain.experiments import privacy_summary as S
from medchain.models import build_model
from medchain.params import Layout
from medchain.protocol import CollabConfig


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ct():
    return load_dataset("simulated:n=300,sites=2,seed=0")


def test_pick_images_deterministic_and_class_balanced(ct):
    a, b = P.pick_images(ct.train, 6, 0), P.pick_images(ct.train, 6, 0)
    assert np.array_equal(a, b) and len(set(a.tolist())) == 6
    assert sorted(ct.train.labels[a].tolist()) == [0, 0, 1, 1, 2, 2]


def test_protocol_case_attacks_exactly_the_bytes_on_chain(ct):
    """On a real (embedded) chain: the payload attacked is the one the ledger records for the target
    institution, selected over the trainable parameters; the same seed gives the same bytes."""
    from medchain.privacy import n_selected, trainable_mask

    init = build_model("cnn_small", 1, 3, 0)
    cfg = CollabConfig(model="cnn_small", theta_u=0.1, optimizer="sgd", lr=0.01, batch_size=2, seed=0)
    other = [(ct.train.images[2:4], ct.train.labels[2:4])]
    case = protocol_case(ct.train.images[:2], ct.train.labels[:2], model=init, cfg=cfg, num_classes=3,
                                  others=other, chain="embedded")
    lay = Layout.from_module(init)
    assert codec.digest(case.payload).hex() == case.selection["digest"]
    assert case.selection["ledger_address"].startswith("0x")
    n_bn = int((~trainable_mask(lay)).sum())                         # default policy: shared
    assert case.selection["n_shared"] == n_selected(0.1, lay.size - n_bn) + n_bn
    assert case.public.n_images == 2 and case.public.local_steps == 1 and case.public.lr == 0.01
    again = protocol_case(ct.train.images[:2], ct.train.labels[:2], model=build_model("cnn_small", 1, 3, 0),
                                   cfg=cfg, num_classes=3, others=other, chain=None)
    assert again.payload == case.payload                            # in-memory ledger: same Institution, same bytes


def test_run_seed_same_seed_same_numbers_and_every_defence_scored(ct):
    cfg = CollabConfig(rounds=2, model="cnn_small")
    defs = {k: P.DEFENCES[k] for k in ("none", "partial_largest_bn_local")}
    kw = dict(seed=0, cfg=cfg, defences=defs, institutions=2, n_attack_images=1, attack_steps=3,
              worst_case_thetas=(1.0,), worst_case_steps=2, mia_n=40, chain=None, update_shadows=2,
              update_mia_n=20)
    a, b = P.run_seed(ct, **kw), P.run_seed(ct, **kw)
    cols = ["setting", "defence", "attack", "image", "psnr", "ssim", "rank", "reid_percentile"]
    pd.testing.assert_frame_equal(a["leak"][cols], b["leak"][cols])
    pd.testing.assert_frame_equal(a["utility"][["defence", "acc"]], b["utility"][["defence", "acc"]])
    leak = a["leak"]
    assert set(leak.defence) == {"none", "partial_largest_bn_local", "lenet_theta_1"}
    assert set(leak[leak.defence == "none"].attack) == {"ig", "bn_only"}       # BN statistics shared
    assert set(leak[leak.defence == "partial_largest_bn_local"].attack) == {"ig"}
    assert not leak[leak.defence == "partial_largest_bn_local"].bn_revealed.any()
    assert leak.pool_size.eq(len(ct.train)).all() and leak["rank"].between(1, len(ct.train)).all()
    u = a["utility"].set_index("defence")
    assert u.loc["partial_largest_bn_local", "bn_values_per_update"] == 0
    assert u.loc["none", "bn_values_per_update"] > 0
    assert set(a["mia"].defence) == set(defs) and set(a["mia"].attack) == {"loss", "update_loss", "update_lira"}
    lira = a["mia"][a["mia"].attack == "update_lira"]
    assert len(lira) == 2 * 2 and set(lira.institution) == {0} and lira.n_shadow.eq(2).all()   # defences × rounds
    assert lira["tp@1%fpr"].between(0, 20).all() and lira.auc.between(0, 1).all()
    upd = a["mia"][a["mia"].attack == "update_loss"]
    assert sorted(set(upd["round"])) == [0, 1] and sorted(set(upd.institution)) == [0, 1]
    assert len(upd) == 2 * 2 * 2 and upd.auc.between(0, 1).all()          # defences × rounds × institutions
    with pytest.raises(ValueError, match="unknown task parameter"):
        P.run_seed(ct, **{**kw, "defences": {"x": {"theta": 0.1}}})


def _fake_seed(seed, acc_ref, acc_dec, pct_ref, pct_dec, n=100):
    """A seed's tables with given ACCs and re-identification percentiles (two images each)."""
    utility = pd.DataFrame([
        {"defence": d, "acc": a, "balanced_acc": a, "auc": 0.9, "seed": seed, "theta_u": t, "select_rule": "largest",
         "gamma": None, "sigma": None, "bn_stats": "shared", "values_per_update": 10.0, "bn_values_per_update": 0.0}
        for d, a, t in (("none", acc_ref, 1.0), ("partial_largest", acc_dec, 0.1))])
    rows = []
    for d, pct in (("none", pct_ref), ("partial_largest", pct_dec)):
        for i, dp in enumerate((-0.01, 0.01)):
            p = min(1.0, pct + dp)
            rank = int(round(1 + (1 - p) * (n - 1)))
            rows.append({"setting": "protocol", "defence": d, "attack": "ig", "image": i, "psnr": 10.0 + 10 * p,
                         "ssim": p, "mean_psnr": 17.0, "mean_ssim": 0.8, "rank": rank, "pool_size": n,
                         "reid_percentile": 1 - (rank - 1) / (n - 1), "seed": seed})
    mia = pd.DataFrame([{"defence": d, "attack": "loss", "auc": 0.5, "tpr@1%fpr": 0.01, "tpr@0.1%fpr": 0.0,
                         "seed": seed} for d in ("none", "partial_largest")])
    return {"seed": seed, "utility": utility, "leak": pd.DataFrame(rows), "mia": mia}


def test_summarize_seeds_decides_cost_attack_check_and_reidentification():
    protected = [_fake_seed(s, 0.80, 0.795 + 0.001 * s, 0.95 - 0.01 * s, 0.5 + 0.005 * (s % 2)) for s in range(5)]
    out = S.summarize_seeds(protected)
    assert out["verdict"]["verdict"] == "holds"
    t = {r["defence"]: r for r in out["leakage"]}
    assert t["none"]["n_images"] == 10 and t["none"]["chance_rank1"] == pytest.approx(0.01)
    assert out["per_defence"]["partial_largest"]["acc_minus_reference"]["mean"] == pytest.approx(-0.003, abs=1e-9)
    leaky = [_fake_seed(s, 0.80, 0.795, 0.95, 0.9 + 0.01 * s) for s in range(5)]
    v = S.summarize_seeds(leaky)["verdict"]
    assert v["verdict"] == "fails" and [d["verdict"] for d in v["decisions"] if d["metric"] == "reid"] == ["fails"]
    costly = [_fake_seed(s, 0.80, 0.70 + 0.002 * s, 0.95, 0.5) for s in range(5)]
    assert S.summarize_seeds(costly)["verdict"]["verdict"] == "fails"
    blind = [_fake_seed(s, 0.80, 0.80, 0.5 + 0.005 * (s % 2), 0.5) for s in range(5)]   # attack fails even unprotected
    v = S.summarize_seeds(blind)["verdict"]
    assert v["verdict"] != "holds"
    reid = [d for d in v["decisions"] if d["metric"] == "reid"][0]
    assert reid["verdict"] == "inconclusive" and "no protection can be shown" in reid["reason"]
    assert v["verdict"] == "inconclusive"           # a failed attack check leaves the claim open, not failed
    assert S.summarize_seeds(protected[:1])["verdict"]["verdict"] == "inconclusive"
    with pytest.raises(ValueError, match="was not run"):
        S.summarize_seeds(protected, decide="partial_random")


@pytest.mark.parametrize("theta", [1.0, 0.1])
def test_bn_statistics_policy_decoding_every_payload_on_the_ledger(ct, theta):
    """bn_stats="local": no payload of any round carries a BatchNorm statistic, and the scored
    model holds institution 0's own statistics; "shared": every payload carries all of them, and
    θu counts over the trainable parameters only."""
    from medchain.data import partition
    from medchain.privacy import n_selected, trainable_mask
    from medchain.blobstore import fetch_payload
    from medchain.params import model_vector
    from medchain.protocol import run_collaborative

    insts = partition(ct, 2, "iid", seed=0)
    lay = Layout.from_module(build_model("cnn_small", 1, 3, 0))
    buffers = ~trainable_mask(lay)
    assert buffers.sum() > 0
    for policy in ("local", "shared"):
        cfg = CollabConfig(model="cnn_small", rounds=2, theta_u=theta, bn_stats=policy, seed=0)
        res = run_collaborative(insts, 3, cfg, chain=None)
        ledger = res.institutions[0].ledger
        n = 0
        for r in range(cfg.rounds):
            for rec in ledger.updates(r):
                payload = fetch_payload(rec.digest, bytes(rec.payload), res.institutions[0].store)
                dec = codec.decode_update(payload, expected_layout_id=lay.layout_id,
                                          expected_size=lay.size)
                on_bn = buffers[dec.indices].sum()
                n_params = dec.n - on_bn
                assert n_params == n_selected(theta, int((~buffers).sum()))
                assert on_bn == (0 if policy == "local" else buffers.sum()), (policy, r)
                n += 1
        assert n == 4
        vec = model_vector(res.model, lay)
        inst0 = res.institutions[0]
        if policy == "local":
            assert np.array_equal(vec[buffers], inst0.local_vec[buffers])
            assert not np.array_equal(inst0.global_vec[buffers], inst0.local_vec[buffers])
        else:
            assert np.array_equal(vec, inst0.global_vec)
        assert 0 <= res.history[-1]["acc"] <= 1


def test_each_defence_is_costed_against_its_own_models_no_defence_run():
    cfg = CollabConfig()
    refs = {k: P.reference_of(k, P.DEFENCES, cfg) for k in P.DEFENCES}
    assert refs["none"] == "none" and refs["partial_largest"] == "none" and refs["bn_local"] == "none"
    assert refs["dp_eps1"] == refs["dp_eps3"] == refs["dp_eps8"] == refs["none_tanh"] == "none_tanh"
    assert {P._config(cfg, P.DEFENCES[k]).dp_epsilon for k in ("dp_eps8", "dp_eps3", "dp_eps1")} == {8.0, 3.0, 1.0}
    assert P.reference_of("dp_eps3", {"dp_eps3": P.DEFENCES["dp_eps3"]}, cfg) is None


def test_proportion_is_the_clopper_pearson_interval():
    p = S.proportion(0, 10)
    assert p["rate"] == 0 and p["ci_low"] == 0 and p["ci_high"] == pytest.approx(1 - 0.025 ** 0.1, rel=1e-9)
    q = S.proportion(10, 10)
    assert q["ci_high"] == 1 and q["ci_low"] == pytest.approx(0.025 ** 0.1, rel=1e-9)
    assert S.proportion(0, 0)["rate"] is None


def test_summary_pools_update_lira_counts_and_uses_family_references():
    runs = [_fake_seed(s, 0.80, 0.79, 0.9, 0.5) for s in range(3)]
    for r in runs:
        r["mia"] = pd.concat([r["mia"], pd.DataFrame([
            {"defence": d, "attack": "update_lira", "auc": 0.6, "tpr@1%fpr": 0.05, "tpr@0.1%fpr": 0.0,
             "tp@1%fpr": 5, "tp@0.1%fpr": 0, "n_members": 100, "n_shadow": 4, "seed": r["seed"]}
            for d in ("none", "partial_largest")])], ignore_index=True)
    out = S.summarize_seeds(runs, references={"none": "none", "partial_largest": None})
    lira = out["per_defence"]["none"]["mia"]["update_lira"]
    assert lira["pooled_tpr@1%fpr"]["k"] == 15 and lira["pooled_tpr@1%fpr"]["n"] == 300
    assert lira["pooled_tpr@1%fpr"]["ci_low"] < 0.05 < lira["pooled_tpr@1%fpr"]["ci_high"] and lira["n_shadow"] == 4
    assert "acc_minus_reference" not in out["per_defence"]["partial_largest"]
    assert "pooled_tpr@1%fpr" not in out["per_defence"]["none"]["mia"]["loss"]

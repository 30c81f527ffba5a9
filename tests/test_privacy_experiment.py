"""medchain.experiments.privacy (notebook 02): determinism of the leakage sweep, the attacked
payload is byte for byte what the chain records, and the verdict logic of summarize()."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch


from medchain import codec
from medchain.data import load_dataset
from medchain.experiments import privacy as P
from medchain.models import build_model
from medchain.params import Layout
from medchain.protocol import CollabConfig


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ct():
    return load_dataset("simulated:n=300,sites=2,seed=0")


def test_sweep_order_has_full_update_once():
    assert P._runs([0.1, 1, 0.01], ["largest", "random"]) == [
        (1.0, "largest"), (0.1, "largest"), (0.1, "random"), (0.01, "largest"), (0.01, "random")]


def test_pick_images_deterministic_and_class_balanced(ct):
    a, b = P.pick_images(ct.train, 6, 0), P.pick_images(ct.train, 6, 0)
    assert np.array_equal(a, b) and len(set(a.tolist())) == 6
    assert sorted(ct.train.labels[a].tolist()) == [0, 0, 1, 1, 2, 2]


def test_worst_case_leakage_same_seed_same_numbers(ct):
    idx = P.pick_images(ct.train, 1, 0)
    kw = dict(methods=("idlg",), steps={"idlg": 3}, seed=0)
    a = P.worst_case_leakage(ct.train.images[idx], ct.train.labels[idx], 3, [1, 0.01], **kw)
    b = P.worst_case_leakage(ct.train.images[idx], ct.train.labels[idx], 3, [1, 0.01], **kw)
    cols = ["setting", "theta_u", "rule", "attacker", "method", "psnr", "ssim", "mse", "label_acc"]
    pd.testing.assert_frame_equal(pd.DataFrame(a.rows)[cols], pd.DataFrame(b.rows)[cols])
    assert a.payloads == b.payloads and len(a.rows) == 4          # 2 θu × 2 attackers
    # the payload is a strict codec update revealing round(θu·P) coordinates
    lay = Layout.from_module(build_model("lenet", 1, 3, 0))
    dec = codec.decode_update(a.payloads[("worst_case", 0.01, "largest", 0)],
                              expected_layout_id=lay.layout_id, expected_size=lay.size)
    assert dec.n == round(0.01 * lay.size)


def test_protocol_update_attacks_exactly_the_bytes_on_chain(ct):
    init = build_model("cnn_small", 1, 3, 0)
    batches = [(ct.train.images[i * 2:(i + 1) * 2], ct.train.labels[i * 2:(i + 1) * 2]) for i in range(2)]
    cfg = CollabConfig(model="cnn_small", theta_u=0.1, optimizer="sgd", lr=0.01, batch_size=2, seed=0)
    up = P.protocol_update(batches, 3, init, cfg, chain="embedded")
    rec = up.record
    assert codec.digest(up.payload) == rec.digest
    assert bytes(rec.payload) in (up.payload, b"")                 # inline, or in the blob store
    lay = Layout.from_module(init)
    idx, vals = up.last_upload
    assert up.payload == codec.encode_update(vals, lay.layout_id, indices=idx, total_size=lay.size)
    assert rec.n_values == len(vals) == round(0.1 * lay.size) and rec.n_samples == 2
    assert up.public.n_images == 2 and up.public.local_steps == 1 and up.public.lr == 0.01
    assert up.collab.ledger_address.startswith("0x")
    again = P.protocol_update(batches, 3, build_model("cnn_small", 1, 3, 0), cfg, chain="embedded")
    assert again.payload == up.payload                              # same seed, same bytes


def test_summarize_theta_star_and_unprotected_settings():
    utility = [{"theta_u": 1.0, "rule": "largest", "acc": 0.80, "auc": 0.9},
               {"theta_u": 0.1, "rule": "largest", "acc": 0.79, "auc": 0.9},
               {"theta_u": 0.01, "rule": "largest", "acc": 0.70, "auc": 0.8}]
    rows = []
    for t, p in ((1.0, 40.0), (0.1, 9.0), (0.01, 8.0)):
        for att in ("naive", "mask_aware"):
            rows.append({"setting": "worst_case", "theta_u": t, "rule": "largest", "attacker": att,
                         "method": "idlg", "image": 0, "psnr": p, "ssim": 0.5, "mse": 1.0,
                         "label_acc": 1.0})
    rows.append({"setting": "protocol", "theta_u": 0.1, "rule": "largest", "attacker": "naive",
                 "method": "ig", "image": -1, "psnr": 20.0, "ssim": 0.5, "mse": 1.0, "label_acc": 1.0})
    # θu = 0.001: the payload revealed nothing to invert (NaN) — protected, not a failure
    rows.append({"setting": "worst_case", "theta_u": 0.001, "rule": "largest", "attacker": "mask_aware",
                 "method": "idlg", "image": 0, "psnr": float("nan"), "ssim": float("nan"),
                 "mse": float("nan"), "label_acc": None})
    utility.append({"theta_u": 0.001, "rule": "largest", "acc": 0.5, "auc": 0.6})
    s = P.summarize(utility, pd.DataFrame(rows), baseline={"psnr": 18.0, "ssim": 0.7})
    assert s["theta_star"] == 0.1 and s["acc_cost_at_theta_star"] == pytest.approx(0.01)
    assert s["holds"] is True and s["acc_0.1_within_tolerance"] is True
    assert [(n["setting"], n["theta_u"], n["beats_mean_image"]) for n in s["not_protected"]] == [
        ("protocol", 0.1, True)]


def _fake_privacy_seed(seed, acc1, acc01, worst_psnr, baseline_psnr=18.0):
    utility = pd.DataFrame([
        {"theta_u": 1.0, "rule": "largest", "acc": acc1, "balanced_acc": acc1, "auc": 0.9, "seed": seed},
        {"theta_u": 0.1, "rule": "largest", "acc": acc01, "balanced_acc": acc01, "auc": 0.9, "seed": seed}])
    leak = pd.DataFrame([{"setting": "worst_case", "theta_u": t, "rule": "largest", "attacker": "mask_aware",
                          "method": m, "image": i, "psnr": p, "ssim": 0.5, "mse": 1.0, "label_acc": 1.0,
                          "seed": seed}
                         for t, m, i, p in ((1.0, "ig", 0, 50.0), (0.1, "ig", 0, worst_psnr - 3),
                                            (0.1, "ig", 1, worst_psnr), (0.1, "dlg", 0, 5.0), (0.1, "dlg", 1, 6.0))])
    return {"seed": seed, "utility": utility, "leak": leak, "mia": None,
            "baseline": {"psnr": baseline_psnr, "ssim": 0.6}}


def test_summarize_seeds_decides_cost_and_worst_image_leakage_over_seeds():
    protected = [_fake_privacy_seed(s, 0.80, 0.795 + 0.001 * s, 12.0 + 0.2 * s) for s in range(5)]
    out = P.summarize_seeds(protected, theta=0.1)
    assert out["verdict"]["verdict"] == "holds"
    assert out["worst_image_psnr"] == pytest.approx([12.0 + 0.2 * s for s in range(5)])   # strongest method, worst image
    leaky = [_fake_privacy_seed(s, 0.80, 0.795, 25.0 + 0.3 * s) for s in range(5)]
    v = P.summarize_seeds(leaky, theta=0.1)["verdict"]
    assert v["verdict"] == "fails"
    psnr = [d for d in v["decisions"] if d["metric"] == "psnr"][0]
    assert psnr["verdict"] == "fails" and "dB" in psnr["reason"]
    costly = [_fake_privacy_seed(s, 0.80, 0.70 + 0.002 * s, 12.0) for s in range(5)]
    assert P.summarize_seeds(costly, theta=0.1)["verdict"]["verdict"] == "fails"
    one = P.summarize_seeds(protected[:1], theta=0.1)["verdict"]
    assert one["verdict"] == "inconclusive"
    with pytest.raises(ValueError, match="θu = 0.2"):
        P.summarize_seeds(protected, theta=0.2)


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

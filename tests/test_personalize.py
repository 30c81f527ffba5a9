"""Personalization (claim 4): label-prior correction, local fine-tuning, and FedPer / FedBN runs on
the embedded chain whose local-only coordinates are proven, from the chain, never to be shared."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import toy_images
from medchain import codec
from medchain.blobstore import fetch_payload
from medchain.data.types import Dataset, ImageSet, InstitutionData
from medchain.models import build_model
from medchain.params import Layout, mask_for_module_types, model_vector, select_names
from medchain.personalize import (FinetuneConfig, LogitAdjusted, add_to_head_bias, adjust_logits,
                                  audit_local_only, finetune, label_frequencies, local_mask_for,
                                  majority_metrics, personal_models, prior_corrected, prior_shift,
                                  run_local_mask)
from medchain.protocol import CollabConfig, run_collaborative
from medchain.training import TrainConfig, recalibrate_bn, train_epochs


# --------------------------------------------------------------------------------------------
# label-prior correction
# --------------------------------------------------------------------------------------------
def test_label_frequencies_hand_computed():
    y = np.array([0, 0, 1, 2])
    np.testing.assert_array_equal(label_frequencies(y, 3, smoothing=0), [0.5, 0.25, 0.25])
    np.testing.assert_allclose(label_frequencies(y, 3, smoothing=1), [3 / 7, 2 / 7, 2 / 7])
    np.testing.assert_array_equal(label_frequencies([1, 1], 3, smoothing=0), [0, 1, 0])
    with pytest.raises(ValueError):
        label_frequencies([0, 3], 3)
    with pytest.raises(ValueError):
        label_frequencies([0], 3, smoothing=-1)


def test_logit_adjustment_exact_on_a_hand_computed_case():
    local, glob = np.array([0.5, 0.25, 0.25]), np.array([0.25, 0.5, 0.25])
    np.testing.assert_allclose(prior_shift(local, glob), [math.log(2), -math.log(2), 0.0], atol=1e-15)
    logits = np.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.2]])
    expected = np.array([[1 + math.log(2), -math.log(2), 0.0], [math.log(2), 0.5 - math.log(2), 0.2]])
    np.testing.assert_allclose(adjust_logits(logits, local, glob), expected, atol=1e-15)
    # the second row's decision flips from class 1 to class 0: the local prior favours class 0
    assert logits[1].argmax() == 1 and adjust_logits(logits, local, glob)[1].argmax() == 0
    # a class absent locally (smoothing 0) is never predicted
    assert np.isneginf(prior_shift([0.5, 0.5, 0.0], glob)[2])
    with pytest.raises(ValueError):
        prior_shift(local, [0.5, 0.5, 0.0])


class _Fixed(nn.Module):
    def __init__(self, out):
        super().__init__()
        self.register_buffer("out", torch.as_tensor(out, dtype=torch.float32))

    def forward(self, x):
        return self.out.expand(x.shape[0], -1)


def test_prior_corrected_model_adds_the_log_ratio_of_label_frequencies():
    local_labels = np.array([0, 0, 1, 2])                        # 1/2, 1/4, 1/4
    global_labels = np.array([0, 1, 1, 2])                       # 1/4, 1/2, 1/4
    model = prior_corrected(_Fixed([1.0, 0.0, 0.0]), local_labels, global_labels, 3, smoothing=0)
    out = model(torch.zeros(2, 1, 4, 4)).double().numpy()
    np.testing.assert_allclose(out, [[1 + math.log(2), -math.log(2), 0.0]] * 2, atol=1e-6)
    # with add-one smoothing: counts (3, 2, 2) / 7 locally and (2, 3, 2) / 7 globally
    smoothed = prior_corrected(_Fixed([0.0, 0.0, 0.0]), local_labels, global_labels, 3, smoothing=1)
    np.testing.assert_allclose(smoothed.shift.double().numpy(), [math.log(3 / 2), math.log(2 / 3), 0.0], atol=1e-6)


def test_folding_the_shift_into_the_head_bias_equals_logit_adjustment():
    model = build_model("cnn_small", 1, 3, seed=0).eval()
    shift = np.array([0.7, -1.2, 0.1])
    x = torch.randn(5, 1, 28, 28)
    wrapped = LogitAdjusted(model, shift).eval()
    folded = copy.deepcopy(model)
    add_to_head_bias(folded, shift)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), wrapped(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        add_to_head_bias(folded, [1.0, float("-inf"), 0.0])


def test_majority_metrics():
    m = majority_metrics([0, 1, 1, 1], [1, 1, 0, 2], 3)
    assert m["acc"] == 0.5 and m["balanced_acc"] == pytest.approx(1 / 3) and m["auc"] == 0.5


# --------------------------------------------------------------------------------------------
# local fine-tuning
# --------------------------------------------------------------------------------------------
def _inst(index: int, n: int = 96, seed: int = 0) -> InstitutionData:
    imgs = toy_images(n + 64, seed=seed + 10 * index)
    return InstitutionData(index, imgs.subset(np.arange(n)), imgs.subset(np.arange(n, n + 32)),
                           imgs.subset(np.arange(n + 32, n + 64)))


def _names_changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])}


def test_finetune_head_only_changes_only_the_head_and_keeps_the_start_model():
    torch.set_num_threads(1)
    inst = _inst(0)
    model = build_model("cnn_small", 1, 2, seed=0)
    start = copy.deepcopy(model.state_dict())
    res = finetune(model, inst, FinetuneConfig(epochs=2, lr=5e-2, head_only=True, keep_start=False))
    assert _names_changed(start, model.state_dict()) == set()        # the input model is untouched
    changed = _names_changed(start, res.model.state_dict())
    assert changed == {"head.weight", "head.bias"}                    # BatchNorm statistics frozen too
    assert all(p.requires_grad for p in res.model.parameters())      # unfrozen afterwards
    assert "train" not in vars(res.model.features[1])                 # eval pin removed
    full = finetune(model, inst, FinetuneConfig(epochs=1, lr=1e-2, keep_start=False))
    changed = _names_changed(start, full.model.state_dict())
    assert "features.0.weight" in changed and "features.1.running_mean" in changed


def test_finetune_selection_and_determinism():
    torch.set_num_threads(1)
    inst = _inst(1)
    model = build_model("cnn_small", 1, 2, seed=0)
    cfg = FinetuneConfig(epochs=2, lr=1e-2, seed=3)
    a, b = finetune(model, inst, cfg), finetune(model, inst, cfg)
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    assert a.best_epoch == b.best_epoch and a.val == b.val
    assert (a.val["acc"], -a.val["loss"]) >= (a.start_val["acc"], -a.start_val["loss"])
    # keep_start: a destructive fine-tuning (SGD at lr 100) never replaces a better start model
    trained = copy.deepcopy(model)
    train_epochs(trained, inst.train, TrainConfig(epochs=8, lr=3e-3, batch_size=32))
    recalibrate_bn(trained, inst.train)
    res = finetune(trained, inst, FinetuneConfig(epochs=1, lr=100.0, optimizer="sgd"))
    assert res.fit.best_val["acc"] < res.start_val["acc"]
    assert res.best_epoch == 0 and res.val == res.start_val
    for k, v in res.model.state_dict().items():
        assert torch.equal(v, trained.state_dict()[k]), k
    off = finetune(trained, inst, FinetuneConfig(epochs=1, lr=100.0, optimizer="sgd", keep_start=False))
    assert off.best_epoch == 1 and off.val["acc"] < res.val["acc"]
    with pytest.raises(ValueError, match="shift"):
        finetune(model, inst, FinetuneConfig(epochs=1, from_prior=True))


# --------------------------------------------------------------------------------------------
# FedPer and FedBN on the embedded chain: what stays local is proven from the chain
# --------------------------------------------------------------------------------------------
def _skewed_institutions(n_inst: int = 3) -> list[InstitutionData]:
    """Toy institutions with different label mixes (the last one mostly class 1)."""
    out = []
    for i in range(n_inst):
        s = toy_images(200, seed=100 + i)
        keep = np.flatnonzero((s.labels == 1) | (np.arange(len(s)) % (i + 1) == 0))[:120]
        s = s.subset(keep)
        out.append(InstitutionData(i, s.subset(np.arange(0, 80)), s.subset(np.arange(80, 100)),
                                   s.subset(np.arange(100, len(s)))))
    return out


CFG = CollabConfig(rounds=2, local_epochs=1, batch_size=32, lr=3e-3, model="cnn_small", seed=0)


def _decode_every_payload(result) -> list[np.ndarray]:
    """Every update of every round, read from the chain, verified and decoded: their indices."""
    inst = result.institutions[0]
    out = []
    for r in range(CFG.rounds):
        records = inst.ledger.updates(r)
        assert len(records) == len(result.institutions)
        for rec in records:
            payload = fetch_payload(rec.digest, rec.payload, inst.store)   # verifies the digest
            dec = codec.decode_update(payload, expected_layout_id=inst.layout.layout_id,
                                      expected_size=inst.layout.size)
            assert dec.n == rec.n_values
            out.append(dec.indices)
    return out


@pytest.fixture(scope="module")
def chain_runs():
    torch.set_num_threads(1)
    insts = _skewed_institutions()
    return insts, {m: run_local_mask(insts, 2, CFG, m, chain="embedded") for m in ("fedper", "fedbn")}


@pytest.mark.parametrize("method", ["fedper", "fedbn"])
def test_local_coordinates_never_appear_on_chain(chain_runs, method):
    insts, runs = chain_runs
    result, mask = runs[method]
    layout = result.institutions[0].layout
    expected = select_names(layout, include="head.*") if method == "fedper" else mask_for_module_types(layout)
    np.testing.assert_array_equal(mask, expected)
    if method == "fedbn":   # BatchNorm weights, biases AND running statistics
        names = {e.name for e in layout.entries if mask[layout.slices[e.name]].all()}
        assert {"features.1.weight", "features.1.bias", "features.1.running_mean",
                "features.1.running_var"} <= names
    all_indices = _decode_every_payload(result)
    assert len(all_indices) == CFG.rounds * len(insts)
    shared = np.zeros(layout.size, dtype=bool)
    for idx in all_indices:
        assert not mask[idx].any(), "a local-only coordinate was shared on chain"
        shared[idx] = True
    np.testing.assert_array_equal(shared, ~mask)         # everything else is shared
    audit = audit_local_only(result, mask)
    assert audit.ok and audit.shared_local == 0 and audit.payloads == CFG.rounds * len(insts)
    # a mask the run did NOT keep local is caught
    other = local_mask_for("fedbn" if method == "fedper" else "fedper", layout)
    bad = audit_local_only(result, other)
    assert bad.shared_local > 0 and not bad.ok


@pytest.mark.parametrize("method", ["fedper", "fedbn"])
def test_personal_models_use_their_own_local_values(chain_runs, method):
    insts, runs = chain_runs
    result, mask = runs[method]
    layout = result.institutions[0].layout
    init = model_vector(build_model(CFG.model, 1, 2, CFG.seed), layout)
    glob = result.institutions[0].global_vec
    # nobody shares the local coordinates, so the aggregated global keeps the initial values there
    np.testing.assert_array_equal(glob[mask], init[mask])
    assert all(np.array_equal(i.global_vec, glob) for i in result.institutions)
    models = personal_models(result)
    vecs = [model_vector(m, layout) for m in models]
    for inst, v in zip(result.institutions, vecs):
        np.testing.assert_array_equal(v[~mask], glob[~mask])           # shared part = global model
        np.testing.assert_array_equal(v[mask], inst.local_vec[mask])   # local part = its own values
        assert not np.array_equal(v[mask], init[mask])                 # ... which training moved
    for i in range(len(vecs)):
        for j in range(i):
            assert not np.array_equal(vecs[i][mask], vecs[j][mask])     # and which differ by institution
    # personal_models returns copies: using them does not touch the institutions' state
    with torch.no_grad():
        for p in models[0].parameters():
            p.add_(1.0)
    np.testing.assert_array_equal(model_vector(result.institutions[0].personal_model(), layout), vecs[0])


def test_local_mask_after_collaborative_training_starts_from_the_global_model(chain_runs):
    insts, _ = chain_runs
    base = run_collaborative(insts, 2, CFG, chain=None)
    cfg = CollabConfig(**{**CFG.to_dict(), "rounds": 1, "lr": 1e-3})
    result, mask = run_local_mask(insts, 2, cfg, "fedper", chain="embedded", initial_model=base.model)
    audit = audit_local_only(result, mask, initial_model=base.model)
    assert audit.ok, audit
    layout = result.institutions[0].layout
    np.testing.assert_array_equal(result.institutions[0].global_vec[mask], model_vector(base.model, layout)[mask])


def test_local_mask_for_rejects_bad_input():
    layout = Layout.from_module(build_model("lenet", 1, 2, seed=0))
    with pytest.raises(ValueError, match="BatchNorm"):
        local_mask_for("fedbn", layout)
    with pytest.raises(ValueError, match="unknown"):
        local_mask_for("fedavg", layout)
    with pytest.raises(ValueError, match="matches no tensor"):
        local_mask_for("fedper", layout, head_patterns=("classifier.*",))


# --------------------------------------------------------------------------------------------
# a whole setting, twice: identical numbers and digests
# --------------------------------------------------------------------------------------------
def _toy_dataset() -> Dataset:
    s = toy_images(520, seed=7)
    idx = np.arange(len(s))
    return Dataset("toy", s.subset(idx[:360]), s.subset(idx[360:440]), s.subset(idx[440:]), 2)


def test_setting_is_deterministic_by_seed_and_summarized():
    from medchain.experiments.personalization import personalize_setting, plot_gains, setting_summary
    torch.set_num_threads(1)
    ds = _toy_dataset()
    cfg = CollabConfig(rounds=2, local_epochs=1, batch_size=32, lr=3e-3, model="cnn_small", seed=0)
    kw = dict(institutions=3, ft_all=FinetuneConfig(epochs=1, lr=1e-3, from_prior=True, batch_size=32),
              ft_head=FinetuneConfig(epochs=1, lr=5e-3, head_only=True, from_prior=True, batch_size=32),
              local_epochs=1, personal_rounds=1)
    a = personalize_setting(ds, "dirichlet:0.5", cfg, chain="embedded", **kw)
    b = personalize_setting(ds, "dirichlet:0.5", cfg, chain="embedded", **kw)
    cols = ["method", "institution", "split", "acc", "balanced_acc", "auc", "loss"]
    assert a.table[cols].equals(b.table[cols])
    sa, sb = setting_summary(a), setting_summary(b)
    assert sa["final_global_digest"] == sb["final_global_digest"]
    assert sa["personal_digests"] == sb["personal_digests"]
    assert sa["local_coordinates_never_shared"]
    assert set(sa["methods"]) == {"majority", "local_only", "global", "global_prior", "finetune_all",
                                  "finetune_head", "fedper", "fedbn"}
    assert sa["best_method"] in ("finetune_all", "finetune_head", "fedper", "fedbn")
    m = sa["methods"]
    assert m["fedper"]["gain_over_global_prior"]["mean_balanced_acc"] == pytest.approx(
        m["fedper"]["mean_balanced_acc"] - m["global_prior"]["mean_balanced_acc"])
    assert sa["holds"] == (sa["best_gain_over_global_prior"] >= 0.02 - 1e-9
                           and sa["best_gain_over_local_only"] >= 0.02 - 1e-9
                           and sa["best_worst_institution_vs_global_prior"] >= -0.01 - 1e-9)
    assert len(set(sa["ledger_address"].values())) == 3
    fig = plot_gains(a.table)
    assert len(fig.axes) >= 2

"""Methods for feature shift between sites (claim 1 under scanner shift), each driven by task
parameters recorded on chain: SCAFFOLD, FedBN, input harmonization. Small and deterministic; the
comparisons with FedAvg use margins, never exact training floats."""
import numpy as np
import pytest
import torch

from medchain import codec
from medchain.blobstore import MemoryBlobStore, fetch_payload
from medchain.data import load_dataset, partition
from medchain.harmonize import DEFAULT_AUGMENT, Augmenter, attach_standardization, standardize, validate_augment
from medchain.models import build_model
from medchain.params import Layout, digest_vector, mask_for_module_types, model_vector
from medchain.personalize import audit_local_only, local_mask_for
from medchain.protocol import CollabConfig, run_collaborative, scaffold_layout_id
from medchain.data.types import ImageSet, InstitutionData
from medchain.training import TrainConfig, torch_threads, train_epochs

from conftest import toy_images


# ------------------------------------------------------------------------------ configuration
def test_new_task_parameters_are_validated_with_clear_errors():
    with pytest.raises(ValueError, match="scaffold needs optimizer 'sgd'"):
        CollabConfig(scaffold=True)
    with pytest.raises(ValueError, match="scaffold needs the full update"):
        CollabConfig(scaffold=True, optimizer="sgd", theta_u=0.5)
    with pytest.raises(ValueError, match="keep_local must be one of"):
        CollabConfig(keep_local="bn")
    with pytest.raises(ValueError, match="unknown key"):
        CollabConfig(augment={"gamma": [0.5, 2.0]})
    with pytest.raises(ValueError, match="low <= high"):
        CollabConfig(augment={"contrast": [1.5, 0.5]})
    with pytest.raises(ValueError, match="allowed span"):
        CollabConfig(augment={"noise_sigma": [0.0, 5.0]})
    with pytest.raises(ValueError, match="standardize must be true or false"):
        CollabConfig(standardize="yes")
    cfg = CollabConfig(augment={"noise_sigma": (0, 0.1), "contrast": [1, 2]})
    assert cfg.augment == {"contrast": [1.0, 2.0], "noise_sigma": [0.0, 0.1]}   # canonical: ordered floats


def test_harmonization_and_method_parameters_round_trip_through_the_task_on_chain():
    from medchain.chain import connect, embedded_accounts
    from medchain.node import config_from_task, create_task

    w3 = connect(None)
    admin, member = embedded_accounts(w3)[:2]
    cfg = CollabConfig(rounds=2, keep_local="fedbn", standardize=True, augment=DEFAULT_AUGMENT, seed=4)
    ledger = create_task(w3, admin, cfg, [member.address], n_classes=3, start=False)
    task = ledger.task()
    assert task.params["augment"] == DEFAULT_AUGMENT and task.params["standardize"] is True
    assert config_from_task(task) == cfg
    sc = CollabConfig(rounds=2, scaffold=True, optimizer="sgd", lr=0.05)
    assert config_from_task(create_task(w3, admin, sc, [member.address], n_classes=3, start=False).task()) == sc


# ------------------------------------------------------------------------------ harmonization
def test_augmenter_is_deterministic_and_each_operation_does_what_it_says():
    x = torch.linspace(-1, 1, 2 * 28 * 28).reshape(2, 1, 28, 28)
    aug = Augmenter(DEFAULT_AUGMENT)
    a = aug(x.clone(), torch.Generator().manual_seed(3))
    b = aug(x.clone(), torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape
    assert not torch.equal(a, aug(x.clone(), torch.Generator().manual_seed(4)))
    none = Augmenter({"blur_sigma": [0.0, 0.0]})(x.clone(), torch.Generator().manual_seed(0))
    assert torch.allclose(none, x, atol=1e-6)                                 # sigma 0: identity
    rough = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    blurred = Augmenter({"blur_sigma": [1.0, 1.0]})(rough, torch.Generator().manual_seed(0))
    assert blurred.std() < 0.6 * rough.std()                                   # blur smooths noise
    assert blurred.mean().item() == pytest.approx(rough.mean().item(), abs=0.02)
    c = Augmenter({"contrast": [2.0, 2.0]})(x.clone(), torch.Generator().manual_seed(0))
    assert torch.allclose(c.std(dim=(1, 2, 3)), 2 * x.std(dim=(1, 2, 3)), rtol=1e-4)   # per image, about its mean
    assert torch.allclose(c.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-5)
    s = standardize(x * 0.3 + 0.2)
    assert s.mean(dim=(1, 2, 3)).abs().max() < 1e-5 and torch.allclose(s.std(dim=(1, 2, 3), unbiased=False),
                                                                         torch.ones(2), atol=1e-2)


def test_standardization_hook_adds_no_tensor_and_makes_the_model_window_invariant():
    model = build_model("cnn", 1, 3, 0).eval()
    before = digest_vector(model_vector(model), Layout.from_module(model))
    attach_standardization(attach_standardization(model))                    # idempotent
    assert digest_vector(model_vector(model), Layout.from_module(model)) == before
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(model(x), model(0.4 * x + 0.3), atol=1e-4)      # another display window
    assert validate_augment(None) == {} and validate_augment({}) == {}


# ------------------------------------------------------------------------------ SCAFFOLD
def test_unit_displacement_is_k_times_lr_for_plain_sgd():
    data = toy_images(64, 0)
    model = build_model("lenet", 1, 2, 0)
    out = train_epochs(model, data, TrainConfig(epochs=2, batch_size=16, lr=0.1, optimizer="sgd", momentum=0.0))
    assert out["steps"] == 8 and out["unit_displacement"] == pytest.approx(8 * 0.1)
    adam = train_epochs(model, data, TrainConfig(epochs=1, batch_size=16, optimizer="adam"))
    assert adam["unit_displacement"] is None


SGD = dict(rounds=3, local_epochs=2, batch_size=16, optimizer="sgd", lr=0.05, model="cnn", seed=0)


def _institutions(share_of_class_1) -> list[InstitutionData]:
    """Toy institutions of 64 training images each with the given share of class 1 (label skew);
    balanced validation and test splits."""
    out = []
    for i, share in enumerate(share_of_class_1):
        pool = toy_images(256, 10 * i)
        k = int(round(share * 64))
        idx = np.concatenate([np.flatnonzero(pool.labels == 1)[:k], np.flatnonzero(pool.labels == 0)[:64 - k]])
        out.append(InstitutionData(i, ImageSet(pool.images[idx], pool.labels[idx]), toy_images(20, 10 * i + 1),
                                   toy_images(40, 10 * i + 2)))
    return out


def _drift(result) -> float:
    """Client drift of the last round: mean ‖Δw_i − mean Δw‖ / ‖mean Δw‖ over the trainable
    coordinates, read from the on-chain payloads (SCAFFOLD's model half)."""
    inst = result.institutions[0]
    size, params = inst.layout.size, inst.param_mask
    r = len(result.history) - 1
    deltas = []
    for rec in inst.ledger.updates(r):
        dec = codec.decode_update(fetch_payload(rec.digest, rec.payload, inst.store))
        deltas.append(dec.to_dense()[:size][params].astype(np.float64))
    d = np.stack(deltas)
    mean = d.mean(axis=0)
    return float(np.mean(np.linalg.norm(d - mean, axis=1)) / np.linalg.norm(mean))


@pytest.fixture(scope="module")
def skew_runs():
    out = {}
    with torch_threads(1):
        for scheme, shares in (("iid", (0.5, 0.5, 0.5)), ("skew", (0.05, 0.95, 0.5))):
            for name, extra in (("fedavg", {}), ("scaffold", {"scaffold": True})):
                out[scheme, name] = run_collaborative(_institutions(shares), 2, CollabConfig(**SGD, **extra),
                                                      chain=None)
    return out


def test_scaffold_matches_fedavg_on_iid_and_cuts_client_drift_under_label_skew(skew_runs):
    last = {k: r.history[-1] for k, r in skew_runs.items()}
    # IID: nothing to correct — the same model quality and the same drift as FedAvg
    assert last["iid", "scaffold"]["acc"] == pytest.approx(last["iid", "fedavg"]["acc"], abs=0.05)
    assert last["iid", "scaffold"]["loss"] == pytest.approx(last["iid", "fedavg"]["loss"], abs=0.05)
    iid = _drift(skew_runs["iid", "scaffold"]) / _drift(skew_runs["iid", "fedavg"])
    assert 0.8 < iid < 1.2, iid
    # label skew: the control variates remove most of the client drift (Karimireddy et al. 2020)
    # without costing the global model anything
    skew = _drift(skew_runs["skew", "scaffold"]) / _drift(skew_runs["skew", "fedavg"])
    assert skew < 0.6, skew
    assert last["skew", "scaffold"]["loss"] <= last["skew", "fedavg"]["loss"] + 0.05


def test_scaffold_update_carries_the_control_variate_twice_the_bytes_and_every_replica_agrees(skew_runs):
    res = skew_runs["skew", "scaffold"]
    inst = res.institutions[0]
    size = inst.layout.size
    for rec in inst.ledger.updates(0):
        dec = codec.decode_update(fetch_payload(rec.digest, rec.payload, inst.store),
                                  expected_layout_id=scaffold_layout_id(inst.layout), expected_size=2 * size)
        assert dec.n == 2 * size and not dec.to_dense()[size:][~inst.param_mask].any()   # no variate on buffers
    plain = skew_runs["skew", "fedavg"].institutions[0]
    assert len(fetch_payload(*_first(inst))) > 1.9 * len(fetch_payload(*_first(plain)))
    # the server variate is derived by every replica from the chain alone: all equal, non-zero
    for other in res.institutions[1:]:
        assert np.array_equal(other.c_server, inst.c_server)
    assert np.abs(inst.c_server).max() > 0
    # c = the weighted mean of the c_i (full participation), as the paper's invariant
    w = np.array([len(i.data.train) for i in res.institutions], dtype=np.float64)
    mean_ci = sum(wi * i.c_own.astype(np.float64) for wi, i in zip(w, res.institutions)) / w.sum()
    assert np.allclose(inst.c_server, mean_ci, atol=1e-5)


def _first(inst):
    rec = inst.ledger.updates(0)[0]
    return rec.digest, rec.payload, inst.store


# ------------------------------------------------------------------------------ FedBN
def test_fedbn_from_the_task_parameters_never_puts_a_batchnorm_value_on_chain():
    ds = load_dataset("simulated:n=300,sites=3,seed=5")
    insts = partition(ds, None, "sites", seed=0)
    cfg = CollabConfig(rounds=2, local_epochs=1, keep_local="fedbn", seed=1)
    res = run_collaborative(insts, ds.n_classes, cfg, chain="embedded")
    mask = local_mask_for("fedbn", res.institutions[0].layout)
    assert np.array_equal(mask, mask_for_module_types(res.institutions[0].layout))
    audit = audit_local_only(res, mask)                        # decodes every payload of every round
    assert audit.payloads == 6 and audit.shared_local == 0 and audit.ok, audit.notes


# ------------------------------------------------------------------------------ the node
@pytest.mark.parametrize("extra", [{"scaffold": True, "optimizer": "sgd", "lr": 0.05},
                                   {"keep_local": "fedbn", "standardize": True, "augment": DEFAULT_AUGMENT}],
                         ids=["scaffold", "fedbn+harmonize"])
def test_a_node_reading_the_task_runs_the_method_as_the_simulation_does(extra, one_thread):
    from medchain.chain import LedgerClient, connect, embedded_accounts
    from medchain.node import InstitutionNode, create_task

    ds = load_dataset("simulated:n=200,sites=2,seed=6")
    data = partition(ds, None, "sites", seed=0)[1]
    cfg = CollabConfig(rounds=2, local_epochs=1, seed=2, **extra)
    w3 = connect(None)
    admin, member = embedded_accounts(w3)[:2]
    ledger = create_task(w3, admin, cfg, [member.address], n_classes=ds.n_classes)
    node = InstitutionNode(LedgerClient(w3, ledger.address, member), data, ds.n_classes,
                           store=MemoryBlobStore(), poll_interval=0.01)
    result = node.run()
    assert node.cfg == cfg
    ref = run_collaborative([data], ds.n_classes, cfg, chain=None)
    assert result.final_digest == ref.final_digest.hex()
    if cfg.scaffold:   # the node's own control variate, rebuilt from what the chain holds
        assert np.array_equal(node.inst.c_own, ref.institutions[0].c_own) and np.abs(node.inst.c_own).max() > 0

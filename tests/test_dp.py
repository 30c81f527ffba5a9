"""DP-SGD per institution (medchain.dp): the accountant's ε, the model check, the training."""
import numpy as np
import pytest

from medchain.data.types import ImageSet
from medchain.dp import check_dp_model, dp_train_epochs, new_accountant, plan
from medchain.models import build_model
from medchain.params import model_vector
from medchain.training import TrainConfig


def _data(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return ImageSet(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 2, n))


@pytest.mark.parametrize("eps", [1.0, 3.0, 8.0])
def test_plan_reaches_the_target_epsilon_at_delta_one_over_n(eps):
    p = plan(eps, 110, batch_size=32, rounds=12, local_epochs=1, max_grad_norm=1.0)
    assert p.delta == pytest.approx(1 / 110, rel=1e-12)
    assert p.sample_rate == pytest.approx(1 / 4, rel=1e-12)
    assert p.steps == 48
    assert p.epsilon <= eps
    assert p.epsilon == pytest.approx(eps, abs=0.02)      # Opacus's search tolerance is 0.01


def test_smaller_epsilon_needs_more_noise():
    sig = [plan(e, 110, batch_size=32, rounds=12, local_epochs=1, max_grad_norm=1.0).noise_multiplier
           for e in (1.0, 3.0, 8.0)]
    assert sig[0] > sig[1] > sig[2] > 0



def test_plan_is_computed_once_per_question():
    """Institutions of one task with the same n share one noise search (memoized); another n, ε,
    δ or batch size is another search with its own numbers."""
    a = plan(3.0, 110, batch_size=32, rounds=12, local_epochs=1, max_grad_norm=1.0)
    assert plan(3.0, 110, batch_size=32, rounds=12, local_epochs=1, max_grad_norm=1.0) is a
    for other in (plan(3.0, 111, batch_size=32, rounds=12, local_epochs=1, max_grad_norm=1.0),
                  plan(3.0, 110, batch_size=16, rounds=12, local_epochs=1, max_grad_norm=1.0),
                  plan(3.0, 110, batch_size=32, rounds=12, local_epochs=1, max_grad_norm=1.0, delta=1e-3)):
        assert other is not a and (other.n, other.sample_rate, other.delta) != (a.n, a.sample_rate, a.delta)

def test_plan_refuses_bad_budgets():
    with pytest.raises(ValueError, match="epsilon"):
        plan(0.0, 10, batch_size=4, rounds=1, local_epochs=1, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="delta"):
        plan(1.0, 10, batch_size=4, rounds=1, local_epochs=1, max_grad_norm=1.0, delta=1.5)


def test_batchnorm_cnn_is_refused_and_the_groupnorm_and_tanh_cnns_accepted():
    with pytest.raises(ValueError, match="cnn_tanh"):
        check_dp_model(build_model("cnn", 1, 2, 0), "cnn")
    check_dp_model(build_model("cnn_gn", 1, 2, 0), "cnn_gn")
    check_dp_model(build_model("cnn_tanh", 1, 2, 0), "cnn_tanh")


def test_training_charges_every_step_to_the_accountant_and_is_deterministic():
    data = _data()
    p = plan(3.0, len(data), batch_size=8, rounds=2, local_epochs=1, max_grad_norm=1.0)
    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-3, schedule="constant")
    vecs = []
    for _ in range(2):
        m, acc = build_model("cnn_gn", 1, 2, 0), new_accountant()
        start = model_vector(m)
        for r in range(2):
            out = dp_train_epochs(m, data, cfg, p, acc, seed=r)
            assert out["steps"] == 3
        assert sum(s for _, _, s in acc.history) == p.steps
        assert acc.get_epsilon(p.delta) == pytest.approx(p.epsilon, rel=1e-9)
        assert not any(hasattr(t, "grad_sample") for t in m.parameters())   # hooks removed
        vecs.append(model_vector(m))
        assert np.abs(vecs[-1] - start).max() > 0
    np.testing.assert_array_equal(vecs[0], vecs[1])


def test_epsilon_on_chain_is_what_each_institutions_accountant_reports(one_thread):
    """A DP task on the embedded chain: the ε in the task's parameters on chain is, for every
    institution, the ε its Opacus accountant reports after every step of the task at δ = 1/n, n =
    the sample count its updates record on chain."""
    from medchain.data import load_dataset, partition
    from medchain.protocol import CollabConfig, run_collaborative

    ds = load_dataset("simulated:n=200,sites=2,seed=0")
    insts = partition(ds, 2, "iid", seed=0)
    cfg = CollabConfig(model="cnn_gn", rounds=2, batch_size=16, dp_epsilon=3.0, seed=0)
    res = run_collaborative(insts, ds.n_classes, cfg, chain="embedded")
    on_chain = res.institutions[0].ledger.task().params
    assert on_chain["dp_epsilon"] == 3.0 and on_chain["dp_delta"] is None and on_chain["model"] == "cnn_gn"
    n_on_chain = {u.sender: u.n_samples for u in res.institutions[0].ledger.updates(1)}
    for inst in res.institutions:
        n = n_on_chain[getattr(inst.ledger.account, "address", inst.ledger.account)]
        assert n == len(inst.data.train)
        spent = inst.accountant.get_epsilon(1.0 / n)
        assert spent <= on_chain["dp_epsilon"]
        assert spent == pytest.approx(on_chain["dp_epsilon"], abs=0.02)
        assert sum(s for _, _, s in inst.accountant.history) == inst.dp_plan.steps == 2 * -(-n // 16)


def test_dp_task_parameters_are_checked():
    from medchain.data import load_dataset, partition
    from medchain.protocol import CollabConfig, Institution

    with pytest.raises(ValueError, match="dp_epsilon"):
        CollabConfig(dp_epsilon=-1.0)
    with pytest.raises(ValueError, match="scaffold, prox_mu, l2sp_beta or augment"):
        CollabConfig(model="cnn_gn", dp_epsilon=1.0, prox_mu=0.1)
    with pytest.raises(ValueError, match="dp_delta"):
        CollabConfig(model="cnn_gn", dp_epsilon=1.0, dp_delta=1.0)
    ds = load_dataset("simulated:n=60,sites=2,seed=0")
    with pytest.raises(ValueError, match="cnn_gn"):
        Institution(partition(ds, 2, "iid", seed=0)[0], ds.n_classes, CollabConfig(model="cnn", dp_epsilon=1.0), None)

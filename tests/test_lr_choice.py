"""Learning rates of the claim-1 methods are chosen on validation data only, by one rule."""
import pytest

from medchain.data import load_dataset
from medchain.experiments.lr_choice import choose_lr_scales, pick_scales
from medchain.experiments.methods import method_config
from medchain.protocol import CollabConfig


def test_pick_scales_keeps_the_best_validation_acc_ties_to_the_lower_loss_then_the_first_listed():
    val = {1.0: {"centralized": {"acc": 0.80, "loss": 0.5}, "fedavg": {"acc": 0.70, "loss": 0.9},
                 "fedbn": {"acc": 0.75, "loss": 0.6}},
           2.5: {"centralized": {"acc": 0.78, "loss": 0.4}, "fedavg": {"acc": 0.70, "loss": 0.8},
                 "fedbn": {"acc": 0.75, "loss": 0.6}}}
    assert pick_scales(val) == {"centralized": 1.0, "fedavg": 2.5, "fedbn": 1.0}
    with pytest.raises(ValueError, match="at least one"):
        pick_scales({})


def test_one_scale_trains_nothing_and_bad_scales_are_refused():
    ds = load_dataset("simulated:n=100,sites=2,seed=1")
    cfg = CollabConfig(rounds=1, local_epochs=1)
    out = choose_lr_scales(ds, "sites", cfg, [1.0], seed=100, methods=["fedavg", "scaffold"])
    assert out["chosen"] == {"centralized": 1.0, "fedavg": 1.0, "scaffold": 1.0} and out["val_acc"] == {}
    with pytest.raises(ValueError, match="positive"):
        choose_lr_scales(ds, "sites", cfg, [1.0, -2.0], seed=100, methods=["fedavg"])
    with pytest.raises(ValueError, match="lr_scale must be a positive"):
        method_config(cfg, "fedavg", 0.0)
    assert method_config(cfg, "scaffold", 2.0).lr == pytest.approx(0.1)   # SCAFFOLD's own SGD rate × 2


@pytest.mark.slow
def test_each_name_gets_a_scale_it_was_trained_at(one_thread):
    ds = load_dataset("simulated:n=200,sites=2,seed=2")
    cfg = CollabConfig(rounds=1, local_epochs=1, model="lenet")
    out = choose_lr_scales(ds, "sites", cfg, [1.0, 3.0], seed=100, methods=["fedavg"], chain=None)
    assert set(out["chosen"]) == {"centralized", "fedavg"} and set(out["chosen"].values()) <= {1.0, 3.0}
    for name, by_scale in out["val_acc"].items():
        best = max(by_scale.values())
        assert by_scale[out["chosen"][name]] == pytest.approx(best, abs=1e-12)

import numpy as np
import pytest
import torch

from conftest import toy_images
from medchain.metrics import auc_score, classification_metrics, majority_rate
from medchain.models import build_model
from medchain.params import Layout, model_vector
from medchain.training import (TrainConfig, cosine_lr, evaluate, fit, make_optimizer, predict_proba,
                               recalibrate_bn, to_tensor, train_epochs)


def test_to_tensor_scales_and_orders_channels():
    grey = np.array([[[0, 255]]], dtype=np.uint8)            # (1, 1, 2)
    x = to_tensor(grey)
    assert x.shape == (1, 1, 1, 2)
    assert x.flatten().tolist() == [-1.0, 1.0]
    rgb = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    assert to_tensor(rgb).shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="uint8"):
        to_tensor(np.zeros((1, 4, 4), dtype=np.float32))


def test_metrics_match_hand_computed_values():
    y = np.array([0, 0, 1, 1])
    proba = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.2, 0.8]])
    m = classification_metrics(y, proba)
    assert m["acc"] == pytest.approx(0.75)
    assert m["balanced_acc"] == pytest.approx(0.75)
    assert m["auc"] == pytest.approx(1.0)          # positives all score above negatives
    assert m["loss"] == pytest.approx(-np.mean(np.log([0.9, 0.4, 0.7, 0.8])))
    assert np.isnan(auc_score(np.array([1, 1]), proba[:2]))
    assert majority_rate(np.array([2, 2, 1]), np.array([2, 1, 1, 1])) == pytest.approx(0.25)


def test_multiclass_auc_is_macro_one_vs_rest():
    y = np.array([0, 1, 2, 2])
    proba = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.5, 0.1, 0.4], [0.1, 0.1, 0.8]])
    # class 0: scores of positives {0.8} vs negatives {0.1,0.5,0.1} → 1.0; class 1 → 1.0;
    # class 2: positives {0.4, 0.8} vs negatives {0.1, 0.1} → 1.0
    assert classification_metrics(y, proba)["auc"] == pytest.approx(1.0)
    proba[2] = [0.1, 0.5, 0.4]   # class 1 now: positive 0.8 vs {0.1, 0.5, 0.1} still 1.0; class 2 unchanged
    assert classification_metrics(y, proba)["acc"] == pytest.approx(0.75)


def test_fit_learns_a_learnable_problem_and_selects_on_validation():
    train, val, test = toy_images(400, 0), toy_images(100, 1), toy_images(200, 2)
    model = build_model("cnn", 1, 2, seed=0)
    before = evaluate(model, test)["acc"]
    res = fit(model, train, val, TrainConfig(epochs=3, batch_size=32, lr=3e-3))
    after = evaluate(model, test)
    assert after["acc"] >= 0.95 and after["auc"] >= 0.98
    assert after["acc"] > before
    assert len(res.history) == 3 and 1 <= res.best_epoch <= 3
    assert res.best_val["acc"] == pytest.approx(max(h["val_acc"] for h in res.history))


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_training_is_deterministic_by_seed(one_thread, optimizer):
    """Same seed and thread count → bit-identical weights (fused optimizer, channels_last)."""
    data = toy_images(200, 0)
    anchor = {k: v.detach().clone() for k, v in build_model("cnn", 1, 2, seed=1).named_parameters()}
    states, losses = [], []
    for seed in (5, 5, 6):
        model = build_model("cnn", 1, 2, seed=0)
        stats = train_epochs(model, data, TrainConfig(epochs=1, batch_size=32, seed=seed, optimizer=optimizer),
                             anchor=anchor, anchor_strength=0.1)
        states.append(model.state_dict())
        losses.append(stats["loss"])
        assert stats["steps"] == 7 and np.isfinite(stats["loss"]) and stats["loss"] > 0
    assert list(states[0]) == list(states[1])
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    assert losses[0] == losses[1]
    assert not torch.equal(states[0]["head.weight"], states[2]["head.weight"])


def test_training_and_evaluation_keep_the_model_layout():
    """channels_last is used only inside the loops: afterwards the same Parameter objects, in
    contiguous format, in the same state_dict order, with the same medchain.params layout."""
    model = build_model("cnn", 1, 2, seed=0)
    params_before = list(model.parameters())
    keys_before, layout_before = list(model.state_dict()), Layout.from_module(model)
    data = toy_images(64, 0)
    train_epochs(model, data, TrainConfig(epochs=1, batch_size=32))
    predict_proba(model, data)
    recalibrate_bn(model, data)
    assert all(a is b for a, b in zip(params_before, model.parameters()))
    assert all(t.is_contiguous() for t in model.state_dict().values())
    assert list(model.state_dict()) == keys_before and Layout.from_module(model) == layout_before
    vec = model_vector(model)
    assert np.array_equal(vec, np.concatenate([t.detach().float().numpy().ravel()
                                               for t in model.state_dict().values() if t.is_floating_point()]))
    # a model kept in channels_last by its owner stays so; evaluation leaves it trainable
    model.to(memory_format=torch.channels_last)
    predict_proba(model, data)
    assert model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    train_epochs(model, data, TrainConfig(epochs=1, batch_size=32))
    assert model.features[3].weight.is_contiguous(memory_format=torch.channels_last)


def test_proximal_gradient_equals_autograd_of_the_penalty():
    """train_epochs adds strength·(w − a) to the gradients instead of back-propagating the
    penalty; one full-batch SGD step must match the autograd version."""
    data = toy_images(64, 0)
    strength, lr = 3.0, 0.1
    anchor = {k: v.detach().clone() for k, v in build_model("cnn", 1, 2, seed=1).named_parameters()}
    model, ref = build_model("cnn", 1, 2, seed=0), build_model("cnn", 1, 2, seed=0)
    cfg = TrainConfig(epochs=1, batch_size=64, lr=lr, optimizer="sgd", momentum=0.0, schedule="constant")
    stats = train_epochs(model, data, cfg, anchor=anchor, anchor_strength=strength)
    ref.train().to(memory_format=torch.channels_last)   # the memory format train_epochs trains in
    x = to_tensor(data.images).contiguous(memory_format=torch.channels_last)
    loss = torch.nn.functional.cross_entropy(ref(x), torch.from_numpy(data.labels))
    penalty = 0.5 * strength * sum(((p - anchor[k]) ** 2).sum() for k, p in ref.named_parameters())
    (loss + penalty).backward()
    with torch.no_grad():
        for (k, p), q in zip(ref.named_parameters(), model.parameters()):
            torch.testing.assert_close(q, p - lr * p.grad, rtol=1e-4, atol=1e-5, msg=k)
    assert stats["loss"] == pytest.approx(float((loss + penalty).detach()), rel=1e-4)


def test_optimizers_are_fused_or_foreach():
    """medchain.optim's fused steps where this torch build has the kernels, else torch.optim foreach."""
    from medchain.optim import FusedOptimizer, fused_available

    p = [torch.nn.Parameter(torch.zeros(3))]
    for name in ("adam", "adamw", "sgd"):
        opt = make_optimizer(p, TrainConfig(optimizer=name))
        if fused_available():
            assert isinstance(opt, FusedOptimizer) and opt.kind == name, name
        else:
            assert opt.defaults.get("foreach"), name


def test_anchor_term_pulls_weights_toward_the_anchor():
    data = toy_images(200, 0)
    anchor_model = build_model("cnn", 1, 2, seed=0)
    anchor = {k: v.detach().clone() for k, v in anchor_model.named_parameters()}
    dist = []
    for strength in (0.0, 100.0):
        model = build_model("cnn", 1, 2, seed=0)
        train_epochs(model, data, TrainConfig(epochs=2, batch_size=32, lr=3e-3), anchor=anchor,
                     anchor_strength=strength)
        dist.append(sum(float(((p.detach() - anchor[k]) ** 2).sum()) for k, p in model.named_parameters()))
    assert dist[1] < 0.5 * dist[0]


def test_cosine_schedule_and_config_validation():
    assert cosine_lr(1.0, 0, 10) == pytest.approx(1.0)
    assert cosine_lr(1.0, 10, 10, floor=0.01) == pytest.approx(0.01)
    assert cosine_lr(1.0, 5, 10, floor=0.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown optimizer"):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(ValueError, match="empty"):
        train_epochs(build_model("cnn", 1, 2, 0), toy_images(0), TrainConfig())


def test_importing_training_pulls_in_no_sklearn_or_pandas():
    """A node process imports training; scikit-learn (metrics) loads on the first evaluation."""
    import subprocess
    import sys
    code = ("import sys, medchain.training\n"
            "print(','.join(m for m in ('sklearn', 'pandas', 'matplotlib', 'skimage') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


def test_anchor_never_moves_a_frozen_parameter(one_thread):
    """The proximal gradient is added only to trainable tensors: a frozen layer with an anchor far
    away stays exactly where it was (a head-only fine-tune with L2-SP must not move the body)."""
    model = build_model("cnn", 1, 2, 0, width=8)
    frozen = next(n for n, p in model.named_parameters() if p.ndim == 4)
    before = dict(model.named_parameters())[frozen].detach().clone()
    dict(model.named_parameters())[frozen].requires_grad_(False)
    anchor = {n: p.detach() + 1.0 for n, p in model.named_parameters()}
    train_epochs(model, toy_images(64), TrainConfig(epochs=1, batch_size=16, lr=1e-2), anchor=anchor,
                 anchor_strength=10.0)
    assert torch.equal(dict(model.named_parameters())[frozen].detach(), before)

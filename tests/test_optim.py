"""medchain.optim.FusedOptimizer steps equal torch.optim's fused steps bit for bit (same machine,
same tensors), and a training run through medchain.training equals one through torch.optim."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from medchain.data.types import ImageSet
from medchain.models import build_model
from medchain.optim import FusedOptimizer, fused_available
from medchain.training import TrainConfig, make_optimizer, train_epochs

pytestmark = pytest.mark.skipif(not fused_available(), reason="this torch build has no fused CPU kernels")

CASES = [("adam", {}, 0.0), ("adam", {}, 1e-3), ("adamw", {}, 1e-2),
         ("sgd", {"momentum": 0.9}, 0.0), ("sgd", {"momentum": 0.9}, 5e-4), ("sgd", {"momentum": 0.0}, 0.0)]


def _torch_opt(kind, params, lr, wd, kw):
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[kind]
    return cls(params, lr=lr, weight_decay=wd, fused=True, **kw)


@pytest.mark.parametrize("kind,kw,wd", CASES)
def test_steps_equal_torch_optim_bit_for_bit(kind, kw, wd):
    torch.manual_seed(0)
    model = build_model("cnn", 1, 3, 0).to(memory_format=torch.channels_last)
    twin = copy.deepcopy(model)
    ours = FusedOptimizer(model.parameters(), kind, lr=3e-3, weight_decay=wd, **kw)
    ref = _torch_opt(kind, twin.parameters(), 3e-3, wd, kw)
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        x = torch.randn(8, 1, 28, 28, generator=gen).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 3, (8,), generator=gen)
        for net, opt in ((model, ours), (twin, ref)):
            opt.param_groups[0]["lr"] = 3e-3 * (1 - step / 10)     # a schedule, as train_epochs sets it
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        for (name, a), b in zip(model.named_parameters(), twin.parameters()):
            assert torch.equal(a, b), f"{kind}: {name} differs after step {step}"
    with torch.no_grad():
        moved = sum(float((a - b).abs().sum()) for a, b in zip(model.parameters(), build_model("cnn", 1, 3, 0).parameters()))
    assert moved > 0


def test_parameters_without_grad_are_left_alone():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = FusedOptimizer([a, b], "sgd", lr=0.1, momentum=0.9)
    a.grad = torch.ones(3)
    opt.step()
    assert torch.equal(b, torch.ones(3)) and a[0].item() == pytest.approx(0.9, abs=1e-6)
    b.grad = torch.ones(3)     # b's first step after a's: its own buffer starts from its gradient
    a.grad = torch.ones(3)
    opt.step()
    assert b[0].item() == pytest.approx(0.9, abs=1e-6) and a[0].item() == pytest.approx(0.9 - 0.19, abs=1e-6)


def test_unknown_kind_names_the_choices():
    with pytest.raises(ValueError, match="adam"):
        FusedOptimizer([torch.nn.Parameter(torch.ones(1))], "rmsprop", lr=0.1)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_train_epochs_equals_a_torch_optim_run(optimizer, monkeypatch):
    """medchain.training with FusedOptimizer gives the weights torch.optim (fused=True) gives."""
    rng = np.random.default_rng(0)
    data = ImageSet(rng.integers(0, 255, (40, 12, 12)).astype(np.uint8), rng.integers(0, 2, 40).astype(np.int64))
    cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-2, optimizer=optimizer, weight_decay=1e-4)
    ours, ref = build_model("cnn", 1, 2, 0), build_model("cnn", 1, 2, 0)
    assert isinstance(make_optimizer(ours.parameters(), cfg), FusedOptimizer)
    train_epochs(ours, data, cfg, lr_range=(1e-2, 1e-3))
    kw = {"momentum": cfg.momentum} if optimizer == "sgd" else {}
    monkeypatch.setattr("medchain.training.make_optimizer",
                        lambda params, c: _torch_opt(optimizer, list(params), c.lr, c.weight_decay, kw))
    train_epochs(ref, data, cfg, lr_range=(1e-2, 1e-3))
    for (k, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k

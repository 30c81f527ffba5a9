"""Using a source task's global model on a target task: warm start and L2-SP (medchain.transfer)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medchain.crosschain import model_payload, parse_model_payload
from medchain.models import build_model
from medchain.params import Layout, digest_vector, model_vector
from medchain.training import TrainConfig, train_epochs
from medchain.transfer import compatible_entries, l2sp_anchor, transfer_plan, warm_start

from conftest import toy_images

torch.set_num_threads(1)


def _source(num_classes=2, in_chans=1, width=8, seed=1, name="cnn"):
    kw = {"width": width} if name == "cnn" else {}
    m = build_model(name, in_chans, num_classes, seed, **kw)
    # make the BatchNorm statistics non-trivial so that copying them is visible
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-1, 1)
                mod.running_var.uniform_(0.5, 2)
    layout = Layout.from_module(m)
    return m, layout, model_vector(m, layout)


def test_warm_start_copies_exactly_the_feature_tensors_2_to_3_classes():
    _, src_layout, src_vec = _source(num_classes=2)
    target = build_model("cnn", 1, 3, seed=7, width=8)
    before = {k: v.detach().clone() for k, v in target.state_dict().items()}
    copied = warm_start(target, src_vec, src_layout)

    tgt_layout = Layout.from_module(target)
    features = [e.name for e in tgt_layout.entries if not e.name.startswith("head.")]
    assert copied == features == compatible_entries(src_layout, tgt_layout)
    assert any(n.endswith("running_mean") for n in copied) and any(n.endswith("running_var") for n in copied)
    after = target.state_dict()
    for name, t in after.items():
        if name in copied:
            src = torch.from_numpy(src_vec[src_layout.slices[name]]).reshape(t.shape)
            assert torch.equal(t, src), name
        else:   # head.* and integer buffers (num_batches_tracked) untouched
            assert torch.equal(t, before[name]), name
    assert after["head.weight"].shape == (3, 16)
    # the transferred model still runs and predicts 3 classes
    assert target(torch.zeros(2, 1, 28, 28)).shape == (2, 3)


def test_warm_start_through_the_bridge_payload():
    """The payload format of the bridge carries the vector whose digest the source attested."""
    _, src_layout, src_vec = _source()
    payload = model_payload(src_vec, src_layout)
    import hashlib
    assert hashlib.sha256(payload).digest() == digest_vector(src_vec, src_layout)
    vec = parse_model_payload(payload, src_layout)
    assert np.array_equal(vec, src_vec)
    target = build_model("cnn", 1, 4, seed=3, width=8)
    assert warm_start(target, vec, src_layout)
    other = Layout.from_module(build_model("cnn", 1, 3, seed=0, width=8))
    with pytest.raises(ValueError, match="layout"):
        parse_model_payload(payload, other)


@pytest.mark.parametrize("target_kw, needle", [
    ({"name": "lenet", "in_chans": 1}, "features.0.weight"),      # another architecture
    ({"name": "cnn", "in_chans": 3}, "features.0.weight"),        # another number of channels
    ({"name": "cnn", "in_chans": 1, "width": 16}, "features.0.weight"),  # another width
])
def test_incompatible_architecture_is_refused_clearly(target_kw, needle):
    _, src_layout, src_vec = _source(num_classes=2, in_chans=1, width=8)
    name = target_kw.pop("name")
    target = build_model(name, target_kw.pop("in_chans"), 3, seed=0, **target_kw)
    before = {k: v.detach().clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError) as info:
        warm_start(target, src_vec, src_layout)
    msg = str(info.value)
    assert needle in msg and "source" in msg and "target" in msg
    if name == "cnn":   # the message names both shapes
        t_shape = tuple(target.state_dict()[needle].shape)
        assert str(tuple(src_layout.entry(needle).shape)) in msg and str(t_shape) in msg
    with pytest.raises(ValueError):
        l2sp_anchor(src_vec, src_layout, target)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())  # nothing changed


def test_nothing_to_transfer_is_refused():
    _, src_layout, src_vec = _source()
    target = build_model("cnn", 1, 3, seed=0, width=8)
    with pytest.raises(ValueError, match="nothing to transfer"):
        warm_start(target, src_vec, src_layout, exclude=("*",))
    with pytest.raises(ValueError, match="shape"):
        warm_start(target, src_vec[:-1], src_layout)


def test_l2sp_anchor_pulls_training_toward_the_source():
    _, src_layout, src_vec = _source(num_classes=2)
    data = toy_images(64, seed=2)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=5e-3, seed=0)

    def distance(model, anchor):
        named = dict(model.named_parameters())
        return float(sum(((named[k].detach() - a) ** 2).sum() for k, a in anchor.items()))

    results = {}
    for beta in (0.0, 5.0):
        target = build_model("cnn", 1, 3, seed=5, width=8)
        warm_start(target, src_vec, src_layout)
        anchor = l2sp_anchor(src_vec, src_layout, target)
        assert set(anchor) == {n for n, _ in target.named_parameters() if not n.startswith("head.")}
        assert distance(target, anchor) == 0.0
        train_epochs(target, data, cfg, anchor=anchor, anchor_strength=beta)
        results[beta] = distance(target, anchor)
    assert results[0.0] > 0
    assert results[5.0] < 0.5 * results[0.0], results


def test_transfer_plan_names_missing_source_tensor():
    src = build_model("cnn", 1, 2, seed=0, width=8)
    src_layout = Layout.from_module(src)
    # a "source" without the hidden linear layer: the target has a tensor the source lacks
    cut = Layout(tuple(e for e in src_layout.entries if not e.name.startswith("features.19.")))
    tgt_layout = Layout.from_module(build_model("cnn", 1, 3, seed=0, width=8))
    with pytest.raises(ValueError, match=r"features\.19\.weight.*no counterpart in the source"):
        transfer_plan(cut, tgt_layout)
    with pytest.raises(ValueError, match=r"features\.19\.weight.*no counterpart in the target"):
        transfer_plan(src_layout, cut)

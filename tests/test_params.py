"""medchain.params: layout, flatten/unflatten, masks, digests (hand-computed tiny model)."""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from medchain.params import (Layout, LayoutEntry, digest_vector, flatten, load_flat,
                             mask_for_module_types, model_vector, select_names, unflatten)

# conv.weight 2*1*3*3 = 18, conv.bias 2, bn.{weight,bias,running_mean,running_var} 2 each,
# head.weight 3*8 = 24, head.bias 3  ->  P = 55; bn.num_batches_tracked (int64) excluded.
EXPECTED = [
    ("conv.weight", (2, 1, 3, 3), "param", "Conv2d", 0, 18),
    ("conv.bias", (2,), "param", "Conv2d", 18, 20),
    ("bn.weight", (2,), "param", "BatchNorm2d", 20, 22),
    ("bn.bias", (2,), "param", "BatchNorm2d", 22, 24),
    ("bn.running_mean", (2,), "buffer", "BatchNorm2d", 24, 26),
    ("bn.running_var", (2,), "buffer", "BatchNorm2d", 26, 28),
    ("head.weight", (3, 8), "param", "Linear", 28, 52),
    ("head.bias", (3,), "param", "Linear", 52, 55),
]
CANONICAL = (
    '{"entries":['
    '["conv.weight",[2,1,3,3],"param","Conv2d"],'
    '["conv.bias",[2],"param","Conv2d"],'
    '["bn.weight",[2],"param","BatchNorm2d"],'
    '["bn.bias",[2],"param","BatchNorm2d"],'
    '["bn.running_mean",[2],"buffer","BatchNorm2d"],'
    '["bn.running_var",[2],"buffer","BatchNorm2d"],'
    '["head.weight",[3,8],"param","Linear"],'
    '["head.bias",[3],"param","Linear"]'
    '],"format":"medchain.layout/1"}'
)


def tiny(seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 2, 3), bn=nn.BatchNorm2d(2),
                                  flat=nn.Flatten(), head=nn.Linear(8, 3))).to(dtype)
    m.train()
    with torch.no_grad():  # move BN running stats and num_batches_tracked off their defaults
        m(torch.randn(5, 1, 4, 4, dtype=dtype))
        m(torch.randn(5, 1, 4, 4, dtype=dtype))
    return m


def test_layout_of_tiny_model():
    layout = Layout.from_module(tiny())
    assert layout.size == 55 and len(layout) == 8
    for e, (name, shape, kind, mtype, a, b) in zip(layout.entries, EXPECTED):
        assert (e.name, e.shape, e.kind, e.module_type) == (name, shape, kind, mtype)
        assert layout.slices[name] == slice(a, b)
        assert e.numel == b - a
    assert "bn.num_batches_tracked" not in layout.slices
    assert [e.role for e in layout.entries] == [
        "param", "param", "bn_param", "bn_param", "bn_buffer", "bn_buffer", "param", "param"]
    assert layout.entry("bn.running_var").is_batchnorm
    with pytest.raises(KeyError, match="not in the layout"):
        layout.entry("nope")


def test_layout_id_is_sha256_of_canonical_json():
    layout = Layout.from_module(tiny())
    assert layout.canonical_json() == CANONICAL
    assert layout.layout_id == hashlib.sha256(CANONICAL.encode()).digest()
    assert len(layout.layout_id) == 32 and layout.layout_id_hex == layout.layout_id.hex()
    # same architecture, other weights -> same layout; other architecture -> other id
    assert Layout.from_module(tiny(seed=1)) == layout
    other = Layout.from_module(nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 2, 3),
                                                         head=nn.Linear(8, 3))))
    assert other != layout and other.layout_id != layout.layout_id
    assert Layout.from_dict(layout.to_dict()) == layout
    bad = layout.to_dict() | {"layout_id": "00" * 32}
    with pytest.raises(ValueError, match="layout id mismatch"):
        Layout.from_dict(bad)


def test_flatten_unflatten_roundtrip_bitwise_with_bn_buffers():
    m = tiny()
    layout = Layout.from_module(m)
    sd = m.state_dict()
    vec = flatten(sd, layout)
    assert vec.dtype == np.float32 and vec.shape == (55,)
    assert np.array_equal(vec[24:26], sd["bn.running_mean"].numpy())
    assert np.array_equal(vec[26:28], sd["bn.running_var"].numpy())
    assert np.array_equal(vec[28:52], sd["head.weight"].numpy().ravel())
    first = float(sd["conv.weight"].flatten()[0])
    flatten(sd, layout)[0] += 1.0  # the vector is a copy, not a view of the model
    assert float(m.state_dict()["conv.weight"].flatten()[0]) == first

    back = unflatten(vec, layout, like=sd)
    assert list(back) == list(sd)  # same keys, same order, incl. num_batches_tracked
    for k in sd:
        assert back[k].dtype == sd[k].dtype and back[k].shape == sd[k].shape
        assert back[k].numpy().tobytes() == sd[k].numpy().tobytes(), k
    assert int(back["bn.num_batches_tracked"]) == 2

    only = unflatten(vec, layout)
    assert list(only) == list(layout.names)
    assert all(t.dtype == torch.float32 for t in only.values())


def test_load_flat_and_model_vector():
    src, dst = tiny(seed=1), tiny(seed=2)
    dst.bn.num_batches_tracked.fill_(7)
    params_before = [id(p) for p in dst.parameters()]
    vec = model_vector(src)
    load_flat(dst, vec)
    assert model_vector(dst).tobytes() == vec.tobytes()
    assert [id(p) for p in dst.parameters()] == params_before  # in place
    assert int(dst.bn.num_batches_tracked) == 7  # integer buffers are untouched
    with pytest.raises(ValueError, match=r"shape \(54,\)"):
        load_flat(dst, vec[:54])
    other = Layout.from_module(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="architectures do not match"):
        load_flat(dst, vec, layout=other)


def test_float64_model_round_trips_through_float32_vector():
    m = tiny(dtype=torch.float64)
    vec = model_vector(m)
    assert vec.dtype == np.float32
    m2 = tiny(seed=3, dtype=torch.float64)
    load_flat(m2, vec)
    assert m2.head.weight.dtype == torch.float64
    assert np.array_equal(model_vector(m2), vec)


def test_flatten_rejects_other_architectures():
    m = tiny()
    layout = Layout.from_module(m)
    sd = m.state_dict()
    with pytest.raises(ValueError, match="lacks 1 tensor"):
        flatten({k: v for k, v in sd.items() if k != "head.bias"}, layout)
    with pytest.raises(ValueError, match="not in the layout"):
        flatten(dict(sd, extra=torch.zeros(2)), layout)
    with pytest.raises(ValueError, match="head.bias: shape"):
        flatten(dict(sd, **{"head.bias": torch.zeros(4)}), layout)
    with pytest.raises(TypeError, match="floating point"):
        unflatten(np.zeros(55, dtype=np.int32), layout)


def test_digest_vector_known_answer_and_sensitivity():
    m = tiny()
    layout = Layout.from_module(m)
    vec = model_vector(m)
    d = digest_vector(vec, layout)
    # hand-built: sha256(layout_id || 55 little-endian float32)
    assert d == hashlib.sha256(layout.layout_id + struct.pack("<55f", *vec.tolist())).digest()
    assert len(d) == 32
    assert digest_vector(model_vector(m), layout) == d  # recomputation
    assert digest_vector(vec.astype(">f4"), layout) == d  # byte order of the array is irrelevant
    v2 = vec.copy()
    v2[40] = np.nextafter(v2[40], np.float32(np.inf))  # one ulp in one coordinate
    assert digest_vector(v2, layout) != d
    with pytest.raises(TypeError, match="float32"):
        digest_vector(vec.astype(np.float64), layout)
    with pytest.raises(ValueError, match="shape"):
        digest_vector(vec[:-1], layout)


def test_select_names():
    layout = Layout.from_module(tiny())

    def ranges(mask):
        idx = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(int), [0]))))
        return [tuple(p) for p in idx.reshape(-1, 2).tolist()]

    assert select_names(layout).all()
    assert ranges(select_names(layout, include="head.*")) == [(28, 55)]
    assert ranges(select_names(layout, exclude="head.*")) == [(0, 28)]
    assert ranges(select_names(layout, exclude=["*.running_*"])) == [(0, 24), (28, 55)]
    assert ranges(select_names(layout, include=["bn.*", "conv.bias"],
                               exclude="bn.running_var")) == [(18, 26)]
    assert not select_names(layout, include="Head.*").any()  # case-sensitive
    with pytest.raises(ValueError, match="'haed.\\*' matches no tensor"):
        select_names(layout, include="haed.*", strict=True)


def test_mask_for_module_types():
    layout = Layout.from_module(tiny())
    m = mask_for_module_types(layout)
    assert np.flatnonzero(m).tolist() == list(range(20, 28))
    assert np.flatnonzero(mask_for_module_types(layout, kinds=("buffer",))).tolist() == \
        list(range(24, 28))
    assert np.flatnonzero(mask_for_module_types(layout, types=("Linear",))).tolist() == \
        list(range(28, 55))
    with pytest.raises(ValueError, match="unknown kinds"):
        mask_for_module_types(layout, kinds=("weights",))


def test_entry_validation():
    with pytest.raises(ValueError, match="kind must be"):
        LayoutEntry("x", (1,), "weight")
    with pytest.raises(ValueError, match="duplicate"):
        Layout((LayoutEntry("x", (1,), "param"), LayoutEntry("x", (2,), "param")))
    with pytest.raises(ValueError, match="no floating-point"):
        Layout.from_module(nn.ReLU())

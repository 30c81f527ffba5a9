import sys

import pytest
import torch

from medchain.models import build_model, count_parameters, create_model, list_models


@pytest.mark.parametrize("name,chans,classes", [("cnn", 1, 3), ("cnn", 3, 2), ("lenet", 1, 2), ("lenet", 3, 8),
                                                  ("cnn_tanh", 1, 2), ("cnn_tanh", 3, 5)])
def test_models_map_images_to_logits(name, chans, classes):
    model = create_model(name, chans, classes)
    out = model(torch.zeros(4, chans, 28, 28))
    assert out.shape == (4, classes)
    # every model exposes the parts that transfer (features) and personalization (head) rely on
    assert isinstance(model.head, torch.nn.Linear) and model.head.out_features == classes
    assert hasattr(model, "features")


def test_tanh_cnn_is_the_dp_literatures_model_at_any_image_size():
    """Papernot et al. 2021's MNIST model: 16 8×8 and 32 4×4 strided filters, 32 hidden, ~26k
    parameters; no normalisation, so DP-SGD can train it; other image sizes reach the same head."""
    m = create_model("cnn_tanh", 1, 2)
    assert count_parameters(m) == 1040 + 8224 + 16416 + 66
    assert not any(isinstance(x, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)) for x in m.modules())
    for size in (16, 28, 64):
        assert m(torch.zeros(2, 1, size, size)).shape == (2, 2)


def test_default_cnn_has_about_100k_parameters():
    assert 80_000 <= count_parameters(create_model("cnn", 1, 3)) <= 130_000


def test_build_model_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_model("cnn", 1, 3, seed=7)
    assert torch.rand(1) == expected_next
    b = build_model("cnn", 1, 3, seed=7)
    c = build_model("cnn", 1, 3, seed=8)
    for (k, va), vb, vc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.head.weight, c.head.weight)


def test_unknown_model_and_bad_sizes_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        create_model("resnet", 1, 2)
    with pytest.raises(ValueError, match="num_classes >= 2"):
        create_model("cnn", 1, 1)
    assert {"cnn", "lenet"} <= set(list_models())


def test_timm_models_build_or_explain_what_is_missing():
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match=r"needs the optional timm package .*medchain\[timm\]"):
            create_model("timm:resnet18", 1, 2)
        return
    except RuntimeError:               # torchvision built for another torch
        with pytest.raises(RuntimeError, match="torchvision cannot load beside torch"):
            create_model("timm:resnet18", 1, 2)
        return
    model = create_model("timm:resnet18", 1, 3)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 3)


def test_timm_with_a_mismatched_torchvision_is_a_clear_error(tmp_path, monkeypatch):
    """timm imports torchvision; PyPI's torchvision beside the CPU torch raises RuntimeError on
    import. Simulated with a stand-in timm that fails the same way: the error names the fix."""
    fake = tmp_path / "timm"
    fake.mkdir()
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "timm", raising=False)
    with pytest.raises(RuntimeError, match=r"torchvision cannot load beside torch .*"
                                           r"torchvision::nms does not exist.*torch==2\.14\.1 "
                                           r"torchvision==0\.29\.1 timm"):
        create_model("timm:resnet18", 1, 2)
    assert create_model("cnn", 1, 2) is not None      # the built-in models are unaffected

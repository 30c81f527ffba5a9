"""Model registry: one entry point, ``create_model(name, in_chans, num_classes)``.

Every model exposes two named parts so that later stages can treat them apart:
``features`` (the shared feature extractor) and ``head`` (the classifier layer). Transfer between
chains moves ``features``; FedPer keeps ``head`` local.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .registry import Registry

_REGISTRY: Registry[Callable[..., nn.Module]] = Registry("model")

#: Decorator: ``@register_model("name")`` makes ``fn(in_chans, num_classes, **kw) -> nn.Module``
#: available by ``name``.
register_model = _REGISTRY.register


def list_models() -> list[str]:
    """Registered model names (``timm:<name>`` works on top of these when timm is installed)."""
    return _REGISTRY.names()


def create_model(name: str = "cnn", in_chans: int = 1, num_classes: int = 2, **kwargs) -> nn.Module:
    """Build a freshly initialised model (weights depend on the torch RNG state: seed first).

    name: a registered name (``cnn``, ``lenet``) or ``timm:<model>`` for any timm model
    (``pretrained=False`` always: nothing is downloaded).
    """
    if in_chans < 1 or num_classes < 2:
        raise ValueError(f"need in_chans >= 1 and num_classes >= 2, got {in_chans} and {num_classes}")
    if name.startswith("timm:"):
        return _create_timm(name[len("timm:"):], in_chans, num_classes, **kwargs)
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {list_models()} or 'timm:<name>'")
    return _REGISTRY[name](in_chans=in_chans, num_classes=num_classes, **kwargs)


def _conv_block(cin: int, cout: int, norm: str = "batch") -> list[nn.Module]:
    layer = nn.BatchNorm2d(cout) if norm == "batch" else nn.GroupNorm(min(8, cout), cout)
    # in-place ReLU after GroupNorm would modify a view Opacus's backward hooks hand on
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), layer, nn.ReLU(inplace=norm == "batch")]


class SmallCNN(nn.Module):
    """Five 3×3 conv layers with BatchNorm, two max-pools, global average pooling, one hidden
    linear layer and a linear head: about 106k parameters for 1 channel and 3 classes.
    norm: "batch" (BatchNorm) or "group" (GroupNorm, 8 groups: no running statistics and no
    coupling between the images of a batch — what per-sample DP-SGD needs; ReLUs not in place).
    Input (B, C, H, W) float, any H, W ≥ 4; output logits (B, num_classes)."""

    def __init__(self, in_chans: int = 1, num_classes: int = 2, width: int = 32, norm: str = "batch"):
        super().__init__()
        if norm not in ("batch", "group"):
            raise ValueError(f"norm must be 'batch' or 'group', got {norm!r}")
        w = width
        self.features = nn.Sequential(
            *_conv_block(in_chans, w, norm), *_conv_block(w, w, norm), nn.MaxPool2d(2),
            *_conv_block(w, 2 * w, norm), *_conv_block(2 * w, 2 * w, norm), nn.MaxPool2d(2),
            *_conv_block(2 * w, 2 * w, norm),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(2 * w, 2 * w), nn.ReLU(inplace=norm == "batch"),
        )
        self.head = nn.Linear(2 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class LeNet(nn.Module):
    """The sigmoid LeNet of the gradient-inversion literature (DLG, Zhu et al. 2019): smooth
    activations make gradients twice differentiable, the worst case for privacy.
    Input (B, C, 28, 28) (any size divisible by 4); output logits (B, num_classes)."""

    def __init__(self, in_chans: int = 1, num_classes: int = 2, image_size: int = 28):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 12, 5, padding=2, stride=2), nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, padding=2, stride=2), nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, padding=2, stride=1), nn.Sigmoid(),
            nn.Flatten(),
        )
        self.head = nn.Linear(12 * (image_size // 4) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TanhCNN(nn.Module):
    """The DP-SGD CNN of Papernot et al. 2021 ("Tempered sigmoid activations for deep learning with
    differential privacy", their MNIST model; Opacus's MNIST example): two strided convolutions
    (16 filters 8×8, 32 filters 4×4) and one hidden linear layer of 32, tanh activations, no
    normalisation — bounded activations keep clipped per-sample gradients informative, and with no
    BatchNorm or GroupNorm every image's gradient is its own. About 26k parameters (25,746 for 1
    channel and 2 classes).
    Input (B, C, H, W) float, H, W ≥ 16 (28×28 reaches the linear layer as 32×4×4 unchanged; other
    sizes are average-pooled to 4×4 there); output logits (B, num_classes)."""

    def __init__(self, in_chans: int = 1, num_classes: int = 2):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 16, 8, stride=2, padding=3), nn.Tanh(), nn.MaxPool2d(2, 1),
            nn.Conv2d(16, 32, 4, stride=2), nn.Tanh(), nn.MaxPool2d(2, 1),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(32 * 4 * 4, 32), nn.Tanh(),
        )
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model("cnn")
def _cnn(in_chans: int, num_classes: int, **kw) -> nn.Module:
    return SmallCNN(in_chans, num_classes, **kw)


@register_model("cnn_gn")
def _cnn_gn(in_chans: int, num_classes: int, **kw) -> nn.Module:
    """SmallCNN with GroupNorm instead of BatchNorm (same convolutions and parameter count):
    the ``cnn`` family's member for DP-SGD (claim 2), which needs per-sample gradients.
    It learns more slowly than the BatchNorm ``cnn`` at the start: on BreastMNIST (Adam 2e-3,
    batch 32) it predicts the majority class for ~5 central epochs (the ``cnn``: 1), and it stays
    there after 3 or 10 federated rounds whatever the lr, optimizer, groups or weight
    standardisation (results/README.md, claim 2): GroupNorm normalises each image's own feature
    maps, so at initialisation its pooled features vary ~3x less between images."""
    return SmallCNN(in_chans, num_classes, **{"norm": "group", **kw})


@register_model("cnn_tanh")
def _cnn_tanh(in_chans: int, num_classes: int, **kw) -> nn.Module:
    """:class:`TanhCNN`: claim 2's model for DP-SGD and its no-defence reference. Unlike the
    ``cnn_gn`` it learns in the task's budget (BreastMNIST, 12 rounds: ACC 0.78–0.80 against the
    majority rate 0.73; results/README.md, claim 2)."""
    return TanhCNN(in_chans, num_classes, **kw)


@register_model("cnn_small")
def _cnn_small(in_chans: int, num_classes: int, **kw) -> nn.Module:
    """SmallCNN at width 16 (~27k parameters, ~3x faster on CPU): quick-mode runs."""
    return SmallCNN(in_chans, num_classes, **{"width": 16, **kw})


@register_model("lenet")
def _lenet(in_chans: int, num_classes: int, **kw) -> nn.Module:
    return LeNet(in_chans, num_classes, **kw)


class _TimmWrapper(nn.Module):
    """Gives a timm model the ``features`` / ``head`` split the rest of medchain expects."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.features = model
        self.head = model.get_classifier()
        model.reset_classifier(0)  # the backbone now returns pooled features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


#: torch / torchvision releases seen to load together (with timm) on x86_64 Linux from PyPI.
TIMM_PAIRING = "torch==2.14.1 torchvision==0.29.1"


def _create_timm(name: str, in_chans: int, num_classes: int, **kwargs) -> nn.Module:
    try:
        import timm
    except ImportError as exc:
        raise RuntimeError(
            f"model 'timm:{name}' needs the optional timm package (pip install 'medchain[timm]'; "
            f"timm imports torchvision, which must be built for torch {torch.__version__}): {exc}"
        ) from exc
    except RuntimeError as exc:
        # timm imports torchvision; a torchvision built for another torch fails to register its
        # operators ("operator torchvision::nms does not exist") and raises RuntimeError.
        raise RuntimeError(
            f"model 'timm:{name}': timm is installed but torchvision cannot load beside torch "
            f"{torch.__version__} ({exc}). Install a matching pair, e.g. on x86_64 "
            f"`pip install {TIMM_PAIRING} timm` (a CUDA build, ~5.5 GB), or beside a CPU torch "
            f"from https://download.pytorch.org/whl/cpu the torchvision release made for that "
            f"torch, from the same index. The built-in models {list_models()} need neither."
        ) from exc
    if name not in timm.list_models():
        raise ValueError(f"timm has no model {name!r} (see timm.list_models())")
    model = timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=num_classes, **kwargs)
    return _TimmWrapper(model)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_model(name: str, in_chans: int, num_classes: int, seed: int, **kwargs) -> nn.Module:
    """create_model with weights drawn from `seed`, without touching the global torch RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model(name, in_chans, num_classes, **kwargs)

"""The centralized CNN on real BreastMNIST (../shared) must reach the published neighbourhood
(MedMNIST v2 ResNet-18@28: ACC 0.863, AUC 0.901)."""
import numpy as np
import pytest

from medchain.data.types import ImageSet
from medchain.models import build_model
from medchain.training import TrainConfig, evaluate, fit


@pytest.mark.slow
def test_centralized_cnn_on_real_breastmnist_reaches_auc_085(breastmnist_path):
    z = np.load(breastmnist_path)
    split = {s: ImageSet(z[f"{s}_images"], z[f"{s}_labels"].reshape(-1).astype(np.int64))
             for s in ("train", "val", "test")}
    model = build_model("cnn", 1, 2, seed=0)
    fit(model, split["train"], split["val"], TrainConfig(epochs=30, batch_size=32, lr=2e-3, seed=0))
    m = evaluate(model, split["test"])
    assert m["auc"] >= 0.85
    assert m["acc"] >= 0.80

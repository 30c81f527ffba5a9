"""medchain.runcache: a second identical baseline run is served from the cache and equals the
first; a changed recipe, seed, data or code version misses; MEDCHAIN_RUN_CACHE=off trains again."""
from __future__ import annotations

import math
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from medchain import runcache
from medchain.baselines import centralized, local_only
from medchain.data.types import InstitutionData
from medchain.training import TrainConfig

from conftest import toy_images


def _same(a, b) -> bool:
    """Equality of JSON-like values, NaN equal to NaN."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


@pytest.fixture
def insts():
    return [InstitutionData(i, toy_images(40, 10 * i, 12), toy_images(12, 10 * i + 1, 12),
                            toy_images(12, 10 * i + 2, 12)) for i in range(2)]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(runcache.ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


CFG = TrainConfig(epochs=2, batch_size=16, lr=2e-3, seed=0)


def _equal(a, b):
    assert _same(a.rows, b.rows)
    for fa, fb in zip(a.fits, b.fits):
        assert fa.best_epoch == fb.best_epoch and _same(fa.best_val, fb.best_val) and _same(fa.history, fb.history)
    for ma, mb in zip(a.models, b.models):
        for (k, x), y in zip(ma.state_dict().items(), mb.state_dict().values()):
            assert torch.equal(x, y), k


@pytest.mark.parametrize("baseline", [centralized, local_only])
def test_second_call_is_served_from_the_cache_and_equals_the_first(baseline, insts, cache, one_thread):
    first = baseline(insts, "cnn", 2, CFG)
    second = baseline(insts, "cnn", 2, CFG)
    assert not first.cached and second.cached
    assert len(list(cache.iterdir())) == 1
    _equal(first, second)
    assert len(second.models) == len(first.models) == (1 if baseline is centralized else 2)


def test_changed_recipe_seed_data_or_code_misses(insts, cache, one_thread, monkeypatch):
    centralized(insts, "cnn", 2, CFG)
    assert not centralized(insts, "cnn", 2, replace(CFG, lr=1e-3)).cached
    assert not centralized(insts, "cnn", 2, replace(CFG, seed=1)).cached
    other = [InstitutionData(i.index, toy_images(40, 99, 12), i.val, i.test) for i in insts]
    assert not centralized(other, "cnn", 2, CFG).cached
    assert centralized(insts, "cnn", 2, CFG).cached
    monkeypatch.setattr(runcache, "code_version", lambda: "another commit")
    assert not centralized(insts, "cnn", 2, CFG).cached
    assert len(list(cache.iterdir())) == 5


def test_off_switch_trains_again_and_stores_nothing(insts, tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv(runcache.ENV, "off")
    assert runcache.root() is None
    assert not centralized(insts, "cnn", 2, CFG).cached
    assert not centralized(insts, "cnn", 2, CFG).cached


def test_default_location_is_git_ignored(monkeypatch):
    monkeypatch.delenv(runcache.ENV, raising=False)
    path = runcache.root()
    repo = Path(runcache.__file__).resolve().parents[1]
    proc = subprocess.run(["git", "check-ignore", "-q", str(path / "x")], cwd=repo)
    assert proc.returncode == 0, f"{path} is not git-ignored"

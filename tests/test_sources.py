"""Tests for medchain.data.sources (load_dataset, save_npz, describe) and `medchain data`.

The network is never used: an autouse fixture replaces pooch's downloader by an offline one (and
makes requests refuse any connection), and points ~ at an empty temporary home.
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import types
import warnings
import zipfile

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medchain.data import (MEDMNIST_FLAGS, Dataset, ImageSet, describe, load_dataset, save_npz)
from medchain.data import sources
from medchain.data.sources import medmnist as medmnist_source

SHARED_MEDMNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist"
BREAST = SHARED_MEDMNIST / "breastmnist.npz"

needs_breast = pytest.mark.skipif(
    not BREAST.is_file(),
    reason=f"real BreastMNIST not found at {BREAST} (only in the development workspace)")


REAL_DOWNLOADER = medmnist_source._pooch_downloader


def offline_error():
    import requests

    return requests.exceptions.ConnectionError(
        "[Errno -2] Name or service not known (tests run offline)")


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Every test runs offline; `calls` records the URLs pooch tried. ~ is an empty folder, so a
    real ~/.medmnist never leaks in; no retries (their 1 s waits) unless a test asks."""
    import requests

    calls: list[str] = []

    def offline(url, output_file, pooch, check_only=False):
        calls.append(url)
        raise offline_error()

    def refuse(*a, **k):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(medmnist_source, "_pooch_downloader", lambda: offline)
    monkeypatch.setattr(requests.Session, "request", refuse)
    monkeypatch.setattr(medmnist_source, "DOWNLOAD_RETRIES", 0)
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return calls


def serve(monkeypatch, *payloads: bytes | BaseException) -> list[str]:
    """Replace the network by a local downloader answering each call with the next payload
    (bytes written to pooch's temporary file, or an exception raised); returns the URLs asked."""
    calls: list[str] = []

    def downloader(url, output_file, pooch, check_only=False):
        answer = payloads[min(len(calls), len(payloads) - 1)]
        calls.append(url)
        if isinstance(answer, BaseException):
            Path(output_file).write_bytes(b"partial")
            raise answer
        Path(output_file).write_bytes(answer)

    monkeypatch.setattr(medmnist_source, "_pooch_downloader", lambda: downloader)
    return calls


def fake_breast_bytes(tmp_path: Path) -> bytes:
    """A valid file in BreastMNIST's layout (28×28 grey, 2 classes) made here, so that the
    download tests run without the real data."""
    rng = np.random.default_rng(0)
    arrays = {}
    for s, m in (("train", 12), ("val", 4), ("test", 6)):
        arrays[f"{s}_images"] = rng.integers(0, 256, (m, 28, 28), dtype=np.uint8)
        arrays[f"{s}_labels"] = (np.arange(m) % 2).astype(np.uint8).reshape(m, 1)
    path = tmp_path / "fake_breast.npz"
    np.savez_compressed(path, **arrays)
    return path.read_bytes()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    d.mkdir()
    monkeypatch.setenv("MEDCHAIN_DATA", str(d))
    return d


def breast_in_cache(cache: Path) -> Path:
    dest = cache / "breastmnist.npz"
    shutil.copyfile(BREAST, dest)
    return dest


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def make_ds(n=(20, 6, 8), k=3, rgb=False, sites=False, seed=0) -> Dataset:
    rng = np.random.default_rng(seed)
    parts = []
    for m in n:
        shape = (m, 8, 8, 3) if rgb else (m, 8, 8)
        parts.append(ImageSet(rng.integers(0, 256, shape, dtype=np.uint8),
                              np.arange(m, dtype=np.int64) % k,
                              (np.arange(m, dtype=np.int64) % 2 + 3) if sites else None))
    return Dataset("toy", *parts, n_classes=k, class_names=[f"class {i}" for i in range(k)],
                   source="test")


def good_arrays(n=(6, 3, 3)) -> dict[str, np.ndarray]:
    out = {}
    for s, m in zip(("train", "val", "test"), n):
        out[f"{s}_images"] = np.zeros((m, 5, 5), np.uint8)
        out[f"{s}_labels"] = (np.arange(m) % 2).astype(np.uint8).reshape(m, 1)
    return out


# ----------------------------------------------------------------------------- MedMNIST table
def test_medmnist_table():
    for flag in ("pneumoniamnist", "breastmnist", "dermamnist", "bloodmnist", "organamnist",
                 "organcmnist", "organsmnist", "octmnist", "retinamnist", "pathmnist",
                 "tissuemnist"):
        assert flag in MEDMNIST_FLAGS
        info = sources.MEDMNIST_INFO[flag]
        assert len(info["md5"]) == 32 and int(info["md5"], 16) >= 0
        assert info["url"] == f"https://zenodo.org/records/10519652/files/{flag}.npz?download=1"
    assert "chestmnist" not in MEDMNIST_FLAGS
    assert sources.MEDMNIST_INFO["breastmnist"]["md5"] == "750601b1f35ba3300ea97c75c52ff8f6"
    assert len(sources.MEDMNIST_INFO["pathmnist"]["label"]) == 9


# ----------------------------------------------------------------------------- cache and download
@needs_breast
def test_flag_from_cache_with_matching_md5_uses_no_network(cache, monkeypatch, no_network):
    dest = breast_in_cache(cache)
    monkeypatch.setitem(sources.MEDMNIST_INFO["breastmnist"], "md5", md5(dest))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_dataset("breastmnist")
    assert no_network == []
    assert (len(ds.train), len(ds.val), len(ds.test)) == (546, 78, 156)
    assert ds.n_classes == 2 and ds.class_names == ["malignant", "normal, benign"]
    assert ds.source == "medmnist:breastmnist" and ds.image_shape == (28, 28)
    assert ds.train.labels.dtype == np.int64 and ds.train.labels.shape == (546,)
    assert ds.train.images.dtype == np.uint8 and ds.train.site is None
    same = load_dataset("medmnist:BreastMNIST", cache_dir=cache)
    assert np.array_equal(same.test.images, ds.test.images)


@needs_breast
def test_cached_copy_with_other_md5_loads_with_a_warning(cache, no_network):
    breast_in_cache(cache)  # this copy was re-saved: its MD5 is not the official one
    with pytest.warns(UserWarning, match="MD5 differs from the official"):
        ds = load_dataset("breastmnist")
    assert len(ds.train) == 546 and no_network == []


@needs_breast
def test_truncated_cached_file_is_reported_corrupt(cache, no_network):
    (cache / "breastmnist.npz").write_bytes(BREAST.read_bytes()[:100_000])
    with pytest.raises(ValueError, match=r"(?s)is corrupt.*Delete it.*MEDCHAIN_DATA"):
        load_dataset("breastmnist")
    assert no_network == []


def test_empty_cache_offline_fails_fast_with_instructions(cache, no_network):
    with pytest.raises(ConnectionError) as err:
        load_dataset("pneumoniamnist")
    msg = str(err.value)
    info = sources.MEDMNIST_INFO["pneumoniamnist"]
    for phrase in (info["url"], "pneumoniamnist.npz", info["md5"], str(cache), "MEDCHAIN_DATA",
                   "offline"):
        assert phrase in msg
    assert no_network == [info["url"]]
    assert list(cache.iterdir()) == []  # nothing partial left behind


def test_no_download_raises_file_not_found(cache, no_network):
    with pytest.raises(FileNotFoundError, match=r"(?s)download=False.*zenodo"):
        load_dataset("octmnist", download=False)
    assert no_network == []


def test_download_goes_through_pooch_with_md5_progress_and_no_partial_file(cache, monkeypatch,
                                                                             tmp_path):
    data = fake_breast_bytes(tmp_path)
    monkeypatch.setitem(sources.MEDMNIST_INFO["breastmnist"], "md5",
                        hashlib.md5(data).hexdigest())
    got = serve(monkeypatch, data)
    ds = load_dataset("breastmnist")
    assert (len(ds.train), len(ds.val), len(ds.test)) == (12, 4, 6)
    assert got == [sources.MEDMNIST_INFO["breastmnist"]["url"]]
    assert [p.name for p in cache.iterdir()] == ["breastmnist.npz"]
    load_dataset("breastmnist")  # second time: from the cache
    assert len(got) == 1


def test_real_downloader_has_a_progress_bar_and_a_timeout():
    pooch = pytest.importorskip("pooch")
    d = REAL_DOWNLOADER()
    assert isinstance(d, pooch.HTTPDownloader)
    assert d.progressbar is True and d.kwargs["timeout"] == medmnist_source.DOWNLOAD_TIMEOUT_S


def test_download_retries_after_a_network_error(cache, monkeypatch, tmp_path):
    data = fake_breast_bytes(tmp_path)
    monkeypatch.setitem(sources.MEDMNIST_INFO["breastmnist"], "md5",
                        hashlib.md5(data).hexdigest())
    monkeypatch.setattr(medmnist_source, "DOWNLOAD_RETRIES", 1)  # pooch waits 1 s before the retry
    got = serve(monkeypatch, offline_error(), data)
    assert len(load_dataset("breastmnist").test) == 6
    assert len(got) == 2
    assert [p.name for p in cache.iterdir()] == ["breastmnist.npz"]


def test_download_with_wrong_md5_is_discarded(cache, monkeypatch):
    got = serve(monkeypatch, b"not the data set")
    with pytest.raises(RuntimeError, match="failed its MD5 check after 1 attempt.*expected md5:"
                                           "750601b1f35ba3300ea97c75c52ff8f6"):
        load_dataset("breastmnist")
    assert list(cache.iterdir()) == [] and len(got) == 1


def test_download_broken_mid_transfer_leaves_nothing(cache, monkeypatch):
    import requests

    serve(monkeypatch, requests.exceptions.ChunkedEncodingError("connection reset by peer"))
    with pytest.raises(ConnectionError, match=r"(?s)connection reset.*breastmnist\.npz"):
        load_dataset("breastmnist")
    assert list(cache.iterdir()) == []


def test_medmnist_package_cache_is_used_in_place(cache, monkeypatch, tmp_path, no_network):
    data = fake_breast_bytes(tmp_path)
    monkeypatch.setitem(sources.MEDMNIST_INFO["breastmnist"], "md5",
                        hashlib.md5(data).hexdigest())
    pkg = Path.home() / ".medmnist"
    assert sources.medmnist_package_dir() == pkg and str(tmp_path) in str(pkg)
    pkg.mkdir()
    (pkg / "breastmnist.npz").write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_dataset("breastmnist")
    assert len(ds.train) == 12 and no_network == [] and list(cache.iterdir()) == []
    # the data cache comes first when it has the file
    other = make_ds(n=(5, 2, 3), k=2)
    other.train.images = np.zeros((5, 28, 28), np.uint8)
    other.val.images = np.zeros((2, 28, 28), np.uint8)
    other.test.images = np.zeros((3, 28, 28), np.uint8)
    save_npz(other, cache / "breastmnist.npz")
    with pytest.warns(UserWarning, match="MD5 differs"):
        assert len(load_dataset("breastmnist").train) == 5


def test_offline_message_names_both_places(cache, no_network):
    with pytest.raises(FileNotFoundError, match=r"(?s)neither in the data cache.*\.medmnist"
                                                r"/octmnist\.npz.*download=False"):
        load_dataset("octmnist", download=False)
    with pytest.raises(ConnectionError, match=r"(?s)offline.*~/.medmnist"):
        load_dataset("octmnist")
    assert list(cache.iterdir()) == []


def test_each_source_is_registered_once(monkeypatch, tmp_path):
    """The four sources sit behind the registry; a name cannot be taken twice, and a registered
    loader is the one load_dataset calls for its kind."""
    from medchain.data.sources import list_sources, register_source
    from medchain.data.sources.registry import SOURCES

    assert list_sources() == ["folder", "medmnist", "npz", "simulated"]
    with pytest.raises(ValueError, match="data source 'npz' is already registered"):
        register_source("npz")(lambda spec, **kw: None)
    seen = []
    monkeypatch.setitem(SOURCES._items, "npz", lambda spec, **kw: seen.append((spec, kw)) or "ds")
    f = tmp_path / "x.npz"
    f.write_bytes(b"")
    assert load_dataset(f, image_size=32) == "ds"
    assert seen == [(str(f), dict(cache_dir=None, download=True, image_size=32))]


@pytest.mark.parametrize("source, exc, phrase", [
    ("chestmnist", ValueError, "multi-label"),
    ("medmnist:chestmnist", ValueError, "multi-label"),
    ("organmnist3d", ValueError, "3D"),
    ("medmnist:fakemnist", ValueError, "unknown MedMNIST flag"),
    ("no-such-source", ValueError, "unknown data source"),
    ("missing/file.npz", FileNotFoundError, "not found"),
    ("", ValueError, "non-empty"),
])
def test_bad_sources(source, exc, phrase, cache):
    with pytest.raises(exc, match=phrase):
        load_dataset(source)


def test_medmnist_only_at_28(cache):
    with pytest.raises(ValueError, match="28"):
        load_dataset("breastmnist", image_size=64)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDCHAIN_DATA", str(tmp_path / "x"))
    assert sources.default_cache_dir() == tmp_path / "x"
    assert sources.medmnist_path("dermamnist") == tmp_path / "x" / "dermamnist.npz"
    monkeypatch.delenv("MEDCHAIN_DATA")
    import medchain

    repo = Path(medchain.__file__).resolve().parents[1]  # the checkout that holds the package
    if (repo / "pyproject.toml").is_file():
        assert sources.default_cache_dir() == repo / "data"


# ----------------------------------------------------------------------------- local npz
@needs_breast
def test_local_npz_path_keeps_1d_labels_and_official_names():
    ds = load_dataset(BREAST)
    assert ds.n_classes == 2 and ds.class_names[0] == "malignant"
    assert ds.name == "breastmnist" and ds.source == str(BREAST.resolve())


@pytest.mark.parametrize("rgb, sites", [(False, False), (True, True)])
def test_save_npz_round_trip(tmp_path, rgb, sites):
    ds = make_ds(rgb=rgb, sites=sites)
    out = save_npz(ds, tmp_path / "sub" / "toy")  # suffix added, folder created
    assert out == tmp_path / "sub" / "toy.npz"
    assert [p.name for p in out.parent.iterdir()] == ["toy.npz"]
    back = load_dataset(out)
    for s in ("train", "val", "test"):
        a, b = getattr(ds, s), getattr(back, s)
        assert np.array_equal(a.images, b.images) and a.images.dtype == b.images.dtype
        assert np.array_equal(a.labels, b.labels) and b.labels.dtype == np.int64
        if sites:
            assert np.array_equal(a.site, b.site) and b.site.dtype == np.int64
        else:
            assert b.site is None
    assert (back.n_classes, back.class_names, back.name) == (3, ds.class_names, "toy")
    assert back.n_channels == (3 if rgb else 1)


def test_save_npz_keeps_n_classes_beyond_max_label(tmp_path):
    ds = make_ds(k=2)
    ds.n_classes, ds.class_names = 4, ["a", "b", "c", "d"]
    with pytest.warns(UserWarning, match="2 of 4 classes have no images"):
        assert load_dataset(save_npz(ds, tmp_path / "x.npz")).n_classes == 4


def test_npz_accepts_column_labels_and_single_channel_axis(tmp_path):
    arr = good_arrays()
    arr["train_images"] = arr["train_images"][..., None]  # (N, H, W, 1) -> (N, H, W)
    arr["val_labels"] = arr["val_labels"].astype(np.float32)  # integral floats are fine
    np.savez(tmp_path / "d.npz", **arr)
    ds = load_dataset(tmp_path / "d.npz")
    assert ds.train.images.shape == (6, 5, 5) and ds.val.labels.dtype == np.int64
    assert ds.n_classes == 2 and ds.class_names == ["0", "1"]


def _bad(mutate):
    def build(path: Path):
        arr = good_arrays()
        mutate(arr)
        np.savez(path, **arr)
    return build


def _write_bytes(data: bytes):
    return lambda path: path.write_bytes(data)


def _truncated(path: Path):
    _bad(lambda a: None)(path)
    path.write_bytes(path.read_bytes()[:300])


def _pickled(path: Path):
    arr = good_arrays()
    arr["train_labels"] = np.array([{"a": 1}] * 6, dtype=object)
    np.savez(path, **arr)


def _single_npy(path: Path):
    with open(path, "wb") as f:
        np.save(f, np.zeros((3, 5, 5), np.uint8))


def _bad_zip_member(path: Path):
    _bad(lambda a: None)(path)
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("extra.npy", b"garbage")


@pytest.mark.parametrize("build, phrase", [
    (_truncated, "corrupt, truncated"),
    (_write_bytes(b"hello, not a zip file at all"), "cannot read it as an .npz"),
    (_pickled, "pickled"),
    (_single_npy, "single array"),
    (_bad_zip_member, r"member\(s\) extra of the archive are not .npy arrays"),
    (_bad(lambda a: a.pop("val_labels")), "missing key.*val_labels"),
    (_bad(lambda a: a.update(train_images=np.zeros((6, 5, 5), np.float32))),
     r"must be uint8, got dtype float32.*astype\(np.uint8\)"),
    (_bad(lambda a: a.update(train_images=np.zeros((6, 5, 5), np.int16))), "must be uint8"),
    (_bad(lambda a: a.update(train_images=np.zeros((6, 5, 5, 2), np.uint8))),
     r"shape \(N, H, W\).*\(6, 5, 5, 2\)"),
    (_bad(lambda a: a.update(train_images=np.zeros((6, 25), np.uint8))), "must have shape"),
    (_bad(lambda a: a.update(test_images=np.zeros((3, 6, 6), np.uint8))), "differ in shape"),
    (_bad(lambda a: a.update(train_labels=np.zeros(5, np.int64))), "6 images but 5 labels"),
    (_bad(lambda a: a.update(train_labels=np.array([0, 1, 0.5, 1, 0, 1]))), "non-integer"),
    (_bad(lambda a: a.update(train_labels=np.array([0, 1, -1, 1, 0, 1]))), "non-negative"),
    (_bad(lambda a: a.update(train_labels=np.array(["a"] * 6))), "must be integers"),
    (_bad(lambda a: a.update(train_labels=np.zeros((6, 3), np.uint8))), "multi-label"),
    (_bad(lambda a: a.update(n_classes=np.int64(2), test_labels=np.array([0, 1, 2]))),
     "label 2, out of range for n_classes=2"),
    (_bad(lambda a: a.update(class_names=np.array(["a", "b", "c"]))), "class_names"),
    (_bad(lambda a: a.update(train_site=np.zeros(6, np.int64))), "all splits or none"),
    (_bad(lambda a: a.update(**{f"{s}_images": np.zeros((0, 5, 5), np.uint8) for s in
                                ("train", "val", "test")},
                             **{f"{s}_labels": np.zeros(0, np.int64) for s in
                                ("train", "val", "test")})), "empty"),
    (_bad(lambda a: a.update(val_images=np.zeros((0, 5, 5), np.uint8),
                             val_labels=np.zeros(0, np.int64))), "the val split is empty"),
])
def test_bad_npz_files(tmp_path, build, phrase):
    path = tmp_path / "bad.npz"
    build(path)
    with pytest.raises(ValueError, match=phrase) as err:
        load_dataset(path)
    assert str(path) in str(err.value)


def test_save_npz_refuses_invalid_data(tmp_path):
    ds = make_ds()
    ds.train.images = ds.train.images.astype(np.float32)
    with pytest.raises(ValueError, match="uint8"):
        save_npz(ds, tmp_path / "x.npz")
    assert not (tmp_path / "x.npz").exists()


# ----------------------------------------------------------------------------- image folders
def _png(path: Path, value: int = 128, size=(40, 30), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "RGB":
        Image.new("RGB", size, (value, 255 - value, 20)).save(path)
    elif mode == "I;16":
        Image.fromarray(np.full(size[::-1], value * 257, np.uint16)).save(path)
    else:
        Image.new(mode, size, value).save(path)


def _class_folder(root: Path, counts: dict[str, int], mode="L"):
    for cls, n in counts.items():
        for i in range(n):
            _png(root / cls / f"img{i}.png", value=10 * i % 250, mode=mode)


def test_folder_without_splits_is_split_70_10_20_stratified(tmp_path):
    _class_folder(tmp_path / "imgs", {"benign": 20, "malignant": 10})
    ds = load_dataset(tmp_path / "imgs", image_size=16)
    assert ds.class_names == ["benign", "malignant"] and ds.n_classes == 2
    assert ds.image_shape == (16, 16) and ds.n_channels == 1
    assert [np.bincount(getattr(ds, s).labels).tolist() for s in ("train", "val", "test")] \
        == [[14, 7], [2, 1], [4, 2]]
    again = load_dataset(tmp_path / "imgs", image_size=16)
    assert np.array_equal(ds.test.images, again.test.images)
    assert ds.source == str((tmp_path / "imgs").resolve()) and ds.name == "imgs"


def test_folder_with_split_level_and_colour(tmp_path):
    root = tmp_path / "own"
    for s, n in (("train", 3), ("val", 1), ("test", 2)):
        _class_folder(root / s, {"a": n, "b": n})
    _png(root / "train" / "b" / "colour.jpg", value=200, mode="RGB")
    (root / "train" / "a" / "notes.txt").write_text("ignored")
    ds = load_dataset(root)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (7, 2, 4)
    assert ds.image_shape == (28, 28, 3)  # one colour image makes the whole set RGB
    grey = ds.test.images
    assert (grey[..., 0] == grey[..., 1]).all()


def test_folder_grey_saved_as_rgb_and_16_bit_stay_grey(tmp_path):
    root = tmp_path / "f"
    _png(root / "x" / "a.png", value=100, mode="L")
    _png(root / "x" / "b.png", value=100, mode="I;16")
    Image.new("RGB", (20, 20), (50, 50, 50)).save(root / "x" / "c.png")
    for i in range(7):
        _png(root / "y" / f"{i}.png", value=30)
    ds = load_dataset(root)
    assert ds.n_channels == 1
    allimg = np.concatenate([ds.train.images, ds.val.images, ds.test.images])
    assert set(np.unique(allimg)) <= {30, 50, 100}


@pytest.mark.parametrize("setup, phrase", [
    (lambda r: (r / "a").mkdir(parents=True), "empty class folder"),
    (lambda r: (r / "a").mkdir(parents=True) or (r / "a" / "x.png").write_bytes(b"no png"),
     "cannot read image"),
    (lambda r: r.mkdir(), "no class sub-folders"),
    (lambda r: [_class_folder(r / s, {"a": 2}) for s in ("train", "test")], "not val"),
    (lambda r: _class_folder(r, {"a": 2, "b": 1}), "too few"),
])
def test_bad_folders(tmp_path, setup, phrase):
    root = tmp_path / "root"
    setup(root)
    if phrase == "empty class folder":
        _class_folder(root, {"b": 10})
    with pytest.raises(ValueError, match=phrase):
        load_dataset(root)


# ----------------------------------------------------------------------------- bounded resources
def _npz(tmp_path, name="d.npz", **changes) -> Path:
    arrays = good_arrays()
    arrays.update(changes)
    np.savez(tmp_path / name, **arrays)
    return tmp_path / name


@pytest.mark.parametrize("key, extra", [("labels", {}), ("n_classes", {})])
def test_huge_class_count_fails_fast_from_a_memory_estimate(tmp_path, key, extra):
    import time

    from medchain.data.limits import ResourceLimitError

    if key == "labels":
        labels = (np.arange(3) % 2).astype(np.int64)
        labels[0] = 10**9
        path = _npz(tmp_path, test_labels=labels)
        phrase = r"1,000,000,001 classes \(largest label 1000000000, no n_classes"
    else:
        path = _npz(tmp_path, n_classes=np.int64(10**9))
        phrase = r"1,000,000,000 classes \(n_classes = 1000000000 in the file"
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=phrase + r".*TB of memory.*remap") as err:
        load_dataset(path)
    assert time.perf_counter() - t0 < 2.0  # an estimate, not 5.5 GB of class names
    assert isinstance(err.value, ResourceLimitError) and isinstance(err.value, MemoryError)


def test_class_count_limit_follows_the_available_memory(tmp_path, monkeypatch):
    from medchain.data import limits

    path = _npz(tmp_path, n_classes=np.int64(50))
    with pytest.warns(UserWarning, match="48 of 50 classes have no images"):
        assert load_dataset(path).n_classes == 50  # 50 classes: about 0.4 MB, fits anywhere
    need = limits.class_count_bytes(50, 6)
    monkeypatch.setattr(limits, "available_memory", lambda: int(need / limits.MEMORY_FRACTION) - 1)
    with pytest.raises(MemoryError, match="50 classes"):
        load_dataset(path)
    assert "GB" in limits.format_bytes(2.5e9) and limits.available_memory() > 0


def test_partition_refuses_a_huge_label_before_allocating():
    from medchain.data import partition_indices

    with pytest.raises(MemoryError, match="largest label 1000000000"):
        partition_indices(np.array([0, 1, 10**9]), 2, "iid")


@pytest.mark.parametrize("side, ok", [(1, False), (3, False), (4, True), (28, True)])
def test_images_smaller_than_the_models_minimum_are_refused(tmp_path, side, ok):
    arrays = {f"{s}_images": np.zeros((m, side, side), np.uint8)
              for s, m in zip(("train", "val", "test"), (6, 3, 3))}
    path = _npz(tmp_path, **arrays)
    if ok:
        assert load_dataset(path).image_shape == (side, side)
    else:
        with pytest.raises(ValueError, match=rf"{side}×{side} pixels, too small.*minimum is 4×4"):
            load_dataset(path)
    with pytest.raises(ValueError, match="image_size must be an integer >= 4"):
        load_dataset("simulated", image_size=2)


def test_class_missing_from_training_split_is_an_error(tmp_path):
    test_labels = np.array([0, 1, 2])
    with pytest.raises(ValueError, match=r"class\(es\) 2 have no training images but appear in "
                                         r"val/test \(class 2: 0 val and 1 test\)"):
        load_dataset(_npz(tmp_path, test_labels=test_labels))
    names = np.array(["a", "b", "c"])
    with pytest.raises(ValueError, match="2 \\('c'\\) have no training images"):
        load_dataset(_npz(tmp_path, "n.npz", test_labels=test_labels, class_names=names))
    # a declared class that no split holds only warns (n_classes may describe a larger set)
    with pytest.warns(UserWarning, match=r"2 of 4 classes have no images in any split: 2, 3"):
        assert load_dataset(_npz(tmp_path, "w.npz", n_classes=np.int64(4))).n_classes == 4


def test_folder_class_only_in_test_is_an_error(tmp_path):
    root = tmp_path / "own"
    for s in ("train", "val", "test"):
        _class_folder(root / s, {"a": 2, "b": 2})
    _class_folder(root / "test", {"c": 2})
    with pytest.raises(ValueError, match=r"2 \('c'\) have no training images"):
        load_dataset(root)


def test_cli_simulate_refuses_a_huge_n_at_once(tmp_path):
    import time

    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"n=1,000,000,000,000.*PB of memory"):
        _cli(["data", "simulate", "--n", str(10**12), "--out", str(tmp_path / "x.npz"), "--quiet"])
    assert time.perf_counter() - t0 < 5.0 and not (tmp_path / "x.npz").exists()


# ----------------------------------------------------------------------------- provenance
def test_provenance_of_an_npz_file(tmp_path):
    import json

    from medchain.data import data_provenance

    path = save_npz(make_ds(sites=True), tmp_path / "toy.npz")
    ds = load_dataset(path)
    p = data_provenance(ds)
    assert p["kind"] == "npz" and p["file"] == str(path.resolve()) and p["sha256_of"] == "file"
    assert p["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert p["md5"] == md5(path) and "official_md5" not in p
    assert p["n"] == {"train": 20, "val": 6, "test": 8} and p["n_total"] == 34
    assert p["n_classes"] == 3 and p["image_shape"] == [8, 8] and p["n_channels"] == 1
    assert p["n_sites"] == 2 and p["class_names"] == ["class 0", "class 1", "class 2"]
    assert json.loads(json.dumps(p)) == p
    # the content hash follows the arrays, not the file: an in-memory copy has the same one
    mem = Dataset("m", ds.train, ds.val, ds.test, 3)
    q = data_provenance(mem)
    assert q["kind"] == "in-memory" and q["sha256"] is None and q["file"] is None
    assert q["content_sha256"] == p["content_sha256"]
    mem.test.labels = mem.test.labels.copy()
    mem.test.labels[0] = (mem.test.labels[0] + 1) % 3
    assert data_provenance(mem)["content_sha256"] != p["content_sha256"]


def test_provenance_of_a_download_and_of_the_package_cache(cache, monkeypatch, tmp_path):
    from medchain.data import data_provenance

    data = fake_breast_bytes(tmp_path)
    monkeypatch.setitem(sources.MEDMNIST_INFO["breastmnist"], "md5",
                        hashlib.md5(data).hexdigest())
    serve(monkeypatch, data)
    p = data_provenance(load_dataset("breastmnist"))
    assert p["kind"] == "medmnist" and p["flag"] == "breastmnist" and p["downloaded"] is True
    assert p["official_md5"] is True and p["sha256"] == hashlib.sha256(data).hexdigest()
    assert p["file"] == str((cache / "breastmnist.npz").resolve())
    assert data_provenance(load_dataset("breastmnist"))["downloaded"] is False
    (cache / "breastmnist.npz").unlink()
    pkg = sources.medmnist_package_dir()
    pkg.mkdir()
    (pkg / "breastmnist.npz").write_bytes(data)
    p = data_provenance(load_dataset("breastmnist"))
    assert p["file"] == str((pkg / "breastmnist.npz").resolve()) and p["downloaded"] is False


@needs_breast
def test_provenance_says_whether_a_medmnist_named_file_is_official():
    from medchain.data import data_provenance

    p = data_provenance(load_dataset(BREAST))  # the shared copy was re-saved
    assert p["official_md5"] is (md5(BREAST) == sources.MEDMNIST_INFO["breastmnist"]["md5"])


def test_provenance_of_a_folder_follows_its_files(tmp_path):
    from medchain.data import data_provenance

    _class_folder(tmp_path / "imgs", {"a": 10, "b": 10})
    p = data_provenance(load_dataset(tmp_path / "imgs", image_size=8))
    assert p["kind"] == "folder" and p["n_files"] == 20 and p["image_size"] == 8
    assert p["sha256_of"].startswith("folder")
    assert data_provenance(load_dataset(tmp_path / "imgs", image_size=8))["sha256"] == p["sha256"]
    _png(tmp_path / "imgs" / "a" / "img3.png", value=77)
    assert data_provenance(load_dataset(tmp_path / "imgs", image_size=8))["sha256"] != p["sha256"]


# ----------------------------------------------------------------------------- describe
def test_describe_counts():
    ds = make_ds(sites=True)
    df = describe(ds)
    assert list(df.columns) == ["class", "train", "val", "test", "total"]
    assert df["class"].tolist() == ["class 0", "class 1", "class 2"]
    assert df["total"].sum() == 34 and df.loc[0, "train"] == 7
    by_site = describe(ds, by="site")
    assert by_site.index.tolist() == [3, 4] and by_site["total"].sum() == 34
    with pytest.raises(ValueError, match="no site ids"):
        describe(make_ds(), by="site")


# ----------------------------------------------------------------------------- simulated
@pytest.fixture
def fake_simulator(monkeypatch):
    calls = []

    def simulate_ct(n=10000, sites=5, seed=0, *, size=28, site_offset=0, class_probs=None,
                    split=(0.7, 0.1, 0.2), progress=False):
        calls.append(dict(n=n, sites=sites, seed=seed, size=size, site_offset=site_offset,
                          class_probs=class_probs, split=split, progress=progress))
        ds = make_ds(sites=True)
        ds.source = ""
        return ds

    mod = types.ModuleType("medchain.data.simulate")
    mod.simulate_ct = simulate_ct
    monkeypatch.setitem(sys.modules, "medchain.data.simulate", mod)
    return calls


def test_simulated_source_options(fake_simulator):
    ds = load_dataset("simulated:n=2000, sites=4,seed=3,site-offset=5,split=0.6/0.2/0.2",
                      image_size=32)
    assert fake_simulator[-1] == dict(n=2000, sites=4, seed=3, size=32, site_offset=5,
                                      class_probs=None, split=(0.6, 0.2, 0.2), progress=False)
    assert ds.source.startswith("simulated:n=2000")
    load_dataset("simulated")
    assert fake_simulator[-1]["n"] == 10000 and fake_simulator[-1]["size"] == 28
    with pytest.raises(ValueError, match="unknown option.*colour"):
        load_dataset("simulated:colour=1")
    with pytest.raises(ValueError, match="k=v pairs"):
        load_dataset("simulated:n")
    with pytest.raises(ValueError, match="given twice"):
        load_dataset("simulated:n=1,n=2")


def test_simulated_source_real_simulator():
    pytest.importorskip("medchain.data.simulate")
    ds = load_dataset("simulated:n=60,sites=2,seed=1")
    assert ds.train.site is not None and ds.n_classes == 3
    assert len(ds.train) + len(ds.val) + len(ds.test) == 60


# ----------------------------------------------------------------------------- CLI
def _cli(argv):
    from medchain.cli import data as cli_data

    parser = argparse.ArgumentParser(prog="medchain")
    cli_data.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_info_and_simulate(tmp_path, capsys, fake_simulator):
    path = save_npz(make_ds(sites=True), tmp_path / "toy.npz")
    assert _cli(["data", "info", str(path)]) == 0
    out = capsys.readouterr().out
    for phrase in ("n_classes:  3", "8x8 uint8, 1 channel", "class 2", str(path.resolve()), "site"):
        assert phrase in out
    assert _cli(["data", "simulate", "--n", "50", "--sites", "2", "--seed", "7",
                 "--site-offset", "3", "--out", str(tmp_path / "sim.npz"), "--quiet"]) == 0
    assert fake_simulator[-1]["n"] == 50 and fake_simulator[-1]["site_offset"] == 3
    assert "wrote" in capsys.readouterr().out
    assert load_dataset(tmp_path / "sim.npz").train.site is not None


def test_cli_info_offline_error_is_clear(cache):
    with pytest.raises(ConnectionError, match="MEDCHAIN_DATA"):
        _cli(["data", "info", "dermamnist"])
    with pytest.raises(FileNotFoundError, match="download=False"):
        _cli(["data", "info", "dermamnist", "--no-download"])


def test_importing_medchain_data_does_not_import_the_simulator():
    import subprocess

    code = ("import sys, medchain.data as d; "
            "assert 'medchain.data.simulate' not in sys.modules; "
            "assert 'simulate_ct' in d.__all__; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=60)
    assert out.stdout.strip() == "ok", out.stderr

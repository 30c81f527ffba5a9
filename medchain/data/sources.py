"""Where image data come from: one entry point, :func:`load_dataset`.

Sources (the ``source`` string):

``"simulated"`` / ``"simulated:n=2000,sites=5,seed=0"``
    medchain's own simulated chest-CT nodule data set (:func:`medchain.data.simulate.simulate_ct`);
    ``k=v`` options are passed to it (numbers as numbers; tuples as ``split=0.7/0.1/0.2``;
    ``class_probs=0.4/0.3/0.3`` is one label mix used at every site).
``"pneumoniamnist"`` / ``"medmnist:pneumoniamnist"``
    a MedMNIST v2/v3 2D set at 28×28 (:data:`MEDMNIST_FLAGS`): read from the data cache
    (:func:`default_cache_dir`), else from the medmnist package's own cache (``~/.medmnist``),
    else downloaded once (with ``pooch``: MD5-verified, progress bar, retries) from its official
    Zenodo record into the data cache.
a path to a ``.npz`` file
    the MedMNIST layout: ``train_images, train_labels, val_images, val_labels, test_images,
    test_labels`` and optional ``train_site, val_site, test_site`` (written by :func:`save_npz`).
a path to a folder of images
    one sub-folder per class (PNG/JPEG), optionally below ``train/ val/ test/`` folders.

Every source is validated strictly; a problem raises :class:`ValueError` (or
:class:`FileNotFoundError` / :class:`ConnectionError` / :class:`RuntimeError`) whose message names
the file and says how to fix it.
"""
from __future__ import annotations

import hashlib
import inspect
import os
import re
import secrets
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .limits import MIN_IMAGE_SIDE, check_class_count
from .types import Dataset, ImageSet

__all__ = [
    "MEDMNIST_FLAGS",
    "MEDMNIST_INFO",
    "SPLITS",
    "default_cache_dir",
    "describe",
    "load_dataset",
    "medmnist_package_dir",
    "medmnist_path",
    "save_npz",
]

SPLITS = ("train", "val", "test")

#: Environment variable naming the data cache folder.
ENV_CACHE = "MEDCHAIN_DATA"

#: Seconds to wait for the network before giving up on a download.
DOWNLOAD_TIMEOUT_S = 15.0

#: Further download attempts after a failed one (network error or MD5 mismatch; pooch waits
#: 1 s, 2 s, ... between them).
DOWNLOAD_RETRIES = 2

# --------------------------------------------------------------------------------------------
# MedMNIST 2D sets at 28×28, copied from medmnist 3.0.2 (medmnist/info.py: INFO[flag]:
# python_class, url, MD5, label, n_channels, n_samples, task, license). medchain does not depend
# on the medmnist package. The files are the official record https://zenodo.org/records/10519652
# (MedMNIST v2, Yang et al., Scientific Data 2023; each set carries its source's licence).
# --------------------------------------------------------------------------------------------
_ZENODO = "https://zenodo.org/records/10519652/files/{flag}.npz?download=1"

MEDMNIST_INFO: dict[str, dict[str, Any]] = {
    "pathmnist": dict(
        python_class="PathMNIST", md5="a8b06965200029087d5bd730944a56c1", task="multi-class",
        n_channels=3, n_samples=dict(train=89996, val=10004, test=7180), license="CC BY 4.0",
        label=["adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
               "normal colon mucosa", "cancer-associated stroma",
               "colorectal adenocarcinoma epithelium"]),
    "chestmnist": dict(
        python_class="ChestMNIST", md5="02c8a6516a18b556561a56cbdd36c4a8",
        task="multi-label, binary-class", n_channels=1,
        n_samples=dict(train=78468, val=11219, test=22433), license="CC BY 4.0",
        label=["atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule",
               "pneumonia", "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis",
               "pleural", "hernia"]),
    "dermamnist": dict(
        python_class="DermaMNIST", md5="0744692d530f8e62ec473284d019b0c7", task="multi-class",
        n_channels=3, n_samples=dict(train=7007, val=1003, test=2005), license="CC BY-NC 4.0",
        label=["actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
               "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
               "vascular lesions"]),
    "octmnist": dict(
        python_class="OCTMNIST", md5="c68d92d5b585d8d81f7112f81e2d0842", task="multi-class",
        n_channels=1, n_samples=dict(train=97477, val=10832, test=1000), license="CC BY 4.0",
        label=["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"]),
    "pneumoniamnist": dict(
        python_class="PneumoniaMNIST", md5="28209eda62fecd6e6a2d98b1501bb15f",
        task="binary-class", n_channels=1, n_samples=dict(train=4708, val=524, test=624),
        license="CC BY 4.0", label=["normal", "pneumonia"]),
    "retinamnist": dict(
        python_class="RetinaMNIST", md5="bd4c0672f1bba3e3a89f0e4e876791e4",
        task="ordinal-regression", n_channels=3, n_samples=dict(train=1080, val=120, test=400),
        license="CC BY 4.0", label=["0", "1", "2", "3", "4"]),
    "breastmnist": dict(
        python_class="BreastMNIST", md5="750601b1f35ba3300ea97c75c52ff8f6",
        task="binary-class", n_channels=1, n_samples=dict(train=546, val=78, test=156),
        license="CC BY 4.0", label=["malignant", "normal, benign"]),
    "bloodmnist": dict(
        python_class="BloodMNIST", md5="7053d0359d879ad8a5505303e11de1dc", task="multi-class",
        n_channels=3, n_samples=dict(train=11959, val=1712, test=3421), license="CC BY 4.0",
        label=["basophil", "eosinophil", "erythroblast",
               "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
               "lymphocyte", "monocyte", "neutrophil", "platelet"]),
    "tissuemnist": dict(
        python_class="TissueMNIST", md5="ebe78ee8b05294063de985d821c1c34b", task="multi-class",
        n_channels=1, n_samples=dict(train=165466, val=23640, test=47280), license="CC BY 4.0",
        label=["Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
               "Glomerular endothelial cells", "Interstitial endothelial cells", "Leukocytes",
               "Podocytes", "Proximal Tubule Segments", "Thick Ascending Limb"]),
    "organamnist": dict(
        python_class="OrganAMNIST", md5="68e3f8846a6bd62f0c9bf841c0d9eacc", task="multi-class",
        n_channels=1, n_samples=dict(train=34561, val=6491, test=17778), license="CC BY 4.0",
        label=["bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right",
               "liver", "lung-left", "lung-right", "pancreas", "spleen"]),
    "organcmnist": dict(
        python_class="OrganCMNIST", md5="b9ceb9546e10131b32923c5bbeaea2b1", task="multi-class",
        n_channels=1, n_samples=dict(train=12975, val=2392, test=8216), license="CC BY 4.0",
        label=["bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right",
               "liver", "lung-left", "lung-right", "pancreas", "spleen"]),
    "organsmnist": dict(
        python_class="OrganSMNIST", md5="9ab87b696fb54e2a387ebe992d6ed5f1", task="multi-class",
        n_channels=1, n_samples=dict(train=13932, val=2452, test=8827), license="CC BY 4.0",
        label=["bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right",
               "liver", "lung-left", "lung-right", "pancreas", "spleen"]),
}
for _flag, _info in MEDMNIST_INFO.items():
    _info["url"] = _ZENODO.format(flag=_flag)
    _info["file"] = f"{_flag}.npz"
del _flag, _info

#: MedMNIST flags :func:`load_dataset` accepts (single-label 2D sets; chestmnist is multi-label).
MEDMNIST_FLAGS: tuple[str, ...] = tuple(
    f for f, i in MEDMNIST_INFO.items() if not i["task"].startswith("multi-label"))

_MEDMNIST_3D = ("organmnist3d", "nodulemnist3d", "adrenalmnist3d", "fracturemnist3d",
                "vesselmnist3d", "synapsemnist3d")

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


# ============================================================================================
# entry point
# ============================================================================================
def load_dataset(source: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                 download: bool = True, image_size: int = 28) -> Dataset:
    """Load a data set with train / val / test splits.

    Parameters
    ----------
    source:
        ``"simulated[:k=v,...]"``, a MedMNIST flag (``"breastmnist"``, ``"medmnist:breastmnist"``),
        a path to a ``.npz`` file in the MedMNIST layout, or a path to a folder of images with
        one sub-folder per class. See the module docstring. A bare flag names the MedMNIST set
        unless a file or folder of that name exists.
    cache_dir:
        Folder for MedMNIST downloads; default :func:`default_cache_dir` (``$MEDCHAIN_DATA``,
        else ``<repo>/data``). A file missing there is then looked for in the medmnist
        package's ``~/.medmnist`` (:func:`medmnist_package_dir`) before any download.
    download:
        If False, a MedMNIST file found in neither folder raises FileNotFoundError instead of
        being downloaded (with pooch: MD5, progress bar, :data:`DOWNLOAD_RETRIES` retries).
    image_size:
        Side length in pixels. Image folders are resized to ``image_size × image_size``; the
        simulated set is generated at that size (unless ``size=`` is given in the source);
        MedMNIST files exist here at 28 only; a local ``.npz`` keeps the size it stores.

    Returns
    -------
    Dataset with uint8 images ``(N, H, W)`` (grey) or ``(N, H, W, 3)`` (colour) and int64 labels.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) \
            or image_size < MIN_IMAGE_SIDE:
        raise ValueError(f"image_size must be an integer >= {MIN_IMAGE_SIDE} (the smallest images "
                         f"medchain's models accept), got {image_size!r}")
    image_size = int(image_size)
    text = os.fspath(source) if isinstance(source, os.PathLike) else source
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"source must be a non-empty string or path, got {source!r}")
    text = text.strip()
    low = text.lower()

    if low == "simulated" or low.startswith("simulated:"):
        return _load_simulated(text, image_size)

    path = Path(text).expanduser()
    flag = low[len("medmnist:"):] if low.startswith("medmnist:") else None
    if flag is None and not path.exists() and low in MEDMNIST_INFO.keys() | set(_MEDMNIST_3D):
        flag = low
    if flag is not None:
        return _load_medmnist(flag.strip(), cache_dir=cache_dir, download=download,
                              image_size=image_size)

    if path.is_dir():
        return _load_folder(path, image_size)
    if path.is_file():
        return _load_npz_file(path)
    if path.suffix.lower() == ".npz" or os.sep in text or "/" in text:
        raise FileNotFoundError(f"data file or folder not found: {path}")
    raise ValueError(
        f"unknown data source {text!r}: expected 'simulated' (or 'simulated:n=2000,sites=5,"
        f"seed=0'), a MedMNIST flag ({', '.join(MEDMNIST_FLAGS)}), a path to a .npz file in the "
        "MedMNIST layout, or a path to a folder with one sub-folder of images per class")


# ============================================================================================
# simulated
# ============================================================================================
def _parse_value(v: str) -> Any:
    v = v.strip()
    if "/" in v:
        return tuple(_parse_value(p) for p in v.split("/"))
    if re.fullmatch(r"[+-]?\d+", v):
        return int(v)
    try:
        return float(v)
    except ValueError:
        pass
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    if v.lower() == "none":
        return None
    return v


def _load_simulated(text: str, image_size: int) -> Dataset:
    from .simulate import simulate_ct  # lazy: the simulator is heavy and optional at import

    opts: dict[str, Any] = {}
    _, _, rest = text.partition(":")
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise ValueError(f"bad option {item!r} in {text!r}: options are k=v pairs separated by "
                             "commas, e.g. 'simulated:n=2000,sites=5,seed=0'")
        if key in opts:
            raise ValueError(f"option {key!r} given twice in {text!r}")
        opts[key] = _parse_value(value)
    params = inspect.signature(simulate_ct).parameters
    allowed = [k for k, p in params.items()
               if k != "progress" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} in {text!r}; simulate_ct accepts "
                         f"{', '.join(allowed)}")
    if "size" in params and "size" not in opts:
        opts["size"] = image_size
    cp = opts.get("class_probs")
    if isinstance(cp, tuple) and all(isinstance(v, (int, float)) for v in cp):
        # one label mix written a/b/c: the same mix at every site
        n_sites = opts.get("sites", params["sites"].default if "sites" in params else 1)
        if not isinstance(n_sites, int) or not 1 <= n_sites <= 10**6:
            raise ValueError(f"bad simulation option in {text!r}: sites must be an integer from 1 "
                             f"to 1000000, got {n_sites!r}")
        opts["class_probs"] = np.tile(np.asarray(cp, dtype=np.float64), (int(n_sites), 1))
    try:
        ds = simulate_ct(**opts)
    except (TypeError, ValueError) as exc:  # e.g. a text value where a number is needed
        raise ValueError(f"bad simulation option in {text!r}: {exc}") from exc
    if not ds.source:
        ds.source = text
    return ds


# ============================================================================================
# MedMNIST download cache
# ============================================================================================
def default_cache_dir() -> Path:
    """The data cache: ``$MEDCHAIN_DATA`` if set, else ``<repo>/data`` (repo = the folder that
    holds the ``medchain`` package, when it is a source checkout with a ``pyproject.toml``),
    else ``~/.cache/medchain/data`` (an installed, non-editable medchain)."""
    env = os.environ.get(ENV_CACHE, "").strip()
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file():
        return repo / "data"
    return Path.home() / ".cache" / "medchain" / "data"


def medmnist_path(flag: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the 28×28 file of MedMNIST set ``flag`` lives in the cache."""
    _medmnist_info(flag)
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / f"{flag}.npz"


def medmnist_package_dir() -> Path:
    """The medmnist package's own cache, ``~/.medmnist`` (medmnist 3.0.2: ``DEFAULT_ROOT`` in
    ``medmnist/info.py``; the package reads no environment variable). Its ``<flag>.npz`` files
    (28×28) are used in place when the data cache lacks the file."""
    return Path.home() / ".medmnist"


def _medmnist_info(flag: str) -> dict[str, Any]:
    if flag in _MEDMNIST_3D:
        raise ValueError(f"MedMNIST set {flag!r} is 3D; medchain handles the 2D sets only: "
                         f"{', '.join(MEDMNIST_FLAGS)}")
    info = MEDMNIST_INFO.get(flag)
    if info is None:
        raise ValueError(f"unknown MedMNIST flag {flag!r}; the 2D sets medchain can load are "
                         f"{', '.join(MEDMNIST_FLAGS)}")
    if flag not in MEDMNIST_FLAGS:
        raise ValueError(f"{flag} is multi-label ({len(info['label'])} findings per image, "
                         f"task '{info['task']}'); medchain trains single-label classifiers. Use a "
                         f"single-label set instead, e.g. pneumoniamnist, or a local .npz whose "
                         "labels are one class per image")
    return info


def _digests(path: Path) -> tuple[str, str]:
    """(MD5, SHA-256) of a file, in one read."""
    md5 = hashlib.md5(usedforsecurity=False)
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            md5.update(chunk)
            sha.update(chunk)
    return md5.hexdigest(), sha.hexdigest()


def _manual_fetch_help(flag: str, dest: Path) -> str:
    info = MEDMNIST_INFO[flag]
    return (f"To use it without network access, download it on a machine that has internet "
            f"access:\n    URL:  {info['url']}\n    file: {info['file']}  (MD5 {info['md5']})\n"
            f"and put it in the folder {dest.parent} (the data cache; set the environment variable "
            f"{ENV_CACHE} or pass cache_dir to use another folder) or in the medmnist package's "
            f"folder {medmnist_package_dir()} (~/.medmnist). medchain then uses the file without "
            "the network.")


def _temp_name(dest: Path, suffix: str) -> Path:
    """A fresh hidden name beside ``dest`` (same file system, so os.replace is atomic); the file
    is created later with the usual permissions."""
    return dest.with_name(f".{dest.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp{suffix}")


def _pooch_downloader():
    """The downloader pooch uses: HTTP(S) with a progress bar on stderr and a timeout."""
    import pooch

    return pooch.HTTPDownloader(progressbar=True, timeout=DOWNLOAD_TIMEOUT_S)


def _download(flag: str, dest: Path) -> None:
    """Fetch ``flag``'s file to ``dest`` with pooch: temporary name, MD5 check, atomic rename,
    :data:`DOWNLOAD_RETRIES` retries; nothing partial is ever left in the cache."""
    info = MEDMNIST_INFO[flag]
    url = info["url"]
    try:
        import pooch
        import requests
    except ImportError as exc:
        raise RuntimeError(f"MedMNIST {flag!r} is not cached and downloading it needs the pooch "
                           f"package ({exc}); install it with `pip install 'pooch>=1.8'`.\n"
                           + _manual_fetch_help(flag, dest)) from exc
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RuntimeError(f"cannot create the data cache folder {dest.parent}: {exc}. Set "
                           f"{ENV_CACHE} to a writable folder.") from exc
    fetcher = pooch.create(path=dest.parent, base_url="", registry={dest.name: f"md5:{info['md5']}"},
                           urls={dest.name: url}, retry_if_failed=DOWNLOAD_RETRIES)
    attempts = f"{DOWNLOAD_RETRIES + 1} attempt(s)"
    try:
        fetcher.fetch(dest.name, downloader=_pooch_downloader())
    except ValueError as exc:  # pooch: the hash of the download does not match
        raise RuntimeError(f"the download of {url} failed its MD5 check after {attempts} ({exc}); "
                           "the file was discarded. Try again later, or fetch it by hand.\n"
                           + _manual_fetch_help(flag, dest)) from exc
    except (requests.exceptions.RequestException, OSError) as exc:
        raise ConnectionError(
            f"could not download MedMNIST {flag!r} ({info['file']}) from {url} after {attempts}: "
            f"{exc}. Is this machine offline (or the server unreachable)?\n"
            + _manual_fetch_help(flag, dest)) from exc


def _load_medmnist(flag: str, *, cache_dir, download: bool, image_size: int) -> Dataset:
    info = _medmnist_info(flag)
    if image_size != 28:
        raise ValueError(f"MedMNIST {flag}: medchain loads the 28×28 files only, got "
                         f"image_size={image_size}; use image_size=28")
    cached = medmnist_path(flag, cache_dir)
    package_copy = medmnist_package_dir() / info["file"]
    fresh = False
    if cached.is_file():
        dest = cached
    elif package_copy.is_file():
        dest = package_copy  # the medmnist package's download, used in place
    else:
        if not download:
            raise FileNotFoundError(f"MedMNIST {flag!r} is neither in the data cache ({cached}) "
                                    f"nor in {package_copy}, and download=False.\n"
                                    + _manual_fetch_help(flag, cached))
        _download(flag, cached)
        dest, fresh = cached, True
    md5, sha256 = _digests(dest)
    md5_ok = md5 == info["md5"]
    try:
        arrays = _read_npz(dest)
        ds = _dataset_from_arrays(arrays, where=str(dest), name=flag, source=f"medmnist:{flag}",
                                  official=info, strict=True)
    except ValueError as exc:
        if md5_ok:
            raise
        raise ValueError(f"the cached MedMNIST file {dest} is corrupt (its MD5 is not the "
                         f"official {info['md5']}, and it does not load: {exc}). Delete it and "
                         "run again to re-download it, or replace it by the official file.\n"
                         + _manual_fetch_help(flag, dest)) from exc
    if not md5_ok:
        sizes = {s: len(getattr(ds, s)) for s in SPLITS}
        note = "" if sizes == info["n_samples"] else (
            f"; its split sizes {sizes} differ from the official {info['n_samples']}")
        warnings.warn(f"{dest}: MD5 differs from the official MedMNIST file ({info['md5']}); it "
                      f"loads and validates, so it is used as a user-supplied copy{note}. Delete "
                      "it to re-download the official file.", UserWarning, stacklevel=3)
    if ds.n_channels != info["n_channels"]:
        raise ValueError(f"{dest}: {flag} should have {info['n_channels']} channel(s), the file "
                         f"has {ds.n_channels}. Delete it to re-download the official file.")
    ds.origin = {"kind": "medmnist", "flag": flag, "file": str(dest.resolve()), "sha256": sha256,
                 "md5": md5, "official_md5": bool(md5_ok), "downloaded": fresh,
                 "url": info["url"]}
    return ds


# ============================================================================================
# npz files
# ============================================================================================
def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an .npz file, with unreadable files turned into a clear ValueError."""
    try:
        obj = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except ValueError as exc:
        # numpy tries pickle on anything that is neither a zip nor an .npy file
        raise ValueError(f"{path}: cannot read it as an .npz file (it is neither a zip archive "
                         "of .npy arrays nor an .npy array); it is corrupt, truncated or not an "
                         ".npz file") from exc
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise ValueError(f"{path}: cannot read it as an .npz file ({type(exc).__name__}: {exc}); "
                         "it is corrupt, truncated or not an .npz file") from exc
    if not isinstance(obj, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: holds a single array {getattr(obj, 'shape', '')}, not an .npz "
                         "archive with train_images, train_labels, val_images, ... arrays")
    try:
        with obj:
            arrays = {k: obj[k] for k in obj.files}
    except ValueError as exc:
        if "pickle" in str(exc):
            raise ValueError(f"{path}: an array in it holds Python objects (pickled data), which "
                             "medchain does not load; store numeric arrays (images uint8, labels "
                             "int)") from exc
        raise ValueError(f"{path}: cannot read an array from it ({exc}); the file is corrupt or "
                         "truncated") from exc
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise ValueError(f"{path}: cannot read an array from it ({type(exc).__name__}: {exc}); "
                         "the file is corrupt or truncated") from exc
    bad = [k for k, v in arrays.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise ValueError(f"{path}: member(s) {', '.join(bad)} of the archive are not .npy arrays; "
                         "the file is corrupt or was not written by numpy.savez")
    return arrays


def _load_npz_file(path: Path) -> Dataset:
    arrays = _read_npz(path)
    name = path.stem
    if "name" in arrays and arrays["name"].ndim == 0 and arrays["name"].dtype.kind == "U":
        name = str(arrays["name"])
    # A local copy named like a MedMNIST set (breastmnist.npz) gets the official class names
    # when the file carries none and its labels fit.
    official = MEDMNIST_INFO.get(path.stem.lower()) if path.stem.lower() in MEDMNIST_FLAGS \
        else None
    ds = _dataset_from_arrays(arrays, where=str(path), name=name, source=str(path.resolve()),
                              official=official, strict=False)
    md5, sha256 = _digests(path)
    ds.origin = {"kind": "npz", "file": str(path.resolve()), "sha256": sha256, "md5": md5}
    if official is not None:  # named like a MedMNIST set: say whether it is the official file
        ds.origin["official_md5"] = md5 == official["md5"]
    return ds


def _integers(a: np.ndarray, where: str, what: str) -> np.ndarray:
    """``a`` as int64, refusing non-integer values."""
    if a.dtype == bool:
        return a.astype(np.int64)
    if a.dtype.kind in "iu":
        return a.astype(np.int64)
    if a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise ValueError(f"{where}: {what} contain NaN or infinite values")
        if (a != np.round(a)).any():
            bad = a[a != np.round(a)].flat[0]
            raise ValueError(f"{where}: {what} must be integers, found the non-integer value "
                             f"{bad}")
        return a.astype(np.int64)
    raise ValueError(f"{where}: {what} must be integers, got dtype {a.dtype}")


def _check_images(x: np.ndarray, where: str) -> np.ndarray:
    if x.dtype != np.uint8:
        hint = ""
        if x.dtype.kind == "f":
            hint = (" Convert float images in [0, 1] with (np.clip(x, 0, 1) * 255).round()"
                    ".astype(np.uint8), or in [0, 255] with np.clip(x, 0, 255).round()"
                    ".astype(np.uint8).")
        elif x.dtype.kind in "iu":
            hint = (" Convert integer images in [0, 255] with x.astype(np.uint8); rescale "
                    "16-bit images first, e.g. (x // 257).astype(np.uint8).")
        raise ValueError(f"{where}: images must be uint8, got dtype {x.dtype}.{hint}")
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if not (x.ndim == 3 or (x.ndim == 4 and x.shape[-1] == 3)):
        raise ValueError(f"{where}: images must have shape (N, H, W) for grey-scale or "
                         f"(N, H, W, 3) for colour, got {x.shape}")
    if x.shape[1] < MIN_IMAGE_SIDE or x.shape[2] < MIN_IMAGE_SIDE:
        raise ValueError(f"{where}: images are {x.shape[1]}×{x.shape[2]} pixels, too small for "
                         f"medchain's models: the minimum is {MIN_IMAGE_SIDE}×{MIN_IMAGE_SIDE} "
                         "(two 2×2 max-pools); MedMNIST uses 28×28. Resize the images (e.g. "
                         "PIL.Image.resize) before saving them")
    return x


def _check_vector(a: np.ndarray, n: int, where: str, what: str) -> np.ndarray:
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    elif a.ndim == 2 and what == "labels":
        raise ValueError(f"{where}: labels have shape {a.shape}, i.e. {a.shape[1]} labels per "
                         "image (multi-label); medchain trains single-label classifiers and "
                         "needs one class per image, labels shaped (N,) or (N, 1)")
    if a.ndim != 1:
        raise ValueError(f"{where}: {what} must have shape (N,) or (N, 1), got {a.shape}")
    if a.shape[0] != n:
        raise ValueError(f"{where}: {n} images but {a.shape[0]} {what}")
    a = _integers(a, where, what)
    if what == "labels" and (a < 0).any():
        raise ValueError(f"{where}: labels must be non-negative class indices, found "
                         f"{int(a.min())}")
    return a


def _dataset_from_arrays(arrays: dict[str, np.ndarray], *, where: str, name: str, source: str,
                         official: dict[str, Any] | None = None,
                         strict: bool = False) -> Dataset:
    """Validate MedMNIST-layout arrays and build a Dataset.

    n_classes and class names: with ``strict``, the ``official`` MedMNIST entry's; else the file's
    ``n_classes`` / ``class_names`` keys when present; else the ``official`` entry's when given and
    the labels fit; else max label + 1 and ``"0", "1", ...``.
    """
    required = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels")]
    missing = [k for k in required if k not in arrays]
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(missing)} (found: "
                         f"{', '.join(sorted(arrays)) or 'none'}); a data set .npz needs "
                         f"{', '.join(required)} (MedMNIST layout) and optionally "
                         "train_site, val_site, test_site")
    has_site = [f"{s}_site" in arrays for s in SPLITS]
    if any(has_site) and not all(has_site):
        raise ValueError(f"{where}: site arrays must be given for all splits or none; found only "
                         f"{', '.join(f'{s}_site' for s, h in zip(SPLITS, has_site) if h)}")
    sets = {}
    for s in SPLITS:
        x = _check_images(arrays[f"{s}_images"], f"{where}: {s}_images")
        n = x.shape[0]
        y = _check_vector(arrays[f"{s}_labels"], n, f"{where}: {s}_labels", "labels")
        site = None
        if all(has_site):
            site = _check_vector(arrays[f"{s}_site"], n, f"{where}: {s}_site", "site ids")
        sets[s] = ImageSet(x, y, site)
    shapes = {s: sets[s].images.shape[1:] for s in SPLITS}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"{where}: the splits' images differ in shape: "
                         + ", ".join(f"{s} {shapes[s]}" for s in SPLITS))
    for s in SPLITS:
        if len(sets[s]) == 0:
            total = sum(len(v) for v in sets.values())
            what = "the data set is empty (no images at all)" if total == 0 else \
                f"the {s} split is empty"
            raise ValueError(f"{where}: {what}; every split needs at least one image")

    top_label = max(int(sets[s].labels.max()) for s in SPLITS)
    class_names: list[str] = []
    if strict and official is not None:
        n_classes = len(official["label"])
        class_names = list(official["label"])
    else:
        if "n_classes" in arrays:
            nc = arrays["n_classes"]
            if nc.shape != () or nc.dtype.kind not in "iu" or int(nc) < 1:
                raise ValueError(f"{where}: n_classes must be a positive integer scalar, got "
                                 f"{nc!r}")
            n_classes = int(nc)
        elif official is not None and "class_names" not in arrays \
                and top_label < len(official["label"]):
            n_classes = len(official["label"])
            class_names = list(official["label"])
        else:
            n_classes = top_label + 1
        how = (f"n_classes = {n_classes} in the file" if "n_classes" in arrays else
               f"largest label {top_label}, no n_classes in the file")
        check_class_count(n_classes, max(len(v) for v in sets.values()), where, how)
        if "class_names" in arrays:
            cn = arrays["class_names"]
            if cn.ndim != 1 or cn.dtype.kind != "U" or len(cn) != n_classes:
                raise ValueError(f"{where}: class_names must be a 1-D string array of length "
                                 f"n_classes={n_classes}, got {cn.dtype} {cn.shape}")
            class_names = [str(c) for c in cn]
    for s in SPLITS:
        top = int(sets[s].labels.max())
        if top >= n_classes:
            raise ValueError(f"{where}: {s}_labels has label {top}, out of range for "
                             f"n_classes={n_classes} (labels must be 0 .. {n_classes - 1})")
    _check_class_coverage(sets, n_classes, class_names, where)
    if not class_names:
        class_names = [str(c) for c in range(n_classes)]
    return Dataset(name=name, train=sets["train"], val=sets["val"], test=sets["test"],
                   n_classes=n_classes, class_names=list(class_names), source=source)


def _list_classes(classes, names) -> str:
    shown = [f"{c} ({names[c]!r})" if c < len(names) else str(c) for c in classes[:10]]
    more = f" and {len(classes) - 10:,} more" if len(classes) > 10 else ""
    return ", ".join(shown) + more


def _check_class_coverage(sets: dict[str, ImageSet], n_classes: int, names: list[str],
                          where: str) -> None:
    """A class with val/test images but no training image is an error (a model cannot learn a
    class it never sees, and the per-class metrics would be meaningless: the split is almost
    surely wrong). Classes with no image in any split only warn (``n_classes`` may declare
    classes a file does not hold, e.g. a subset of a larger set)."""
    counts = {s: np.bincount(sets[s].labels, minlength=n_classes) for s in SPLITS}
    untrained = np.flatnonzero((counts["train"] == 0) & ((counts["val"] + counts["test"]) > 0))
    if untrained.size:
        detail = "; ".join(f"class {c}: {counts['val'][c]} val and {counts['test'][c]} test"
                           for c in untrained[:5])
        raise ValueError(f"{where}: class(es) {_list_classes(untrained.tolist(), names)} have no "
                         f"training images but appear in val/test ({detail}). A model cannot "
                         "learn a class it never sees; move some of those images into the train "
                         "split, or relabel or drop the class")
    absent = np.flatnonzero(sum(counts.values()) == 0)
    if absent.size:
        warnings.warn(f"{where}: {absent.size:,} of {n_classes:,} classes have no images in any "
                      f"split: {_list_classes(absent.tolist(), names)}. Models get an output for "
                      "each of them that no image trains; if the labels are not 0 .. K-1, remap "
                      "them", UserWarning, stacklevel=4)


def save_npz(dataset: Dataset, path: str | os.PathLike) -> Path:
    """Write ``dataset`` as a compressed .npz in the MedMNIST layout (plus ``*_site`` arrays when
    every split has them, and ``n_classes``, ``class_names``, ``name``), atomically. A missing
    ``.npz`` suffix is added. Returns the path written; :func:`load_dataset` reads it back exactly.
    """
    path = Path(path).expanduser()
    if path.suffix.lower() != ".npz":
        path = path.with_name(path.name + ".npz")
    has_site = [getattr(dataset, s).site is not None for s in SPLITS]
    if any(has_site) and not all(has_site):
        raise ValueError("save_npz: site ids must be present in all splits or in none")
    arrays: dict[str, np.ndarray] = {}
    for s in SPLITS:
        part: ImageSet = getattr(dataset, s)
        arrays[f"{s}_images"] = np.ascontiguousarray(part.images)
        arrays[f"{s}_labels"] = np.asarray(part.labels, dtype=np.int64)
        if all(has_site):
            arrays[f"{s}_site"] = np.asarray(part.site, dtype=np.int64)
    arrays["n_classes"] = np.asarray(int(dataset.n_classes), dtype=np.int64)
    if dataset.class_names:
        arrays["class_names"] = np.asarray([str(c) for c in dataset.class_names], dtype=str)
    arrays["name"] = np.asarray(str(dataset.name), dtype=str)
    with warnings.catch_warnings():  # classes with no images: warned about when it is loaded
        warnings.simplefilter("ignore", UserWarning)
        _dataset_from_arrays(arrays, where=f"save_npz({path})", name=dataset.name, source="")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path, ".npz")
    try:
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ============================================================================================
# folders of images
# ============================================================================================
def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _subdirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: _natural_key(p.name))


def _image_files(folder: Path) -> list[Path]:
    files = sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                    and p.suffix.lower() in _IMAGE_SUFFIXES), key=lambda p: _natural_key(p.name))
    if not files:
        raise ValueError(f"empty class folder: {folder} holds no PNG/JPEG images "
                         f"({', '.join(_IMAGE_SUFFIXES)}); remove it or add images")
    return files


def _read_image(path: Path, size: int) -> tuple[np.ndarray, bool]:
    """One image resized to size×size: (array, is_grey); array is (size, size) for grey sources
    and (size, size, 3) for colour ones (is_grey tells whether its three channels are equal)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            mode = im.mode
            if mode.startswith("I") or mode == "F":
                a = np.asarray(im, dtype=np.float64)
                if a.ndim != 2:
                    raise ValueError(f"unexpected array shape {a.shape} for mode {mode}")
                lo, hi = float(a.min()), float(a.max())
                if lo >= 0 and hi <= 255:
                    pass
                elif lo >= 0 and hi <= 65535:
                    a = a / 257.0  # 16-bit grey to 8 bits
                else:
                    a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
                im = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
            elif mode in ("1", "L", "LA"):
                im = im.convert("L")
            else:
                im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BICUBIC)
            arr = np.asarray(im, dtype=np.uint8).copy()
    except Exception as exc:  # Pillow raises many types for bad files
        raise ValueError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc
    if arr.ndim == 2:
        return arr, True
    return arr, bool((arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all())


def _stratified_split(labels: np.ndarray, seed: int = 0,
                      fractions=(0.7, 0.1, 0.2)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic stratified train/val/test index split (per class: shuffle with ``seed``,
    round the val and test counts, the rest is train, at least one train image per class)."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = len(idx)
        n_val = int(round(fractions[1] * n))
        n_test = int(round(fractions[2] * n))
        while n_val + n_test > n - 1 and n_val + n_test > 0:
            if n_test >= n_val:
                n_test -= 1
            else:
                n_val -= 1
        n_train = n - n_val - n_test
        parts[0].append(idx[:n_train])
        parts[1].append(idx[n_train:n_train + n_val])
        parts[2].append(idx[n_train + n_val:])
    return tuple(np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64)
                 for p in parts)  # type: ignore[return-value]


def _load_folder(folder: Path, size: int) -> Dataset:
    top = _subdirs(folder)
    split_dirs = {p.name.lower(): p for p in top if p.name.lower() in SPLITS}
    if split_dirs:
        missing = [s for s in SPLITS if s not in split_dirs]
        if missing:
            raise ValueError(f"{folder}: has {', '.join(sorted(split_dirs))}/ but not "
                             f"{', '.join(missing)}/; give all of train/, val/, test/ (each with "
                             "one sub-folder per class) or none (then medchain splits 70/10/20)")
        per_split = {s: {p.name: p for p in _subdirs(split_dirs[s])} for s in SPLITS}
        names = sorted(set().union(*per_split.values()), key=_natural_key)
    else:
        per_split = {"all": {p.name: p for p in top}}
        names = [p.name for p in top]
    if not names:
        raise ValueError(f"{folder}: no class sub-folders found; put the images of each class in "
                         "their own sub-folder (folder/<class>/*.png), optionally below "
                         "train/, val/, test/")
    label_of = {n: i for i, n in enumerate(names)}

    images: list[np.ndarray] = []
    labels: list[int] = []
    split_of: list[str] = []
    grey: list[bool] = []
    listing = hashlib.sha256()  # every file's path (relative to the folder) and content
    n_files = 0
    for split, classes in per_split.items():
        for cname in sorted(classes, key=_natural_key):
            for f in _image_files(classes[cname]):
                listing.update(f.relative_to(folder).as_posix().encode() + b"\0")
                listing.update(_digests(f)[1].encode() + b"\n")
                n_files += 1
                arr, g = _read_image(f, size)
                images.append(arr)
                labels.append(label_of[cname])
                split_of.append(split)
                grey.append(g)
    all_grey = all(grey)
    if all_grey:
        images = [a if a.ndim == 2 else a[..., 0] for a in images]
    else:
        images = [np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a for a in images]
    x = np.stack(images).astype(np.uint8)
    y = np.asarray(labels, dtype=np.int64)
    where = np.asarray(split_of)
    if split_dirs:
        idx = [np.flatnonzero(where == s) for s in SPLITS]
    else:
        idx = list(_stratified_split(y, seed=0))
    sets = {s: ImageSet(x[i], y[i]) for s, i in zip(SPLITS, idx)}
    for s in SPLITS:
        if len(sets[s]) == 0:
            how = (f"its {s}/ folder has no images" if split_dirs else
                   f"{len(y)} images are too few for a 70/10/20 split per class (the {s} split is "
                   "empty); add images or give train/, val/, test/ folders yourself")
            raise ValueError(f"{folder}: {how}")
    _check_class_coverage(sets, len(names), list(names), str(folder))
    return Dataset(name=folder.name, train=sets["train"], val=sets["val"], test=sets["test"],
                   n_classes=len(names), class_names=list(names), source=str(folder.resolve()),
                   origin={"kind": "folder", "file": str(folder.resolve()),
                           "sha256": listing.hexdigest(), "n_files": n_files,
                           "image_size": size})


# ============================================================================================
# summary
# ============================================================================================
def describe(dataset: Dataset, by: str = "class"):
    """Image counts per split as a pandas DataFrame.

    ``by="class"``: one row per class (index ``label``), columns ``class`` (name), ``train``,
    ``val``, ``test``, ``total``. ``by="site"``: one row per acquisition site (index ``site``);
    needs site ids in every split.
    """
    import pandas as pd

    if by not in ("class", "site"):
        raise ValueError(f"describe: by must be 'class' or 'site', got {by!r}")
    parts = {s: getattr(dataset, s) for s in SPLITS}
    if by == "class":
        k = dataset.n_classes
        names = [dataset.class_names[c] if c < len(dataset.class_names) else str(c)
                 for c in range(k)]
        df = pd.DataFrame({"class": names}, index=pd.Index(np.arange(k), name="label"))
        for s, p in parts.items():
            df[s] = np.bincount(p.labels, minlength=dataset.n_classes)[:dataset.n_classes]
    else:
        if any(p.site is None for p in parts.values()):
            raise ValueError(f"describe: data set {dataset.name!r} has no site ids")
        keys = np.unique(np.concatenate([p.site for p in parts.values()]))
        df = pd.DataFrame(index=pd.Index(keys, name="site"))
        for s, p in parts.items():
            df[s] = [int((p.site == k).sum()) for k in keys]
    df["total"] = df[list(SPLITS)].sum(axis=1)
    return df

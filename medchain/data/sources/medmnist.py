"""The MedMNIST source (``"breastmnist"``, ``"medmnist:breastmnist"``): the 2D sets at 28×28
(:data:`MEDMNIST_INFO`), read from the data cache (:func:`default_cache_dir`), else from the
medmnist package's own cache (``~/.medmnist``), else downloaded once with ``pooch`` (MD5-verified,
progress bar, retries) from the official Zenodo record into the data cache."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from ..types import Dataset
from .layout import SPLITS, dataset_from_arrays, file_digests, read_npz
from .registry import register_source

__all__ = ["DOWNLOAD_RETRIES", "DOWNLOAD_TIMEOUT_S", "ENV_CACHE", "MEDMNIST_3D", "MEDMNIST_FLAGS",
           "MEDMNIST_INFO", "default_cache_dir", "load_medmnist", "medmnist_info",
           "medmnist_package_dir", "medmnist_path"]

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

MEDMNIST_3D = ("organmnist3d", "nodulemnist3d", "adrenalmnist3d", "fracturemnist3d",
                "vesselmnist3d", "synapsemnist3d")


def default_cache_dir() -> Path:
    """The data cache: ``$MEDCHAIN_DATA`` if set, else ``<repo>/data`` (repo = the folder that
    holds the ``medchain`` package, when it is a source checkout with a ``pyproject.toml``),
    else ``~/.cache/medchain/data`` (an installed, non-editable medchain)."""
    env = os.environ.get(ENV_CACHE, "").strip()
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[3]  # <repo>/medchain/data/sources/medmnist.py
    if (repo / "pyproject.toml").is_file():
        return repo / "data"
    return Path.home() / ".cache" / "medchain" / "data"


def medmnist_path(flag: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the 28×28 file of MedMNIST set ``flag`` lives in the cache."""
    medmnist_info(flag)
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / f"{flag}.npz"


def medmnist_package_dir() -> Path:
    """The medmnist package's own cache, ``~/.medmnist`` (medmnist 3.0.2: ``DEFAULT_ROOT`` in
    ``medmnist/info.py``; the package reads no environment variable). Its ``<flag>.npz`` files
    (28×28) are used in place when the data cache lacks the file."""
    return Path.home() / ".medmnist"


def medmnist_info(flag: str) -> dict[str, Any]:
    if flag in MEDMNIST_3D:
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



def _manual_fetch_help(flag: str, dest: Path) -> str:
    info = MEDMNIST_INFO[flag]
    return (f"To use it without network access, download it on a machine that has internet "
            f"access:\n    URL:  {info['url']}\n    file: {info['file']}  (MD5 {info['md5']})\n"
            f"and put it in the folder {dest.parent} (the data cache; set the environment variable "
            f"{ENV_CACHE} or pass cache_dir to use another folder) or in the medmnist package's "
            f"folder {medmnist_package_dir()} (~/.medmnist). medchain then uses the file without "
            "the network.")



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


@register_source("medmnist")
def load_medmnist(flag: str, *, cache_dir: str | os.PathLike | None, download: bool, image_size: int,
                  **_) -> Dataset:
    """MedMNIST set ``flag`` (lower case) at 28×28; see :func:`medchain.data.sources.load_dataset`."""
    info = medmnist_info(flag)
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
    md5, sha256 = file_digests(dest)
    md5_ok = md5 == info["md5"]
    try:
        arrays = read_npz(dest)
        ds = dataset_from_arrays(arrays, where=str(dest), name=flag, source=f"medmnist:{flag}",
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

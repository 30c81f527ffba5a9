"""Writing a notebook's results: tidy metrics.csv, summary.json (numbers that decide the claim plus
parameters, seed, versions, git commit, chain identity) and figures as PNG and PDF."""
from __future__ import annotations

import json
import math
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
_PACKAGES = ("medchain", "torch", "numpy", "scikit-learn", "scikit-image", "pandas", "web3",
             "eth-tester", "py-evm", "papermill")


def versions() -> dict[str, str]:
    """Versions of Python and of the packages that shape the numbers."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_commit() -> str:
    """The repository's HEAD commit (+ '-dirty' when the tree has changes), or 'unknown'."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, (bytes, bytearray)):
        return "0x" + bytes(x).hex()
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, Path):
        return str(x)
    return x


def results_dir(out_dir: str | Path, name: str) -> Path:
    """results/<name>/, created."""
    path = Path(out_dir) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_metrics(rows: list[dict] | pd.DataFrame, path: str | Path) -> pd.DataFrame:
    """Write tidy rows (one measurement each) to metrics.csv; returns the table."""
    table = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    table.to_csv(path, index=False)
    return table


def write_summary(summary: dict, path: str | Path, *, params: dict, seed: int) -> dict:
    """summary.json: the caller's numbers and verdict plus parameters, seed, versions, git commit."""
    full = {**summary, "parameters": params, "seed": seed, "versions": versions(),
            "git_commit": git_commit()}
    Path(path).write_text(json.dumps(_jsonable(full), indent=1, sort_keys=False) + "\n")
    return full


def save_figure(fig, path_stem: str | Path) -> list[Path]:
    """Save a matplotlib figure as <stem>.png (150 dpi) and <stem>.pdf; returns both paths.
    The PDF carries no creation date so that reruns give identical files."""
    stem = Path(path_stem)
    png, pdf = stem.with_suffix(".png"), stem.with_suffix(".pdf")
    fig.savefig(png, dpi=150, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(pdf, bbox_inches="tight", metadata={"CreationDate": None, "Creator": None, "Producer": None})
    return [png, pdf]


def verdict(claim: str, holds: bool, detail: str) -> dict:
    """The claim's verdict as recorded in summary.json and shown by `medchain reproduce`."""
    return {"claim": claim, "holds": bool(holds), "detail": detail}


def tidy(table: pd.DataFrame, metrics=("acc", "balanced_acc", "auc", "loss")) -> pd.DataFrame:
    """Wide metric rows → long form: one row per (identifiers…, metric, value)."""
    present = [m for m in metrics if m in table.columns]
    ids = [c for c in table.columns if c not in present and c != "n"]
    return table.melt(id_vars=ids, value_vars=present, var_name="metric", value_name="value").dropna(subset=["value"])

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
_PACKAGES = ("medchain", "torch", "numpy", "scipy", "scikit-learn", "scikit-image", "pandas",
             "pillow", "web3", "eth-tester", "py-evm", "papermill")


def versions() -> dict[str, str]:
    """Versions of Python and of the packages that shape the numbers, and the CPU capability torch
    dispatches to (its kernels, hence the floats, differ between e.g. AVX2 and AVX512 machines)."""
    import torch

    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    out["machine"] = platform.machine()
    out["torch_threads"] = str(torch.get_num_threads())
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


def check_provenance(*, quick: bool, allow_dirty: bool = False) -> dict:
    """Call before a run whose numbers may be published: a full-mode run from a tree with
    uncommitted changes is refused (its numbers could not be regenerated from any commit) unless
    allow_dirty=True, which the summary then records. Quick runs are never published and pass.
    Returns the provenance block for summary.json."""
    commit = git_commit()
    dirty = commit.endswith("-dirty")
    if dirty and not quick and not allow_dirty:
        raise RuntimeError("the working tree has uncommitted changes: commit them first so that this "
                           "run can be regenerated from its commit, or pass allow_dirty=True "
                           "(-p allow_dirty=true), which marks the summary as not regenerable")
    return {"git_commit": commit, "dirty": dirty, "allow_dirty": bool(allow_dirty), "quick": bool(quick)}


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


def write_summary(summary: dict, path: str | Path, *, params: dict, seeds: list[int] | None = None,
                  seed: int | None = None) -> dict:
    """summary.json: the caller's numbers and verdicts plus parameters, the seeds (a single-run
    caller passes `seed`, recorded under both keys), versions, git commit and whether the tree
    had uncommitted changes."""
    if (seeds is None) == (seed is None):
        raise ValueError("pass exactly one of seeds (a list) or seed (one run)")
    seeds = [seed] if seeds is None else [int(s) for s in seeds]
    commit = git_commit()
    full = {**summary, "parameters": params, "seeds": seeds, **({"seed": seed} if seed is not None else {}),
            "versions": versions(), "git_commit": commit, "dirty": commit.endswith("-dirty")}
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


def verdict(claim: str, holds: bool | None, detail: str) -> dict:
    """A verdict that is not a statistical decision (e.g. a mechanism check), in the same record
    shape as medchain.stats.claim_verdict: holds True/False → "holds"/"fails", None → "inconclusive"."""
    v = {True: "holds", False: "fails"}.get(None if holds is None else bool(holds), "inconclusive")
    return {"claim": claim, "verdict": v, "holds": None if holds is None else bool(holds), "detail": detail}


def tidy(table: pd.DataFrame, metrics=("acc", "balanced_acc", "auc", "loss")) -> pd.DataFrame:
    """Wide metric rows → long form: one row per (identifiers…, metric, value)."""
    present = [m for m in metrics if m in table.columns]
    ids = [c for c in table.columns if c not in present and c != "n"]
    return table.melt(id_vars=ids, value_vars=present, var_name="metric", value_name="value").dropna(subset=["value"])

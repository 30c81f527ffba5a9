"""`medchain reproduce`: run the claim notebooks with papermill and collect their verdicts."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from medchain.results import REPO

NOTEBOOKS_DIR = REPO / "notebooks"


def list_notebooks(notebooks_dir: Path = NOTEBOOKS_DIR) -> dict[str, Path]:
    """{"01": path, ...} for every notebooks/NN_*.ipynb."""
    found = {p.name[:2]: p for p in sorted(notebooks_dir.glob("[0-9][0-9]_*.ipynb"))}
    if not found:
        raise FileNotFoundError(f"no notebooks NN_*.ipynb in {notebooks_dir}")
    return found


def run_notebook(path: Path, out_dir: Path, *, quick: bool, parameters: dict | None = None,
                 progress: bool = True) -> Path:
    """Execute one notebook with papermill; the executed copy is saved as
    out_dir/<name>/<name>.ipynb next to that notebook's results. Returns the summary.json path."""
    import papermill as pm

    name = path.stem
    target = out_dir / name
    target.mkdir(parents=True, exist_ok=True)
    params = {"quick": quick, "out_dir": str(out_dir.resolve()), **(parameters or {})}
    pm.execute_notebook(str(path), str(target / path.name), parameters=params, cwd=str(path.parent),
                        progress_bar=progress, kernel_name="python3")
    summary = target / "summary.json"
    if not summary.exists():
        raise RuntimeError(f"notebook {path.name} ran but wrote no {summary}; see {target / path.name}")
    return summary


def verdict_table(summaries: dict[str, Path]) -> pd.DataFrame:
    """One row per verdict found in the summaries (a notebook may decide several sub-claims)."""
    rows = []
    for key, path in summaries.items():
        s = json.loads(Path(path).read_text())
        verdicts = s.get("verdicts") or [s.get("verdict")]
        for v in verdicts:
            if v:
                rows.append({"notebook": key, "claim": v["claim"],
                             "holds": "yes" if v["holds"] else "NO", "detail": v["detail"]})
    return pd.DataFrame(rows, columns=["notebook", "claim", "holds", "detail"])


def reproduce(*, quick: bool = True, only: list[str] | None = None, out_dir: Path = REPO / "results",
              progress: bool = True) -> pd.DataFrame:
    """Run the selected notebooks (default: all) and return the verdict table."""
    books = list_notebooks()
    keys = only or list(books)
    unknown = [k for k in keys if k not in books]
    if unknown:
        raise ValueError(f"no notebook {unknown}; available: {sorted(books)}")
    summaries = {}
    for key in tqdm(keys, desc="notebooks", disable=not progress):
        t0 = time.perf_counter()
        summaries[key] = run_notebook(books[key], Path(out_dir), quick=quick, progress=progress)
        tqdm.write(f"{books[key].name}: {time.perf_counter() - t0:.0f} s → {summaries[key].parent}")
    return verdict_table(summaries)

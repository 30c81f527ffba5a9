"""`medchain reproduce`: run the claim notebooks with papermill and collect their verdicts."""
from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import pandas as pd
import yaml
from tqdm.auto import tqdm

from medchain.results import REPO

NOTEBOOKS_DIR = REPO / "notebooks"


def list_notebooks(notebooks_dir: Path = NOTEBOOKS_DIR) -> dict[str, Path]:
    """{"01": path, ...} for every notebooks/NN_*.ipynb."""
    found = {p.name[:2]: p for p in sorted(Path(notebooks_dir).glob("[0-9][0-9]_*.ipynb"))}
    if not found:
        raise FileNotFoundError(f"no notebooks NN_*.ipynb in {notebooks_dir}")
    return found


def parse_parameters(pairs: list[str] | None) -> dict:
    """["source=breastmnist", "rounds=30", "partitions=[iid, sites]"] → a dict; values are read as
    numbers, else YAML (booleans, lists, strings)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ValueError(f"notebook parameter {pair!r} is not KEY=VALUE (e.g. -p rounds=30 or "
                             "-p source=breastmnist)")
        out[key.strip()] = _number_or_yaml(value)
    return out


def _number_or_yaml(text: str):
    try:   # YAML 1.1 reads "2e-3" as a string
        return int(text) if text.strip().lstrip("+-").isdigit() else float(text)
    except ValueError:
        return yaml.safe_load(text) if text.strip() else ""


def check_parameters(path: Path, parameters: dict) -> None:
    """Refuse a parameter that the notebook's ``parameters`` cell does not define (a typo would
    otherwise run the defaults silently)."""
    import papermill as pm

    known = pm.inspect_notebook(str(path))
    unknown = sorted(set(parameters) - set(known))
    if unknown:
        raise ValueError(f"{path.name} has no parameter {', '.join(unknown)}; its parameters are "
                         f"{', '.join(known)} (select notebooks with --only)")


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


def _timed_run(path: Path, out_dir: Path, quick: bool, parameters: dict, progress: bool):
    t0 = time.perf_counter()
    summary = run_notebook(path, out_dir, quick=quick, parameters=parameters, progress=progress)
    return summary, time.perf_counter() - t0


def reproduce(*, quick: bool = True, only: list[str] | None = None, out_dir: Path = REPO / "results",
              parameters: dict | None = None, jobs: int = 1, progress: bool = True,
              notebooks_dir: Path = NOTEBOOKS_DIR) -> pd.DataFrame:
    """Run the selected notebooks (default: all) and return the verdict table.

    parameters: papermill parameters given to every selected notebook (after ``quick`` and
    ``out_dir``), e.g. {"source": "breastmnist"}. jobs: notebooks run at once, each in its own
    kernel; every notebook pins torch to one thread, so up to one job per CPU core costs no
    speed per notebook and gives the same numbers as running them one after another."""
    books = list_notebooks(notebooks_dir)
    keys = only or list(books)
    unknown = [k for k in keys if k not in books]
    if unknown:
        raise ValueError(f"no notebook {unknown}; available: {sorted(books)}")
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    out_dir, parameters = Path(out_dir), dict(parameters or {})
    for key in keys:
        check_parameters(books[key], parameters)
    summaries = {}
    bar = tqdm(total=len(keys), desc="notebooks", disable=not progress)
    if jobs == 1:
        for key in keys:
            summaries[key], secs = _timed_run(books[key], out_dir, quick, parameters, progress)
            bar.update()
            tqdm.write(f"{books[key].name}: {secs:.0f} s → {summaries[key].parent}")
    else:
        # cell-level progress bars of parallel notebooks would interleave: one bar of notebooks
        with ProcessPoolExecutor(max_workers=min(jobs, len(keys))) as pool:
            futures = {pool.submit(_timed_run, books[k], out_dir, quick, parameters, False): k
                       for k in keys}
            for fut in as_completed(futures):
                key = futures[fut]
                summaries[key], secs = fut.result()
                bar.update()
                tqdm.write(f"{books[key].name}: {secs:.0f} s → {summaries[key].parent}")
    bar.close()
    return verdict_table({k: summaries[k] for k in keys})

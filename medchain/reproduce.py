"""`medchain reproduce`: run the claim notebooks with papermill and collect their verdicts."""
from __future__ import annotations

import ast
import json
import re
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


def _verdict_text(v: dict) -> str:
    """The verdict as shown: its ``verdict`` string ("holds", "fails", "inconclusive (…)") when
    the summary has one, else "yes"/"NO" from ``holds`` (older summaries)."""
    if v.get("verdict"):
        return str(v["verdict"])
    holds = v.get("holds")
    return "inconclusive" if holds is None else ("yes" if holds else "NO")


def verdict_table(summaries: dict[str, Path]) -> pd.DataFrame:
    """One row per verdict found in the summaries (a notebook may decide several sub-claims)."""
    rows = []
    for key, path in summaries.items():
        s = json.loads(Path(path).read_text())
        verdicts = s.get("verdicts") or [s.get("verdict")]
        for v in verdicts:
            if v:
                rows.append({"notebook": key, "claim": v.get("claim", ""),
                             "verdict": _verdict_text(v), "detail": v.get("detail", "")})
    return pd.DataFrame(rows, columns=["notebook", "claim", "verdict", "detail"])


class NotebooksFailed(RuntimeError):
    """Some notebooks failed; the others ran to the end. ``failures``: one dict per failed
    notebook (notebook, error, executed copy); ``table``: the verdicts of those that finished."""

    def __init__(self, failures: list[dict], table: pd.DataFrame, total: int):
        self.failures, self.table = failures, table
        lines = [f"{len(failures)} of {total} notebooks failed:"]
        lines += [f"  {f['notebook']}: {f['error']} (executed copy: {f['executed']})" for f in failures]
        if len(table):
            lines += ["verdicts of the notebooks that finished:",
                      table.to_string(index=False, max_colwidth=90)]
        super().__init__("\n".join(lines))


def _describe(exc: BaseException) -> str:
    """One line for a notebook's error: papermill's cell error as ``ename: evalue``."""
    if getattr(exc, "ename", None):
        cell = getattr(exc, "exec_count", None)
        return f"{exc.ename}: {exc.evalue}" + (f" (cell [{cell}])" if cell is not None else "")
    return f"{type(exc).__name__}: {exc}"


def _timed_run(path: Path, out_dir: Path, quick: bool, parameters: dict, progress: bool):
    """run_notebook that never raises: (summary or None, seconds, error line or None). Errors
    travel back as text so that a parallel worker's failure cannot stop the other notebooks."""
    t0 = time.perf_counter()
    try:
        summary = run_notebook(path, out_dir, quick=quick, parameters=parameters, progress=progress)
        return summary, time.perf_counter() - t0, None
    except Exception as exc:            # reported with the others at the end of reproduce
        return None, time.perf_counter() - t0, _describe(exc)


_SCHEME = re.compile(r"^[A-Za-z][\w+.-]*:")     # simulated:…, timm:…, http://… are not paths


def resolve_paths(parameters: dict, cwd: Path | None = None) -> dict:
    """Notebook parameters with path-like string values made absolute against the caller's
    working directory ``cwd`` (notebooks execute in notebooks/, where a relative path would
    point elsewhere). Path-like: names an existing file or folder under ``cwd``, or contains a
    ``/`` or starts with ``~``; values with a ``scheme:`` prefix and absolute paths stay as given."""
    cwd = Path.cwd() if cwd is None else Path(cwd)
    out = {}
    for key, value in parameters.items():
        if isinstance(value, str) and value and not _SCHEME.match(value):
            path = Path(value).expanduser()
            if path.is_absolute():
                value = str(path)
            elif (cwd / path).exists() or "/" in value:
                value = str((cwd / path).resolve())
        out[key] = value
    return out


def reproduce(*, quick: bool = True, only: list[str] | None = None, out_dir: Path = REPO / "results",
              parameters: dict | None = None, jobs: int = 1, progress: bool = True,
              notebooks_dir: Path = NOTEBOOKS_DIR) -> pd.DataFrame:
    """Run the selected notebooks (default: all) and return the verdict table.

    parameters: papermill parameters given to every selected notebook (after ``quick`` and
    ``out_dir``), e.g. {"source": "breastmnist"}. jobs: notebooks run at once, each in its own
    kernel; every notebook pins torch to one thread, so up to one job per CPU core costs no
    speed per notebook and gives the same numbers as running them one after another.

    A failing notebook does not stop the others: every selected notebook runs to its end, then
    :class:`NotebooksFailed` (a RuntimeError) names each failure, its error and its executed copy.
    Path-like parameter values and ``out_dir`` are taken relative to the caller's working
    directory (:func:`resolve_paths`), not notebooks/."""
    books = list_notebooks(notebooks_dir)
    keys = only or list(books)
    unknown = [k for k in keys if k not in books]
    if unknown:
        raise ValueError(f"no notebook {unknown}; available: {sorted(books)}")
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    parameters = resolve_paths(dict(parameters or {}))
    # an out_dir given as a notebook parameter is where the results go: keep both in one place
    out_dir = Path(parameters.pop("out_dir", out_dir)).expanduser().resolve()
    for key in keys:
        check_parameters(books[key], parameters)
    summaries, failures = {}, []
    bar = tqdm(total=len(keys), desc="notebooks", disable=not progress)

    def done(key: str, summary: Path | None, secs: float, error: str | None) -> None:
        bar.update()
        executed = out_dir / books[key].stem / books[key].name
        if error is None:
            summaries[key] = summary
            tqdm.write(f"{books[key].name}: {secs:.0f} s → {summary.parent}")
        else:
            failures.append({"notebook": books[key].name, "error": error, "executed": str(executed)})
            tqdm.write(f"{books[key].name}: FAILED after {secs:.0f} s: {error}")

    if jobs == 1:
        for key in keys:
            done(key, *_timed_run(books[key], out_dir, quick, parameters, progress))
    else:
        # cell-level progress bars of parallel notebooks would interleave: one bar of notebooks
        with ProcessPoolExecutor(max_workers=min(jobs, len(keys))) as pool:
            futures = {pool.submit(_timed_run, books[k], out_dir, quick, parameters, False): k
                       for k in keys}
            for fut in as_completed(futures):
                try:
                    result = fut.result()
                except Exception as exc:    # the worker process itself died (e.g. out of memory)
                    result = (None, float("nan"), _describe(exc))
                done(futures[fut], *result)
    bar.close()
    table = verdict_table({k: summaries[k] for k in keys if k in summaries})
    if failures:
        order = {books[k].name: i for i, k in enumerate(keys)}
        failures.sort(key=lambda f: order[f["notebook"]])
        raise NotebooksFailed(failures, table, len(keys))
    return table


def notebook_defaults(path: Path) -> dict:
    """The values of a notebook's ``parameters`` cell (papermill reads the cell; the values are
    Python literals)."""
    import papermill as pm

    out = {}
    for name, info in pm.inspect_notebook(str(path)).items():
        try:
            out[name] = ast.literal_eval(info["default"])
        except (ValueError, SyntaxError):
            out[name] = info["default"]
    return out

"""`medchain verify RUN`: rerun a committed run's seeds with its recorded parameters and check every
paired difference it decided on against the recorded one.

A run folder (``results/full/<run>/<notebook>/``) holds ``summary.json`` with the notebook
parameters, the seeds, each decision's per-seed paired differences, the package versions with the
CPU capability and the commit. `verify` executes the same notebook with those parameters (all
seeds, or the ones asked for) into a fresh folder and compares, decision by decision and seed by
seed:

* same machine type and code (CPU capability, torch/numpy versions, torch threads, commit): the
  numbers must be **identical** (same seed → same floats);
* otherwise each new per-seed difference must lie in the recorded **95 % prediction interval** of
  one new run (:func:`medchain.stats.prediction_interval`), and the count outside may not exceed
  what chance gives at 95 % (one-sided binomial test at 5 %: with 20 comparisons one or two
  outside are expected); with two or more seeds rerun, the new mean is also reported against the
  recorded 95 % interval of the mean, and the new verdict beside the recorded one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as sps

from medchain.stats import LEVEL, prediction_interval

#: Versions that decide whether two runs must give identical floats.
SAME_MACHINE_KEYS = ("cpu_capability", "machine", "torch", "numpy", "torch_threads")
#: Notebook parameters that `verify` sets itself rather than copying from the recording.
OWN_PARAMETERS = ("quick", "out_dir", "seeds", "jobs", "allow_dirty")
#: Two differences closer than this count as identical (they are float64 of the same computation).
IDENTICAL_ABS = 1e-9


def load_summary(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: give a run folder that holds summary.json, "
                                "e.g. results/full/breastmnist/01_centralized_vs_collaborative")
    return json.loads(path.read_text())


def run_seeds(summary: dict) -> list[int]:
    """The seeds a summary's per-seed values are listed in."""
    seeds = summary.get("seeds")
    if seeds is None and "seed" in summary:
        seeds = [summary["seed"]]
    if not seeds:
        raise ValueError("the summary records no seeds: it predates multi-seed runs and cannot be verified")
    return [int(s) for s in seeds]


def notebook_for(run_dir: str | Path, notebooks: dict[str, Path]) -> Path:
    """The notebook that wrote a run folder: the folder is named after it (``01_centralized_…``)."""
    name = Path(run_dir).resolve().name
    for path in notebooks.values():
        if path.stem == name:
            return path
    raise ValueError(f"no notebook named {name}.ipynb: a run folder is named after the notebook "
                     f"that wrote it (one of {sorted(p.stem for p in notebooks.values())})")


def recorded_parameters(summary: dict, notebook_parameters) -> dict:
    """The recorded values of the notebook's own parameters (derived entries such as ``collab``
    and the ones verify sets itself are left out)."""
    recorded = summary.get("parameters") or {}
    return {k: v for k, v in recorded.items() if k in set(notebook_parameters) and k not in OWN_PARAMETERS}


def same_machine(old: dict, new: dict) -> bool:
    """Whether two summaries come from the same machine type, packages and code (identical floats expected)."""
    ov, nv = old.get("versions", {}), new.get("versions", {})
    op, np_ = old.get("provenance", {}), new.get("provenance", {})
    same_code = ((op.get("git_commit") or old.get("git_commit")) == (np_.get("git_commit") or new.get("git_commit"))
                 and not op.get("dirty", old.get("dirty")) and not np_.get("dirty", new.get("dirty")))
    return same_code and all(ov.get(k) == nv.get(k) for k in SAME_MACHINE_KEYS)


def _decisions(summary: dict) -> dict[tuple, tuple[dict, dict]]:
    """{(claim, kind, metric, a, b): (verdict record, decision)} of a summary."""
    out = {}
    for v in summary.get("verdicts", []):
        for d in v.get("decisions", []):
            out[(v["claim"], d["kind"], d["metric"], d["a"], d["b"])] = (v, d)
    return out


def compare(old: dict, new: dict, *, level: float = LEVEL) -> pd.DataFrame:
    """One row per (decision, rerun seed): the recorded and the new paired difference, the
    recorded prediction interval and whether the new value lies in it (or equals the recorded
    one). Raises when the rerun lacks a decision the recording has."""
    old_seeds, new_seeds = run_seeds(old), run_seeds(new)
    recorded, rerun = _decisions(old), _decisions(new)
    missing = sorted(set(recorded) - set(rerun))
    if missing:
        raise ValueError(f"the rerun did not decide {len(missing)} recorded comparison(s), e.g. {missing[0]}: "
                         "the code or the parameters differ from the recording")
    rows = []
    for key, (verdict, d) in recorded.items():
        values = np.asarray(d["values"], dtype=np.float64)
        finite = values[np.isfinite(values)]
        lo, hi = prediction_interval(finite, level) if finite.size >= 2 else (np.nan, np.nan)
        new_values = rerun[key][1]["values"]
        for seed, value in zip(new_seeds, new_values):
            old_value = float(values[old_seeds.index(seed)]) if seed in old_seeds else np.nan
            rows.append({"claim": key[0], "kind": key[1], "metric": key[2], "comparison": f"{key[3]} − {key[4]}",
                         "seed": seed, "recorded": old_value, "rerun": float(value),
                         "difference": float(value) - old_value, "pi_low": lo, "pi_high": hi,
                         "identical": bool(abs(float(value) - old_value) <= IDENTICAL_ABS),
                         "inside": bool(lo - IDENTICAL_ABS <= float(value) <= hi + IDENTICAL_ABS)})
    return pd.DataFrame(rows)


def mean_check(old: dict, new: dict) -> pd.DataFrame:
    """Per decision with ≥ 2 rerun seeds: the new mean against the recorded 95 % interval of the
    mean, and the new verdict beside the recorded one."""
    rows = []
    rerun = _decisions(new)
    for key, (verdict, d) in _decisions(old).items():
        nv, nd = rerun[key]
        if len(nd["values"]) < 2:
            continue
        rows.append({"claim": key[0], "metric": key[2], "comparison": f"{key[3]} − {key[4]}",
                     "recorded_mean": d["mean"], "ci_low": d["ci_low"], "ci_high": d["ci_high"],
                     "rerun_mean": nd["mean"], "mean_inside": bool(d["ci_low"] <= nd["mean"] <= d["ci_high"]),
                     "recorded_verdict": d["verdict"], "rerun_verdict": nd["verdict"]})
    return pd.DataFrame(rows)


@dataclass
class Verification:
    """The outcome of `verify`: the rows, whether identical floats were expected, and the verdict."""
    rows: pd.DataFrame
    means: pd.DataFrame
    exact: bool
    outside: int
    p_value: float
    ok: bool
    rerun_dir: Path

    def text(self) -> str:
        n = len(self.rows)
        if self.exact:
            same = int(self.rows["identical"].sum())
            head = (f"same machine type, packages and commit as the recording: {same} of {n} per-seed "
                    f"differences identical — {'VERIFIED' if self.ok else 'NOT VERIFIED (same seed gave other numbers)'}")
        elif not np.isfinite(self.rows["pi_low"]).any():
            same = int(self.rows["identical"].sum())
            head = (f"other machine type or code than the recording, and the recording has one seed (no "
                    f"interval): {same} of {n} per-seed differences identical — "
                    f"{'VERIFIED' if self.ok else 'NOT VERIFIED (rerun on the recording machine type and commit, or record more seeds)'}")
        else:
            head = (f"other machine type or code than the recording: {n - self.outside} of {n} per-seed "
                    f"differences inside the recorded {LEVEL:.0%} prediction interval (chance alone leaves "
                    f"about {n * (1 - LEVEL):.1f} outside; binomial p = {self.p_value:.3f}), "
                    f"{int(self.rows['identical'].sum())} identical to the recording — "
                    f"{'VERIFIED' if self.ok else 'NOT VERIFIED'}")
        cols = ["claim", "metric", "comparison", "seed", "recorded", "rerun", "pi_low", "pi_high",
                "identical" if self.exact else "inside"]
        def short(table: pd.DataFrame) -> pd.DataFrame:     # "claim 4 (quantity): the best …" → "claim 4 (quantity)"
            return table.assign(claim=table["claim"].str.split(": ").str[0])

        body = short(self.rows)[cols].to_string(index=False, float_format=lambda x: f"{x:+.4f}")
        out = [head, "", body]
        if len(self.means):
            out += ["", short(self.means).to_string(index=False, float_format=lambda x: f"{x:+.4f}")]
        return "\n".join(out)


def judge(rows: pd.DataFrame, means: pd.DataFrame, *, exact: bool, rerun_dir: Path,
          level: float = LEVEL) -> Verification:
    """Identical numbers where identical floats are expected; otherwise no more values outside
    the prediction intervals than chance gives (one-sided binomial test at 1 − level)."""
    if rows.empty:
        raise ValueError("nothing to compare: the recording has no per-seed decisions")
    judged = rows[np.isfinite(rows["pi_low"]) | exact]
    outside = int((~judged["inside"]).sum())
    p = float(sps.binomtest(outside, len(judged), 1 - level, alternative="greater").pvalue) if len(judged) else 1.0
    # a one-seed recording has no prediction interval: only an identical rerun can verify it
    ok = bool(rows["identical"].all()) if exact or judged.empty else p >= 1 - level
    return Verification(rows, means, exact, outside, p, ok, rerun_dir)


def verify(run_dir: str | Path, *, seeds: list[int] | None = None, out_dir: str | Path | None = None,
           jobs: int = 1, allow_dirty: bool = False, progress: bool = True) -> Verification:
    """Rerun `run_dir`'s notebook with its recorded parameters for `seeds` (default: all recorded)
    into `out_dir` (default: ``results/verify/<run>/``) and judge the rerun against the recording."""
    from medchain.reproduce import list_notebooks, notebook_defaults, run_notebook

    run_dir = Path(run_dir)
    old = load_summary(run_dir)
    recorded_seeds = run_seeds(old)
    seeds = recorded_seeds if seeds is None else [int(s) for s in seeds]
    unknown = sorted(set(seeds) - set(recorded_seeds))
    if unknown:
        raise ValueError(f"seed(s) {unknown} are not in the recording (seeds {recorded_seeds})")
    notebook = notebook_for(run_dir, list_notebooks())
    defaults = notebook_defaults(notebook)           # papermill reads the notebook once
    params = recorded_parameters(old, defaults)
    quick = bool((old.get("parameters") or {}).get("quick", False))
    params.update(seeds=seeds, jobs=jobs)
    if "allow_dirty" in defaults:
        params["allow_dirty"] = allow_dirty
    from medchain.results import REPO

    target = (Path(out_dir) if out_dir is not None
              else REPO / "results" / "verify" / run_dir.resolve().parent.name).resolve()
    if (target / notebook.stem) == run_dir.resolve():
        raise ValueError(f"the rerun would overwrite the recording {run_dir}: give another --out")
    summary_path = run_notebook(notebook, target, quick=quick, parameters=params, progress=progress)
    new = json.loads(summary_path.read_text())
    result = judge(compare(old, new), mean_check(old, new), exact=same_machine(old, new),
                   rerun_dir=summary_path.parent)
    (summary_path.parent / "verify.json").write_text(json.dumps({
        "recording": str(run_dir), "seeds": seeds, "exact": result.exact, "ok": result.ok,
        "outside": result.outside, "p_value": result.p_value,
        "rows": json.loads(result.rows.to_json(orient="records")),
        "means": json.loads(result.means.to_json(orient="records"))}, indent=1))
    return result

"""`medchain reproduce`: run the claim notebooks with papermill and collect their verdicts."""
from __future__ import annotations

import ast
import json
import math
import re
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
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


# ============================================================================================
# cost estimate of a full run, printed before it starts
# ============================================================================================
#: Share of a simulated data set in its train split (simulate_ct's default split 0.7 / 0.1 / 0.2).
SIM_TRAIN_FRACTION = 0.7
#: Seeds a notebook runs in full mode when its ``seeds`` parameter is None ([0..4]).
DEFAULT_SEEDS = 5
BENCH_RESULTS = REPO / "benchmarks" / "results"


@dataclass
class Work:
    """What one notebook run costs, counted from its parameters: ``train_images`` image-passes of
    training (forward + backward of one image; all seeds), ``chain_rounds`` collaborative rounds on a
    chain with ``institutions`` members each, ``attack_steps`` gradient-inversion steps (one image,
    not converted to time: no benchmark measures them). Evaluation is not counted."""
    train_images: float
    chain_rounds: int
    institutions: int
    attack_steps: int = 0


def n_train_images(source, sim_n: int | None = None) -> int | None:
    """Training-split size of a data source named in notebook parameters: the simulator's share of
    ``sim_n``, a MedMNIST flag's published count; None for a file or folder (not opened here)."""
    from medchain.data.sources import MEDMNIST_INFO

    text = str(source).strip().lower()
    if text == "simulated" or text.startswith("simulated:"):
        return None if sim_n is None else round(SIM_TRAIN_FRACTION * int(sim_n))
    info = MEDMNIST_INFO.get(text.removeprefix("medmnist:"))
    return None if info is None else int(info["n_samples"]["train"])


def _seeds(p: dict) -> int:
    return DEFAULT_SEEDS if p.get("seeds") is None else len(list(p["seeds"]))


def _work_01(p: dict) -> Work | None:
    """Per seed and partition: each collaborative method (on chain) and, with_reference, the
    chain-free reference, rounds × local_epochs passes each; centralized and local-only,
    baseline_epochs each. With several lr_scales, per partition and scale on the tuning seed:
    each method and centralized once."""
    n = n_train_images(p["source"], p.get("sim_n"))
    if n is None:
        return None
    passes = p["rounds"] * p["local_epochs"]
    base = passes if p.get("baseline_epochs") is None else p["baseline_epochs"]
    runs = _seeds(p) * len(p["partitions"])
    methods = len(p.get("methods") or ["fedavg"])
    scales = len(set(p.get("lr_scales") or [1.0]))
    tune = len(p["partitions"]) * scales if scales > 1 else 0
    return Work(runs * n * (passes * (methods + bool(p.get("with_reference"))) + 2 * base)
                + tune * n * (passes * methods + base),
                (runs + tune) * p["rounds"] * methods, p["institutions"])


def _privacy_runs(p: dict) -> int:
    """Collaborative runs of claim 2: one per defence (None: every one of DEFENCES)."""
    if p.get("defences") is None:
        from medchain.experiments.privacy import DEFENCES
        return len(DEFENCES)
    return len(p["defences"])


def _work_02(p: dict) -> Work | None:
    """Per seed: one collaborative run per defence (rounds × local_epochs passes each), LiRA's
    shadow models (5 epochs over mia_n images each); attacks: every defence × attacked image, up to
    two inversions of attack_steps (the second when BN statistics are shared), and the LeNet bound
    (worst_case_steps per θu, one image)."""
    n = n_train_images(p["source"], p.get("sim_n"))
    if n is None:
        return None
    runs, seeds = _privacy_runs(p), _seeds(p)
    shadows = p["lira_shadows"] if p["lira_shadows"] >= 2 else 0
    attack = (runs * p["n_attack_images"] * 2 * p["attack_steps"]
              + len(p["worst_case_thetas"]) * p["worst_case_steps"])
    return Work(seeds * (runs * p["rounds"] * p["local_epochs"] * n + shadows * 5 * p["mia_n"]),
                seeds * runs * (p["rounds"] + 1), p["institutions"], seeds * attack)


def _work_03(p: dict) -> Work | None:
    """Every source task of the pair once (source_rounds × source_local_epochs passes each); per seed,
    fraction and chain arm (no transfer; warm start and L2-SP per source) a target task of `rounds`
    rounds whose local epochs are raised until the smallest institution makes min_local_steps steps a
    round (medchain.experiments.transfer.local_epochs_for); the pooled control, pooled_epochs passes
    over the source images with as many target images, per source but the unrelated one. The linear
    probe (one feature pass) is not counted."""
    from medchain.data.sources import MEDMNIST_INFO
    from medchain.experiments.transfer_pairs import DIGITS_TRAIN

    rels = list(p["relations"])
    if p["pair"] == "ct_detection":
        n_src, n_tgt = n_train_images("simulated", p["source_n"]), n_train_images("simulated", p["target_n"])
        sizes = {"similar": n_src, "same_task": n_src, "unrelated": DIGITS_TRAIN}
        inst = p.get("target_institutions") or p["target_sites"]
    elif p["pair"] == "retina_referable":
        counts = MEDMNIST_INFO["retinamnist"]["n_samples"]
        pool = int(counts["train"]) + int(counts["val"])
        n_src, n_tgt = round(0.8 * p["source_share"] * pool), round(0.9 * (1 - p["source_share"]) * pool)
        sizes = {"similar": n_src, "same_task": n_src, "unrelated": n_train_images("simulated", p["source_n"])}
        inst = p.get("target_institutions") or 2
    else:
        return None
    methods = set(p["methods"])
    chain_arms = 1 + sum(len(methods & {"warm_start", "l2sp"}) for _ in rels)
    pooled = [r for r in rels if r != "unrelated"] if "pooled" in methods else []
    pooled_epochs = p.get("pooled_epochs") or p["source_rounds"] * p["source_local_epochs"]
    target = 0.0
    for frac in p["fractions"]:
        per_inst = max(1, round(n_tgt * float(frac) / inst))
        epochs = max(1, math.ceil(p["min_local_steps"] / math.ceil(per_inst / p["batch_size"])))
        target += p["rounds"] * epochs * per_inst * inst
    seeds = _seeds(p)
    return Work(sum(sizes[r] for r in rels) * p["source_rounds"] * p["source_local_epochs"]
                + seeds * chain_arms * target
                + seeds * len(p["fractions"]) * sum(2 * sizes[r] * pooled_epochs for r in pooled),
                len(rels) * p["source_rounds"] + seeds * chain_arms * len(p["fractions"]) * p["rounds"], inst)


def _work_04(p: dict) -> Work | None:
    """Per seed and setting: FedAvg (rounds × local_epochs passes), FedPer and FedBN (personal_rounds,
    or rounds from scratch), fine-tuning of all layers and of the head, once per selection metric
    (2), and local-only (rounds × local_epochs epochs)."""
    n = n_train_images(p["source"], p.get("sim_n"))
    if n is None:
        return None
    le = p["local_epochs"]
    personal = p["personal_rounds"] if p.get("local_mask_from", "global") == "global" else p["rounds"]
    passes = 2 * p["rounds"] * le + 2 * personal * le + 2 * (p["finetune_epochs"] + p["head_epochs"])
    runs = _seeds(p) * len(p["settings"])
    return Work(runs * n * passes, runs * (p["rounds"] + 2 * personal), p["institutions"])


#: notebook file stem → its cost model (parameters → Work, or None where the data size is unknown)
COST_MODELS = {"01_centralized_vs_collaborative": _work_01, "02_partial_update_privacy": _work_02,
               "03_cross_chain_transfer": _work_03, "04_personalization": _work_04}


def measured_rates(results_dir: Path = BENCH_RESULTS) -> dict:
    """The measured figures an estimate divides by: training images per CPU second of the `cnn`
    (benchmarks/results/training.json, medchain's own loop, one thread) and chain transactions per
    second of the embedded chain (chain.json). Raises FileNotFoundError naming the benchmark to run."""
    def load(name: str, bench: str) -> dict:
        path = Path(results_dir) / name
        if not path.is_file():
            raise FileNotFoundError(f"no {path}: run `python benchmarks/{bench}` to measure it")
        return json.loads(path.read_text())
    training = load("training.json", "bench_training.py")
    chain = load("chain.json", "bench_chain.py")
    return {"train_images_per_s": float(training["train"]["medchain_train_epochs"]["images_per_cpu_s"]),
            "chain_tx_per_s": float(chain["tx_rate_eth_tester"]["tx_per_s"])}


def work_seconds(work: Work, rates: dict) -> float:
    """Seconds of one core: training image-passes at the measured rate plus, per chain round, two
    transactions per member (update, attestation) at the measured transaction rate."""
    return (work.train_images / rates["train_images_per_s"]
            + work.chain_rounds * 2 * work.institutions / rates["chain_tx_per_s"])


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


def estimate(books: dict[str, Path], keys: list[str], parameters: dict | None = None,
             rates: dict | None = None) -> list[dict]:
    """One row per selected notebook: {notebook, work (Work or None), seconds (None: no estimate)}."""
    rates = measured_rates() if rates is None else rates
    rows = []
    for key in keys:
        model, work = COST_MODELS.get(books[key].stem), None
        if model is not None:
            try:
                work = model({**notebook_defaults(books[key]), **(parameters or {})})
            except (KeyError, TypeError, ValueError, AttributeError):   # a renamed or mistyped parameter:
                work = None                                           # the run itself reports it
        rows.append({"notebook": books[key].name, "work": work,
                     "seconds": None if work is None else work_seconds(work, rates)})
    return rows


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def format_estimate(rows: list[dict], rates: dict, jobs: int = 1) -> str:
    """The estimate as printed before a full run: per notebook and in total, in hours of one core,
    and the wall time with ``jobs`` notebooks at once."""
    lines = [f"estimated cost of this run (training at {rates['train_images_per_s']:.0f} images/s per core, "
             f"measured for the cnn; chain at {rates['chain_tx_per_s']:.0f} transactions/s; evaluation "
             "not counted):"]
    known = []
    for r in rows:
        w = r["work"]
        if w is None:
            lines.append(f"  {r['notebook']}: no estimate (data size unknown, or no cost model)")
            continue
        known.append(r["seconds"])
        extra = f", plus {w.attack_steps:,} attack steps (not timed)" if w.attack_steps else ""
        lines.append(f"  {r['notebook']}: ~{_hours(r['seconds'])} of one core ({w.train_images / 1e6:.1f} M "
                     f"training images, {w.chain_rounds} chain rounds{extra})")
    if known:
        total = sum(known)
        wall = max(total / max(1, min(jobs, len(known))), max(known))
        lines.append(f"  total: ~{_hours(total)} of one core; with --jobs {jobs}: at least ~{_hours(wall)} "
                     "(--quick runs in minutes)")
    return "\n".join(lines)

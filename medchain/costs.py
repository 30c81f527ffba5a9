"""Cost of a full `medchain reproduce` run, estimated from the notebooks' parameters and the
measured benchmark rates, printed before a long run starts (moved out of medchain.reproduce)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from medchain.reproduce import notebook_defaults
from medchain.results import REPO

#: Share of a simulated data set in its train split (simulate_ct's default split 0.7 / 0.1 / 0.2).
SIM_TRAIN_FRACTION = 0.7
#: Seeds a notebook runs in full mode when its ``seeds`` parameter is None ([0..4]).
DEFAULT_SEEDS = 5
BENCH_RESULTS = REPO / "benchmarks" / "results"


@dataclass
class Work:
    """What one notebook run costs, counted from its parameters: ``train_images`` image-passes of
    training (forward + backward of one image; all seeds), ``chain_rounds`` collaborative rounds on a
    chain with ``institutions`` members each, ``attack_steps`` gradient-inversion steps (one image;
    timed at benchmarks/bench_training.py's inversion rate). Evaluation is not counted."""
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
    baseline_epochs each."""
    n = n_train_images(p["source"], p.get("sim_n"))
    if n is None:
        return None
    passes = p["rounds"] * p["local_epochs"]
    base = passes if p.get("baseline_epochs") is None else p["baseline_epochs"]
    runs = _seeds(p) * len(p["partitions"])
    methods = len(p.get("methods") or ["fedavg"])
    return Work(runs * n * (passes * (methods + bool(p.get("with_reference"))) + 2 * base),
                runs * p["rounds"] * methods, p["institutions"])


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
    (benchmarks/results/training.json, medchain's own loop, one thread), its gradient-inversion
    steps per CPU second (same file; absent from older files: attack steps are then not timed) and
    chain transactions per second of the embedded chain (chain.json). Raises FileNotFoundError
    naming the benchmark to run."""
    def load(name: str, bench: str) -> dict:
        path = Path(results_dir) / name
        if not path.is_file():
            raise FileNotFoundError(f"no {path}: run `python benchmarks/{bench}` to measure it")
        return json.loads(path.read_text())
    training = load("training.json", "bench_training.py")
    chain = load("chain.json", "bench_chain.py")
    rates = {"train_images_per_s": float(training["train"]["medchain_train_epochs"]["images_per_cpu_s"]),
             "chain_tx_per_s": float(chain["tx_rate_eth_tester"]["tx_per_s"])}
    if "attack" in training:
        rates["attack_steps_per_s"] = float(training["attack"]["steps_per_cpu_s"])
    return rates


def work_seconds(work: Work, rates: dict) -> float:
    """Seconds of one core: training image-passes at the measured rate plus, per chain round, two
    transactions per member (update, attestation) at the measured transaction rate, plus attack
    steps at the measured inversion rate where ``rates`` has one."""
    attack = work.attack_steps / rates["attack_steps_per_s"] if "attack_steps_per_s" in rates else 0.0
    return (work.train_images / rates["train_images_per_s"]
            + work.chain_rounds * 2 * work.institutions / rates["chain_tx_per_s"] + attack)


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
    attack = (f"; attacks at {rates['attack_steps_per_s']:.0f} steps/s" if "attack_steps_per_s" in rates else "")
    lines = [f"estimated cost of this run (training at {rates['train_images_per_s']:.0f} images/s per core, "
             f"measured for the cnn; chain at {rates['chain_tx_per_s']:.0f} transactions/s{attack}; "
             "evaluation not counted):"]
    known = []
    for r in rows:
        w = r["work"]
        if w is None:
            lines.append(f"  {r['notebook']}: no estimate (data size unknown, or no cost model)")
            continue
        known.append(r["seconds"])
        timed = "" if "attack_steps_per_s" in rates else " (not timed)"
        extra = f", {w.attack_steps:,} attack steps{timed}" if w.attack_steps else ""
        lines.append(f"  {r['notebook']}: ~{_hours(r['seconds'])} of one core ({w.train_images / 1e6:.1f} M "
                     f"training images, {w.chain_rounds} chain rounds{extra})")
    if known:
        total = sum(known)
        wall = max(total / max(1, min(jobs, len(known))), max(known))
        lines.append(f"  total: ~{_hours(total)} of one core; with --jobs {jobs}: at least ~{_hours(wall)} "
                     "(--quick runs in minutes)")
    return "\n".join(lines)

"""medchain's training and evaluation loops against a bare PyTorch loop of the same model, measured
side by side in one run, plus the start-up cost of the `medchain` command.

Writes benchmarks/results/training.json:
- images/s of a bare PyTorch training loop (`cnn`, batch 32, Adam, one epoch per fresh optimizer,
  data already a float tensor) in contiguous and channels_last memory format, with Adam's default,
  foreach and fused implementations; the reference is the channels_last loop with default Adam;
- images/s of `medchain.training.train_epochs` at the same settings (it converts the uint8 images
  itself, as every caller does);
- images/s of a bare inference loop (`torch.inference_mode`, channels_last, batch 1024) against
  `training.predict_proba` and `training.evaluate` (which adds the scikit-learn metrics);
- gradient-inversion steps per second: Inverting Gradients (mask-aware, Adam) against the update
  the protocol posts for one image with the `cnn` (medchain.experiments.posted_update.protocol_case,
  default task: full upload), the attack notebook 02 runs per defence and image (the full-run cost
  estimate, medchain.costs, divides its attack steps by this rate);
- ratios medchain / bare; `medchain --help` and `medchain --version` wall time (median of several
  runs) and peak RSS of each child process.

Variants run interleaved (one epoch of each, repeated), so a change in machine load hits them all;
each figure is the median over repeats, the best is kept too. Rates are given per second of
wall time and per second of the process's CPU time: on a shared CPU the wall rates drift with
the other processes, the CPU rates much less, so the headline ratios are CPU-time ratios taken
per round (variants of one round ran back to back) and their median; wall-time ratios and the
ratios of the best rounds are reported next to them. The load average is recorded.

    python benchmarks/bench_training.py [--out FILE] [--n 1024] [--repeats 5] [--threads 1] [--compile]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medchain import training
from medchain.data.types import ImageSet
from medchain.models import build_model
from medchain.results import git_commit, versions

BATCH, LR, SEED, N_CLASSES = 32, 1e-3, 0, 3


def random_set(n: int, seed: int) -> ImageSet:
    """n random 28×28 grey images with 3 classes (throughput does not depend on the content)."""
    rng = np.random.default_rng(seed)
    return ImageSet(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                    rng.integers(0, N_CLASSES, n).astype(np.int64))


def bare_trainer(data: ImageSet, channels_last: bool, impl: str, compile_model: bool = False):
    """A bare PyTorch loop: returns epoch() -> images trained, on its own model."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model("cnn", 1, N_CLASSES, SEED).to(memory_format=fmt)
    x = training.to_tensor(data.images).contiguous(memory_format=fmt)
    y = torch.from_numpy(data.labels)
    step_fn = torch.compile(model) if compile_model else model
    kw = {"foreach": True} if impl == "foreach" else {"fused": True} if impl == "fused" else {}
    gen = torch.Generator().manual_seed(SEED)
    model.train()

    def epoch() -> int:
        opt = torch.optim.Adam(model.parameters(), lr=LR, **kw)
        perm = torch.randperm(len(y), generator=gen)
        n = 0
        for start in range(0, len(y), BATCH):
            idx = perm[start:start + BATCH]
            loss = F.cross_entropy(step_fn(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += len(idx)
        return n
    return epoch


def medchain_trainer(data: ImageSet):
    model = build_model("cnn", 1, N_CLASSES, SEED)
    calls = iter(range(10 ** 9))

    def epoch() -> int:
        cfg = training.TrainConfig(epochs=1, batch_size=BATCH, lr=LR, optimizer="adam", seed=next(calls))
        return training.train_epochs(model, data, cfg)["steps"] * BATCH
    return epoch


def bare_eval(data: ImageSet, batch: int = 1024):
    model = build_model("cnn", 1, N_CLASSES, SEED).to(memory_format=torch.channels_last).eval()

    def run() -> int:
        out = []
        with torch.inference_mode():
            for s in range(0, len(data), batch):
                xb = training.to_tensor(data.images[s:s + batch]).contiguous(memory_format=torch.channels_last)
                out.append(torch.softmax(model(xb), dim=1).double().numpy())
        np.concatenate(out)
        return len(data)
    return run


def medchain_eval(data: ImageSet, fn):
    model = build_model("cnn", 1, N_CLASSES, SEED)

    def run() -> int:
        fn(model, data)
        return len(data)
    return run


def attack_steps(steps: int = 20):
    """Inverting Gradients on the posted update of one image (see the module docstring): returns
    run() -> attack steps done."""
    from medchain.attacks import invert
    from medchain.experiments.posted_update import protocol_case
    from medchain.protocol import CollabConfig

    one = random_set(1, 2)
    case = protocol_case(one.images, one.labels, model=build_model("cnn", 1, N_CLASSES, SEED),
                         cfg=CollabConfig(model="cnn", batch_size=BATCH), num_classes=N_CLASSES)

    def run() -> int:
        invert(case.payload, case, "ig", "mask_aware", steps=steps, seed=0, tv=1e-1)
        return steps
    return run


def measure(variants: dict, repeats: int) -> dict:
    """One untimed warm-up call of each variant, then `repeats` interleaved rounds. Rates are
    images per second of wall time and per second of this process's CPU time (with one torch
    thread the CPU figure is what the loop would reach alone; other processes only inflate the
    wall time)."""
    for fn in variants.values():
        fn()
    wall, cpu = {k: [] for k in variants}, {k: [] for k in variants}
    for _ in range(repeats):
        for k, fn in variants.items():
            t0, c0 = time.perf_counter(), time.process_time()
            n = fn()
            wall[k].append(n / (time.perf_counter() - t0))
            cpu[k].append(n / (time.process_time() - c0))
    return {k: {"images_per_cpu_s": statistics.median(cpu[k]), "best_cpu": max(cpu[k]), "all_cpu": cpu[k],
                "images_per_s": statistics.median(wall[k]), "best": max(wall[k]), "all": wall[k]}
            for k in variants}


def ratio(a: dict, b: dict) -> dict:
    """a / b in CPU-time rates (the headline) and wall-time rates: median of the per-round
    ratios, and the ratio of the best rounds."""
    def med(x, y):
        return statistics.median(p / q for p, q in zip(a[x], b[x]))
    return {"cpu_median_of_rounds": med("all_cpu", "all_cpu"), "cpu_of_best": a["best_cpu"] / b["best_cpu"],
            "wall_median_of_rounds": med("all", "all"), "wall_of_best": a["best"] / b["best"]}


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("medchain")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "import sys; from medchain.cli import main; sys.exit(main())"]


# Runs in a small separate interpreter: a child forked straight from this benchmark (torch loaded)
# would report this process's peak RSS, since Linux carries the pre-exec high-water mark over.
_LAUNCHER = """
import json, os, subprocess, sys, time
cmd, repeats = json.loads(sys.argv[1]), int(sys.argv[2])
walls, rss = [], []
for _ in range(repeats):
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    walls.append(time.perf_counter() - t0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(cmd)} exited {os.waitstatus_to_exitcode(status)}: {err.decode()}")
    rss.append(usage.ru_maxrss / 1024)
print(json.dumps({"walls": walls, "rss_mb": rss}))
"""


def time_cli(args: list[str], repeats: int) -> dict:
    """Median wall time and peak RSS (os.wait4, per child) of `medchain <args>`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, json.dumps(_cli() + args), str(repeats)],
                          capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"timing medchain {' '.join(args)} failed: {proc.stderr}")
    got = json.loads(proc.stdout)
    return {"wall_s_median": statistics.median(got["walls"]), "wall_s_all": got["walls"],
            "peak_rss_mb_max": max(got["rss_mb"]), "repeats": repeats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "training.json")
    ap.add_argument("--n", type=int, default=1024, help="training images per epoch (default 1024)")
    ap.add_argument("--n-eval", type=int, default=2048, help="evaluation images (default 2048)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cli-repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", action="store_true",
                    help="also time a torch.compile'd bare loop (compilation takes a minute or more)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start, load_start = time.perf_counter(), os.getloadavg()
    train, test = random_set(args.n, 0), random_set(args.n_eval, 1)

    out = {"benchmark": "medchain training/evaluation loops vs a bare PyTorch loop; CLI start-up",
           "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "versions": versions(), "commit": git_commit(),
           "settings": {"model": "cnn", "in_chans": 1, "n_classes": N_CLASSES, "image": "28x28",
                        "batch_size": BATCH, "optimizer": "adam", "lr": LR, "n_train": args.n,
                        "n_eval": args.n_eval, "repeats": args.repeats},
           "load_average_start": load_start}

    train_variants = {
        "bare_contiguous": bare_trainer(train, False, "default"),
        "bare_channels_last": bare_trainer(train, True, "default"),
        "bare_channels_last_foreach": bare_trainer(train, True, "foreach"),
        "bare_channels_last_fused": bare_trainer(train, True, "fused"),
        "medchain_train_epochs": medchain_trainer(train),
    }
    if args.compile:
        t0 = time.perf_counter()
        fn = bare_trainer(train, True, "default", compile_model=True)
        fn()
        out["compile_first_epoch_s"] = time.perf_counter() - t0
        train_variants["bare_channels_last_compiled"] = fn
    out["train"] = measure(train_variants, args.repeats)
    out["eval"] = measure({"bare_inference": bare_eval(test),
                           "medchain_predict_proba": medchain_eval(test, training.predict_proba),
                           "medchain_evaluate": medchain_eval(test, training.evaluate)}, args.repeats)
    att = measure({"inverting_gradients": attack_steps()}, args.repeats)["inverting_gradients"]
    out["attack"] = {"unit": "attack steps (one image, cnn)",
                     **{k.replace("images_per", "steps_per"): v for k, v in att.items()}}
    tr, ev = out["train"], out["eval"]
    pairs = {"train_medchain_vs_bare_channels_last": (tr, "medchain_train_epochs", "bare_channels_last"),
             "train_medchain_vs_bare_contiguous": (tr, "medchain_train_epochs", "bare_contiguous"),
             "predict_proba_vs_bare_inference": (ev, "medchain_predict_proba", "bare_inference"),
             "evaluate_vs_bare_inference": (ev, "medchain_evaluate", "bare_inference")}
    out["ratios"] = {k: ratio(d[a], d[b]) for k, (d, a, b) in pairs.items()}
    out["cli"] = {"help": time_cli(["--help"], args.cli_repeats),
                  "version": time_cli(["--version"], args.cli_repeats)}
    out["load_average_end"] = os.getloadavg()
    out["benchmark_wall_s"] = time.perf_counter() - t_start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({"train_images_per_cpu_s_and_wall_s": {k: (round(v["images_per_cpu_s"]), round(v["images_per_s"]))
                                                           for k, v in tr.items()},
                      "eval_images_per_cpu_s_and_wall_s": {k: (round(v["images_per_cpu_s"]), round(v["images_per_s"]))
                                                          for k, v in ev.items()},
                      "attack_steps_per_cpu_s": round(out["attack"]["steps_per_cpu_s"], 1),
                      "ratios": {k: {a: round(x, 3) for a, x in v.items()} for k, v in out["ratios"].items()},
                      "cli": {k: (round(v["wall_s_median"], 3), round(v["peak_rss_mb_max"]))
                              for k, v in out["cli"].items()},
                      "load": [load_start[0], out["load_average_end"][0]],
                      "wall_s": round(out["benchmark_wall_s"], 1)}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

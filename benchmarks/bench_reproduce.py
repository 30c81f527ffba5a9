"""Quick-mode reproduction time (issue 13: ``medchain reproduce --quick`` ≤ 3 minutes on 2 cores).
Writes benchmarks/results/reproduce_quick.json.

    python benchmarks/bench_reproduce.py                 # all four notebooks, one at a time
    python benchmarks/bench_reproduce.py --out /tmp/r.json

Runs ``python -m medchain reproduce --quick --jobs 1 --no-progress`` in a fresh process with an
empty run cache (a cold run: nothing reused from an earlier one) into a temporary folder, and
records its wall seconds, the CPU seconds of it and its kernels (user + system), each notebook's
seconds (papermill's duration of the executed copy) and the 1-minute load average every 10 s: on a
shared machine the wall time mostly measures the other jobs, the CPU seconds do not.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load_sampler(samples: list, stop: threading.Event, every_s: float = 10.0) -> None:
    while True:
        samples.append(round(os.getloadavg()[0], 2))
        if stop.wait(every_s):
            return


def measure(jobs: int = 1) -> dict:
    """One cold quick reproduction: wall / CPU seconds, per-notebook seconds, load averages."""
    with tempfile.TemporaryDirectory(prefix="bench_reproduce_") as tmp:
        out, cache = Path(tmp) / "out", Path(tmp) / "cache"
        env = {**os.environ, "MEDCHAIN_RUN_CACHE": str(cache), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        cmd = [sys.executable, "-m", "medchain", "reproduce", "--quick", "--jobs", str(jobs), "--no-progress",
               "--out", str(out)]
        samples, stop = [], threading.Event()
        sampler = threading.Thread(target=_load_sampler, args=(samples, stop), daemon=True)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        sampler.start()
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        stop.set()
        sampler.join()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise RuntimeError(f"reproduce --quick failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        notebooks = {}
        for path in sorted(out.glob("[0-9][0-9]_*/[0-9][0-9]_*.ipynb")):
            meta = json.loads(path.read_text())["metadata"].get("papermill", {})
            notebooks[path.stem] = round(float(meta.get("duration") or float("nan")), 1)
    return {"wall_s": round(wall, 1),
            "cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1),
            "notebook_s": notebooks, "load_average_1min_samples": samples,
            "load_average_1min_mean": round(sum(samples) / len(samples), 2) if samples else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=1, help="notebooks at once (default 1, as measured for issue 13)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "reproduce_quick.json")
    args = ap.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "medchain", "notebooks"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip())
    result = {"benchmark": "reproduce_quick", "command": f"medchain reproduce --quick --jobs {args.jobs} --no-progress",
              "run_cache": "cold (empty folder)", "target_wall_s": 180, "commit": commit, "dirty": dirty,
              "machine": platform.machine(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
              "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **measure(args.jobs)}
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    if "before" in previous:            # the measurement this one is compared with stays recorded
        result["before"] = previous["before"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("wall_s", "cpu_s", "notebook_s", "load_average_1min_mean")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

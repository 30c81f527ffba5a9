"""What a node reports: one :class:`RoundRecord` per closed round, its :class:`NodeResult`, the
ACC of the global model on its validation split (:func:`val_accuracy`), and the metrics file (JSON
lines: "ready", "round", "drill" and "final" events) that :class:`NodeReporting` writes."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass

import numpy as np

from medchain.node import procstats
from medchain.params import load_flat
from medchain.training import predict_proba

log = logging.getLogger("medchain.node")


@dataclass
class RoundRecord:
    """One closed round as this node saw it. acc: the new global model's ACC on the node's own
    validation split; submitted: whether this node's update is in the round."""
    round: int
    digest: str
    acc: float
    n_updates: int
    refused: int
    submitted: bool
    train_s: float
    chain_s: float
    wait_s: float
    t: float            # seconds since the node started


@dataclass
class NodeResult:
    address: str
    index: int
    ledger: str
    final_digest: str
    rounds: list[RoundRecord]
    replayed_at_start: int
    ready_s: float | None        # process start → set up (task read, data loaded, model built), ready to train
    startup_s: float | None      # process start → first training step
    wall_s: float
    timings: dict
    peak_rss_mb: float
    startup_cpu_s: float | None = None   # CPU seconds (user + system) this process used up to its first training step
    pss_mb: float | None = None          # proportional set size at the end (shared library pages split among sharers)


def val_accuracy(model, val) -> float:
    """ACC of ``model`` on ``val`` (NaN when empty), computed here rather than with
    :func:`medchain.training.evaluate`: a node logs only ACC, and evaluate's scikit-learn would load
    sklearn, scipy and pandas into every node process (~0.8 s CPU and ~100 MB)."""
    if len(val) == 0:
        return float("nan")
    pred = predict_proba(model, val).argmax(axis=1)
    return float(np.mean(pred == np.asarray(val.labels).ravel()))


class NodeReporting:
    """The reporting part of :class:`~medchain.node.institution.InstitutionNode` (a mixin: it reads
    the node's ledger, institution, timings and metrics_path)."""

    def _log_round(self, r: int, digest: bytes) -> None:
        inst = self.inst
        n_updates = self.ledger.submitted_count(r)          # chain reads first: a retry repeats them
        submitted = r in self._submitted or self.ledger.has_submitted(r, self.me)
        t = time.perf_counter()
        load_flat(inst.model, inst.global_vec, inst.layout)
        acc = val_accuracy(inst.model, self.data.val)
        self._eval_s += time.perf_counter() - t
        refused = inst.refused.get(r, [])
        tm = inst.timings
        train_s = tm["train"] + tm["encode"] - self._round_marks["train"]
        chain_s = self._chain_s - self._round_marks["chain"]
        wait_s = self._wait_s - self._round_marks["wait"]
        self._round_marks = {"train": tm["train"] + tm["encode"], "chain": self._chain_s, "wait": self._wait_s}
        rec = RoundRecord(r, digest.hex(), acc, n_updates, len(refused), submitted, round(train_s, 4),
                          round(chain_s, 4), round(wait_s, 4), round(time.perf_counter() - self._t0, 3))
        self.records.append(rec)
        note = "" if submitted else " (without my update)"
        ref = f", {len(refused)} refused" if refused else ""
        log.info("round %d closed (%d of %d): %d update(s)%s%s; global %s…; ACC %.4f on my val split (%d "
                 "images); train %.2f s, chain %.2f s, wait %.2f s", r, r + 1, self.cfg.rounds, n_updates, ref, note,
                 digest.hex()[:16], acc, len(self.data.val), train_s, chain_s, wait_s)
        self._write_metrics({"event": "round", **asdict(rec)})

    def _write_metrics(self, row: dict) -> None:
        if self.metrics_path is None:
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def _result(self) -> NodeResult:
        """The node's result once the task is over (logged, and written as the "final" event)."""
        digest = self.inst.global_digest().hex()
        timings = {**{k: round(v, 4) for k, v in self.inst.timings.items()},
                   "chain_total": round(self._chain_s, 4), "wait": round(self._wait_s, 4),
                   "eval": round(self._eval_s, 4)}
        res = NodeResult(self.me, self.data.index, self.ledger.address, digest, self.records,
                         self.replayed_at_start, self.ready_s,
                         None if self._first_train is None else round(self._first_train - self._process_start, 3),
                         round(time.perf_counter() - self._t0, 3), timings, round(procstats.peak_rss_mb(), 1),
                         None if self._first_train_cpu is None else round(self._first_train_cpu, 3), procstats.pss_mb())
        log.info("task over: final global %s…, %d round(s) logged, %.1f s, peak RSS %.0f MB", digest[:16],
                 len(self.records), res.wall_s, res.peak_rss_mb)
        self._write_metrics({"event": "final", **{k: v for k, v in asdict(res).items() if k != "rounds"}})
        return res

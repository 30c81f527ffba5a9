"""Deployment mode: each institution is its own process, talking to a real Ethereum JSON-RPC node.

The simulation (:func:`medchain.protocol.run_collaborative`) and this mode run the *same*
:class:`~medchain.protocol.Institution` code: ``train_round`` → ``upload`` → (round closes) →
``apply_round`` (replay from the chain, verify, aggregate) → attest. What this module adds is the
loop a separate process needs around it.

**One institution** (:func:`run_node`, ``medchain node``): reads the task parameters from the
ledger (``task().params`` → :class:`~medchain.protocol.CollabConfig`; the model layout id there
must match the model it builds), checks that its account is a member, then repeats until the task
ends: wait for the round to open, train, submit, wait for the round to close (calling
``close_round()`` itself once the deadline has passed and the quorum is reached — anyone may),
replay the round from the chain, attest the global digest, log one line with the ACC of the new
global model on its own validation split.

Rules this loop follows (all state it needs is on the chain):

* **Resume.** A (re)started node keeps no local state besides the optional blob cache: it replays
  every closed round from the chain (each payload inline or from the blob store, verified against
  its on-chain digest) to rebuild the global model, attests the closed rounds it has not attested,
  skips the rounds it already submitted to (``hasSubmitted``) and joins the open round.
* **Rejoin.** A member that was down while rounds closed without it (deadline + quorum) catches up
  the same way and takes part again from the next round it finds open.
* **Refused updates.** An update that the bytes on the chain make unusable (inline payload not
  matching its digest, a malformed payload, wrong layout or size, non-finite values, any value
  beyond ``max_abs_update``, a wrong ``n_values``) is left out of its round, logged, and the round's
  other updates are aggregated; every honest institution refuses the same updates, so all still
  compute the same model (:meth:`~medchain.protocol.Institution.read_round`). A round with no
  acceptable update leaves the global model unchanged, on every replica alike. Bounded-but-malicious
  updates are the job of the task's robust aggregation rule (:mod:`medchain.aggregation`; sample
  counts are self-reported, the robust rules do not trust them).
* **Data availability.** Before aggregating a closed round that holds a digest-only update (payload
  in the blob store; a round of inline payloads needs nothing) the node reports on chain, once, the
  senders whose payload it cannot fetch from the blob store and verify within ``availability_wait``
  seconds (usually none), then waits until the round's availability is sealed: by the last member's
  report, or after the deadline with the quorum (the node seals it itself then, as anyone may). An
  update that more than half of the other reporters listed is left out by every replica, even by
  one that has its bytes (contracts/TaskLedger.sol): a member that posts a digest and withholds the
  payload cannot stall the task, and, with an honest majority, cannot get an available update
  excluded either. A member that withholds its report stalls a task without a deadline, as one that
  withholds its update does; the remedy is the same (a deadline, or the admin removes it).
* **Attestations.** After attesting round r the node checks every attestation recorded so far for
  r (and, for late ones, for r − 1); any that differs stops it with
  :class:`~medchain.protocol.AttestationMismatchError` (never silently ignored; a member that
  attests garbage on purpose therefore halts the honest ones until the admin removes it; from its
  removal on, its attestations no longer count, so the honest nodes, restarted, go on). Members
  that have not attested (yet) are tolerated.
* **Sample counts and removed members.** The ledger refuses an update reporting 0 samples or more
  than the task's ``max_samples`` (fixed at deployment; the drill sets it to the largest share), and
  withdraws the open-round update of a member the admin removes; replicas leave such updates out
  (:meth:`~medchain.protocol.Institution.read_round`), so one member can neither stall a round with
  a zero weight nor outweigh the others with a huge count.
* **RPC outages.** Every chain call is retried with backoff by the client
  (:func:`medchain.chain.connection.with_retries`, about 4 s); beyond that the node logs
  ``RPC endpoint … unreachable …; retrying in …`` and keeps retrying the same idempotent step with
  backoff for up to ``rpc_timeout`` seconds, then stops with :class:`NodeError`. Nothing partial
  is kept: the next step re-reads the chain, so a restarted node resumes exactly where the chain is.

Bit-identical results across processes need the same torch build, CPU kind and torch thread count
(measured: 1 and 2 threads give different trained weights); nodes use 1 thread by default.

**Task set-up** (:func:`create_task`, ``medchain task create``) deploys, configures and starts a
ledger. **Local drill** (:class:`Deployment`, ``medchain simulate``): an anvil node, one task and N
``medchain node`` processes whose keys travel in environment variables, never on the command line.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np

log = logging.getLogger("medchain.node")

__all__ = ["NodeError", "NodeResult", "RoundRecord", "config_from_task", "task_params", "create_task",
           "run_node", "InstitutionNode", "load_institution", "byzantine_select", "ATTACKS", "BEHAVIOURS",
           "parse_drill",
           "Deployment", "NodeProcess", "rebuild_global", "KEY_ENV"]

KEY_ENV = "MEDCHAIN_NODE_KEY"           # environment variable the drill passes each node's key in
ATTACKS = ("signflip", "scale", "random", "huge")
#: Drill behaviours of a hostile member beyond its update's values (combine with '+'): try to submit
#: with 0 and with 2**64-1 samples, attest a garbage digest, post a digest whose payload it never stores.
BEHAVIOURS = ("zero-samples", "huge-samples", "garbage-attest", "withhold-blob")


class NodeError(RuntimeError):
    """A node cannot go on (not a member, wrong model, node unreachable for too long, ...)."""


# ------------------------------------------------------------------------------ task parameters
def config_from_task(task) -> "CollabConfig":  # noqa: F821
    """The :class:`CollabConfig` recorded in a ledger's ``task().params`` (keys that are not
    CollabConfig fields, such as ``layout_id``, are ignored)."""
    from medchain.protocol import CollabConfig

    params = dict(task.params)
    if "_unparsed" in params:
        raise NodeError(f"the task params of ledger {task.address} are not valid JSON; is this a "
                        "medchain task?")
    names = {f.name for f in fields(CollabConfig)}
    kw = {k: v for k, v in params.items() if k in names}
    if "rounds" not in kw:
        kw["rounds"] = int(task.n_rounds)
    cfg = CollabConfig(**kw)
    if cfg.rounds != task.n_rounds:
        raise NodeError(f"ledger {task.address}: params say rounds={cfg.rounds} but the ledger has "
                        f"{task.n_rounds} rounds")
    return cfg


def task_params(cfg, layout, n_classes: int, in_chans: int) -> dict:
    """What a task records on chain: the CollabConfig, the model layout id, classes and channels."""
    return {**cfg.to_dict(), "layout_id": layout.layout_id_hex, "n_classes": int(n_classes),
            "in_chans": int(in_chans)}


def create_task(w3, admin, cfg, members: list[str], *, n_classes: int, in_chans: int = 1,
                deadline_blocks: int = 0, quorum: int = 1, start: bool = True):
    """Deploy a TaskLedger for ``cfg`` (the initial model is ``cfg.model`` drawn from
    ``cfg.seed``), add ``members`` and start it. Returns the admin's LedgerClient.

    Everything is checked before the first transaction (no orphan contract on a bad argument):
    ``cfg`` (its own checks), member addresses (hex, EIP-55 checksum when mixed-case, no zero
    address, no repeats), quorum, deadline, classes, channels, and that the model builds. The
    ledger's cap on reported sample counts is ``cfg.max_samples`` (None: 2**64 − 1, logged as a
    warning with rule ``mean``, where one member could then outweigh all others)."""
    from medchain.chain import deploy_ledger
    from medchain.chain.ledger import member_address
    from medchain.models import build_model
    from medchain.params import Layout, digest_vector, model_vector

    if not members:
        raise ValueError("a task needs at least one member address")
    members = [member_address(m) for m in members]
    dup = sorted({m for m in members if members.count(m) > 1})
    if dup:
        raise ValueError(f"member address(es) listed more than once: {', '.join(dup)}")
    if not 1 <= quorum <= len(members):
        raise ValueError(f"quorum must be between 1 and the number of members ({len(members)}), got {quorum}")
    if not 0 <= int(deadline_blocks) < 2 ** 64:
        raise ValueError(f"deadline_blocks must be >= 0 (0: no deadline), got {deadline_blocks}")
    if int(n_classes) < 2 or int(in_chans) < 1:
        raise ValueError(f"need at least 2 classes and 1 channel, got {n_classes} and {in_chans}")
    if cfg.max_samples is None and cfg.aggregation.split(":")[0] == "mean":
        log.warning("no max_samples cap: with rule 'mean' a member reporting a huge sample count would "
                    "outweigh all others; pass --max-samples (the largest member's training set size)")
    model = build_model(cfg.model, in_chans, n_classes, cfg.seed)
    layout = Layout.from_module(model)
    init = digest_vector(model_vector(model, layout), layout)
    return deploy_ledger(w3, admin, cfg.model, init, cfg.rounds,
                         params=task_params(cfg, layout, n_classes, in_chans),
                         deadline_blocks=deadline_blocks, quorum=quorum, members=list(members), start=start,
                         max_samples=cfg.max_samples if cfg.max_samples is not None else 2 ** 64 - 1)


# ------------------------------------------------------------------------------ Byzantine drills
def byzantine_select(kind: str, scale: float | None = None, seed: int = 0
                     ) -> Callable[[np.ndarray, int], tuple[None, np.ndarray]]:
    """A ``select`` hook for :class:`~medchain.protocol.Institution` that replaces the honest update
    by a malicious one (for drills and tests): ``signflip`` (−scale·Δ, default scale 10), ``scale``
    (scale·Δ, default 10), ``random`` (Gaussian noise, std = scale × std(Δ), default 10), ``huge``
    (±scale on every coordinate, default 500: within the default max_abs_update of 1e3; above it
    the payload is refused at replay)."""
    if kind not in ATTACKS:
        raise ValueError(f"unknown attack {kind!r}; choose one of {ATTACKS}")
    s = float({"huge": 500.0}.get(kind, 10.0) if scale is None else scale)

    def select(delta: np.ndarray, r: int) -> tuple[None, np.ndarray]:
        d = delta.astype(np.float64)
        if kind == "signflip":
            v = -s * d
        elif kind == "scale":
            v = s * d
        elif kind == "random":
            rng = np.random.default_rng([seed, r])
            v = rng.normal(0.0, s * (float(d.std()) or 1e-3), d.shape)
        else:
            v = np.where(np.arange(d.size) % 2 == 0, s, -s)
        return None, v.astype(np.float32)
    return select


def parse_drill(spec: str) -> tuple[str | None, float | None, frozenset[str]]:
    """``"signflip:5+withhold-blob"`` → ``("signflip", 5.0, {"withhold-blob"})``: at most one value
    attack (:data:`ATTACKS`, optional scale) and any of :data:`BEHAVIOURS`, joined by '+'.
    ValueError naming the known kinds otherwise."""
    attack, scale, behaviours = None, None, set()
    for part in filter(None, (p.strip() for p in str(spec).split("+"))):
        kind, _, sc = part.partition(":")
        if kind in BEHAVIOURS and not sc:
            behaviours.add(kind)
            continue
        if kind not in ATTACKS:
            raise ValueError(f"unknown attack {kind!r}; choose one of {ATTACKS} (with an optional :SCALE) "
                             f"and/or {BEHAVIOURS}, joined by '+'")
        if attack is not None:
            raise ValueError(f"drill {spec!r} names two value attacks ({attack}, {kind}); give at most one")
        try:
            value = float(sc) if sc else None
        except ValueError:
            raise ValueError(f"drill {spec!r}: the scale {sc!r} is not a number") from None
        if value is not None and not (np.isfinite(value) and value > 0):
            raise ValueError(f"drill {spec!r}: the scale must be a finite number > 0")
        attack, scale = kind, value
    if attack is None and not behaviours:
        raise ValueError(f"empty drill {spec!r}; choose from {ATTACKS} and/or {BEHAVIOURS}")
    return attack, scale, frozenset(behaviours)


def check_byzantine(byzantine: dict[int, str], processes: int) -> dict[int, str]:
    """``byzantine`` ({index: "kind[:scale]"}) if every index names one of the ``processes``
    institutions and every attack is known; ValueError naming the valid range otherwise (an index
    out of range would otherwise be ignored silently while the summary records the drill)."""
    out = {}
    for i, spec in byzantine.items():
        if not isinstance(i, (int, np.integer)) or not 0 <= int(i) < processes:
            raise ValueError(f"--byzantine index {i} is out of range: with {processes} process(es) the "
                             f"institutions are numbered 0..{processes - 1}")
        try:
            parse_drill(spec)                    # unknown kind: ValueError naming the known ones
        except ValueError as exc:
            raise ValueError(f"--byzantine {i}:{spec}: {exc}") from None
        out[int(i)] = str(spec)
    return out


# ------------------------------------------------------------------------------ data
def load_institution(source: str, scheme: str, institutions: int, index: int, *, alpha: float = 0.5,
                     fraction: float = 1.0, seed: int = 0):
    """Institution ``index``'s share of ``source`` split as the in-process simulation splits it
    (:func:`medchain.data.partition`). Returns ``(InstitutionData, n_classes, in_chans)``."""
    from medchain.data import load_dataset, partition

    ds = load_dataset(source)
    insts = partition(ds, None if scheme == "sites" else institutions, scheme, alpha=alpha,
                      fraction=fraction, seed=seed)
    if not 0 <= index < len(insts):
        raise ValueError(f"--institution-index must be in [0, {len(insts)}), got {index}")
    return insts[index], ds.n_classes, ds.n_channels


# ------------------------------------------------------------------------------ one institution
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


def _process_start_epoch() -> float:
    """When this process started (epoch seconds), from /proc; falls back to now."""
    try:
        stat = Path("/proc/self/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def _proc_peak_rss_mb(pid: int | None) -> float | None:
    """Peak resident memory (VmHWM) of another process, MB; None where /proc is unavailable."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    except (OSError, ValueError):
        pass
    return None


def _peak_rss_mb() -> float:
    """This process's peak resident memory (MB): VmHWM, which starts afresh at exec. (ru_maxrss
    keeps the high-water mark of the process that forked this one, e.g. a torch-loaded drill.)"""
    return _proc_peak_rss_mb(os.getpid()) or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cpu_s() -> float:
    """CPU seconds (user + system) used by this process so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _pss_mb() -> float | None:
    """This process's proportional set size (MB): its private pages plus its share of the pages it
    shares (torch's code with the other nodes), so summing it over processes counts memory once.
    None where /proc/self/smaps_rollup is unavailable."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def val_accuracy(model, val) -> float:
    """ACC of ``model`` on ``val`` (NaN when empty), computed here rather than with
    :func:`medchain.training.evaluate`: a node logs only ACC, and evaluate's scikit-learn would load
    sklearn, scipy and pandas into every node process (~0.8 s CPU and ~100 MB)."""
    from medchain.training import predict_proba

    if len(val) == 0:
        return float("nan")
    pred = predict_proba(model, val).argmax(axis=1)
    return float(np.mean(pred == np.asarray(val.labels).ravel()))


class InstitutionNode:
    """The loop of one institution process (see the module docstring for its rules).

    ledger: a :class:`medchain.chain.LedgerClient` acting as this institution's account.
    data: its private :class:`InstitutionData`, or a callable ``cfg -> (InstitutionData, n_classes)``
    called once the task's :class:`CollabConfig` is known (the split may depend on its seed).
    store: blob store (payloads above the task's ``max_inline_bytes`` go there). select: optional
    upload hook (Byzantine drills); by default, with ``theta_u < 1`` in the task params, the node
    uploads the partial update :func:`medchain.privacy.make_selector` (task params, the task's seed,
    its institution index) chooses — pass the same selector to the in-process simulation to compare.
    poll_interval: seconds between chain polls while waiting. rpc_timeout: how long the node keeps
    retrying an unreachable RPC endpoint before it stops. round_timeout: how long it waits for one
    round to close. availability_wait: how long it waits for a payload missing from the blob store
    before reporting it unavailable. metrics_path: JSON lines, one per closed round and a final one.
    hostile: drill behaviours (:data:`BEHAVIOURS`) this node acts out besides ``select``.
    """

    def __init__(self, ledger, data, n_classes: int | None = None, *, store=None, select=None,
                 poll_interval: float = 0.2, rpc_timeout: float = 120.0, round_timeout: float = 3600.0,
                 availability_wait: float = 5.0, metrics_path: str | Path | None = None,
                 hostile: frozenset[str] = frozenset()):
        self.ledger = ledger
        self.data, self.n_classes = data, n_classes
        self.store, self.select = store, select
        self.poll_interval = poll_interval
        self.rpc_timeout, self.round_timeout = rpc_timeout, round_timeout
        self.availability_wait = availability_wait
        self.hostile = frozenset(hostile)
        unknown = self.hostile - set(BEHAVIOURS)
        if unknown:
            raise ValueError(f"unknown drill behaviour(s) {sorted(unknown)}; choose from {BEHAVIOURS}")
        self._drilled: set[tuple[int, str]] = set()
        self._sealed: set[int] = set()          # rounds aggregated after their availability seal
        self.metrics_path = Path(metrics_path) if metrics_path else None
        self.me = ledger.account.address
        self.records: list[RoundRecord] = []
        self.inst = None
        self.cfg = None
        self.task = None
        self._pending_attest: tuple[int, bytes] | None = None
        self._reverted = 0
        self._last_digest: bytes | None = None
        self._started = False
        self._submitted: set[int] = set()
        self._deadlines: dict[int, int] = {}
        self._delta: tuple[int, np.ndarray] | None = None
        self._down_since: float | None = None
        self._outages = 0
        self._t0 = time.perf_counter()
        self._process_start = _process_start_epoch()
        self._first_train: float | None = None
        self._first_train_cpu: float | None = None
        self._round_marks = {"train": 0.0, "chain": 0.0, "wait": 0.0}
        self._chain_s = 0.0
        self._wait_s = 0.0
        self._eval_s = 0.0
        self._waiting_since: float | None = None
        self._last_wait_log = 0.0
        self.replayed_at_start = 0
        self.ready_s: float | None = None

    # -------------------------------------------------------------- resilience
    def _resilient(self, fn: Callable[[], Any]) -> Any:
        """Run one idempotent step; on an unreachable RPC endpoint retry it with backoff for up to
        rpc_timeout seconds (logged), then raise NodeError."""
        from medchain.chain.connection import node_label
        while True:
            t_step = time.monotonic()
            try:
                out = fn()
            except ConnectionError as exc:
                now = time.monotonic()
                if self._down_since is None:   # the outage began at the latest when this step did
                    self._down_since, self._outages = t_step, 0
                down = now - self._down_since
                label = node_label(self.ledger.w3)
                if down >= self.rpc_timeout:
                    raise NodeError(
                        f"the RPC endpoint {label} has been unreachable for {down:.0f} s (limit "
                        f"rpc_timeout={self.rpc_timeout:.0f} s); last error: {str(exc).rstrip('.')}. "
                        "This node keeps no state of its own: restart it when the endpoint is back and "
                        "it resumes from the chain, from whatever the chain node itself kept (a "
                        "development node killed without a clean stop keeps only its last state dump)"
                        ) from None
                delay = min(8.0, 0.5 * 2 ** self._outages, max(0.1, self.rpc_timeout - down))
                self._outages += 1
                log.warning("RPC endpoint %s unreachable (%s); retrying in %.1f s (down for %.0f s, giving "
                            "up after %.0f s)", label, str(exc).split(" (")[0][:120], delay, down,
                            self.rpc_timeout)
                time.sleep(delay)
                continue
            if self._down_since is not None:
                log.warning("RPC endpoint %s reachable again after %.1f s; resuming from the chain",
                            node_label(self.ledger.w3), time.monotonic() - self._down_since)
                self._down_since = None
            return out

    # -------------------------------------------------------------- set-up
    def _setup(self) -> None:
        from medchain.protocol import AttestationMismatchError, Institution

        self.task = task = self.ledger.task()
        self.cfg = cfg = config_from_task(task)
        if not self.ledger.is_member(self.me):
            raise NodeError(f"account {self.me} is not a member of the task at {self.ledger.address}; "
                            f"ask its admin ({task.admin}) to add it (addMember) before starting this node")
        if callable(self.data):
            self.data, self.n_classes = self.data(cfg)
        # with select None, Institution uploads the partial update the task's params ask for
        self.inst = inst = Institution(self.data, self.n_classes, cfg, self.ledger, self.store,
                                       select=self.select)
        want = task.params.get("layout_id")
        if want is None:
            log.warning("the task records no layout_id; checking the initial model digest only")
        elif want != inst.layout.layout_id_hex:
            raise NodeError(f"model layout mismatch: the task's model has layout id {want[:16]}…, this node "
                            f"built {cfg.model!r} with {self.data.train.n_channels} channel(s) and "
                            f"{self.n_classes} classes, layout id {inst.layout.layout_id_hex[:16]}…; check "
                            "--data (classes, channels, image size) and the medchain version")
        if inst.global_digest() != task.initial_model_digest:
            raise AttestationMismatchError(
                f"this node's initial {cfg.model!r} model (seed {cfg.seed}) has digest "
                f"{inst.global_digest().hex()[:16]}…, the task recorded {task.initial_model_digest.hex()[:16]}…")
        log.info("task %s: %s, %d rounds, rule %s, deadline %s, quorum %d; I am %s, institution %d "
                 "with %d training images", self.ledger.address, cfg.model, cfg.rounds, cfg.aggregation,
                 f"{task.round_deadline_blocks} blocks" if task.round_deadline_blocks else "none", task.quorum, self.me, self.data.index, len(self.data.train))

    # -------------------------------------------------------------- the state machine
    def _step(self) -> bool:
        """One idempotent step, decided from the chain; True when the task is over for this node."""
        from medchain.chain import AlreadySubmitted, RoundClosed, TransactionReverted
        from medchain.protocol import check_attestations
        inst, ledger = self.inst, self.ledger

        if self._pending_attest is not None:                 # attest a round already aggregated
            from medchain.chain import AlreadyAttested, RoundNotClosed
            r, digest = self._pending_attest
            attested = digest
            if "garbage-attest" in self.hostile:             # drill: attest a digest nobody computed
                import hashlib
                attested = hashlib.sha256(b"garbage-%d" % r).digest()
            try:
                ledger.attest(r, attested)
            except AlreadyAttested:                          # done before a restart or a dropped connection
                pass
            except RoundNotClosed:                           # it was closed when this node replayed it
                raise NodeError(
                    f"the chain lost blocks: round {r} of ledger {ledger.address} is open again although "
                    "this node replayed it closed (the chain node was restarted from an older state "
                    "dump). Restart this node: it rebuilds the global model from what the chain holds "
                    "now") from None
            except TransactionReverted as exc:
                self._reverted += 1
                if self._reverted > 5:
                    raise
                log.warning("round %d: my attestation reverted (%s); sending it again", r, exc)
                return False
            if attested != digest:
                self._drill(r, "garbage-attest", f"attested {attested.hex()[:16]}… instead of {digest.hex()[:16]}…")
            else:
                check_attestations(ledger, r, digest)
                if r >= 1 and self._last_digest is not None:     # late attestations of the round before
                    check_attestations(ledger, r - 1, self._last_digest)
            self._last_digest = digest
            self._pending_attest = None
            self._log_round(r, digest)
            return False

        r = inst.rounds_applied
        if r >= self.cfg.rounds:
            return True
        if not self._started:
            if not ledger.started():
                self._wait("the task to start")
                return False
            self._started = True
        cur = ledger.current_round()
        if cur < r:      # the chain is behind what this node replayed: it was restored from an older state
            raise NodeError(
                f"the chain lost blocks: ledger {ledger.address} is at round {cur} but this node already "
                f"replayed {r} round(s) from it (the chain node was restarted from an older state dump). "
                "Restart this node: it rebuilds the global model from what the chain holds now")
        if r - 1 in self._sealed and ledger.availability(r - 1)[1] == 0:   # I aggregated r-1 after its seal
            raise NodeError(
                f"the chain lost blocks: the availability of round {r - 1} of ledger {ledger.address} is no "
                "longer sealed although this node aggregated that round after its seal (the chain node was "
                "restarted from an older state dump). Restart this node: it rebuilds the global model from "
                "what the chain holds now")
        if r < cur:                                          # round r closed: replay it
            if not self._availability_sealed(r):
                return False
            digest = inst.apply_round(r)
            self._pending_attest = (r, digest)
            self._waiting_since = None
            return False
        if r not in self._submitted and ledger.has_submitted(r, self.me):
            self._submitted.add(r)
        if r not in self._submitted:                         # round r open, not submitted yet
            if self._delta is None or self._delta[0] != r:
                if self._first_train is None:
                    self._first_train, self._first_train_cpu = time.time(), _cpu_s()
                    log.info("first training step %.1f s after process start",
                             self._first_train - self._process_start)
                self._delta = (r, inst.train_round(r))
            try:
                self._drill_sample_counts(r)
                inst.upload(r, self._delta[1], withhold="withhold-blob" in self.hostile)
                if "withhold-blob" in self.hostile:
                    self._drill(r, "withhold-blob", "submitted a digest whose payload it stores nowhere")
                self._submitted.add(r)
                log.debug("round %d: update submitted", r)
            except RoundClosed:
                log.warning("round %d closed (deadline) before my update arrived; it goes on without it", r)
            except AlreadySubmitted:
                pass
            except TransactionReverted as exc:   # the state changed between simulation and inclusion
                self._reverted += 1
                if self._reverted > 5:
                    raise
                log.warning("round %d: my update was mined but reverted (%s); submitting it again", r, exc)
            return False
        if not ledger.has_submitted(r, self.me):             # the chain lost my update (older state)
            log.warning("round %d: my update is no longer on the chain (the chain node was restored from "
                        "an older state?); submitting it again", r)
            self._submitted.discard(r)
            return False
        self._maybe_close(r)                                 # submitted: wait for the round to close
        self._wait(f"round {r} to close")
        return False

    def _availability_sealed(self, r: int) -> bool:
        """Round r (closed) may be aggregated once its data availability is sealed on chain (at once
        if all its payloads are inline). Until then: post this node's report (the payloads it cannot
        fetch within availability_wait) unless the chain has it, seal the round when it is due
        (anyone may), and wait."""
        from medchain.chain import AlreadyReported, AlreadySealed, LedgerError, RoundNotClosed
        ledger = self.ledger
        if r not in self._sealed and not self.inst.needs_availability(r):
            return True
        self._sealed.add(r)
        if ledger.availability(r)[1]:
            return True
        if not ledger.has_reported_availability(r, self.me):
            try:
                missing = self.inst.report_availability(r, wait=self.availability_wait)
                log.info("round %d: availability reported (%s)", r,
                         f"missing: {', '.join(missing)}" if missing else "every payload fetched and verified")
            except (AlreadyReported, AlreadySealed):
                pass
            except RoundNotClosed:   # the chain node came back from an older state: the round is open again
                log.warning("round %d is open again (the chain node lost blocks); going back to it", r)
            return False
        reports, _ = ledger.availability(r)
        deadline = self.task.round_deadline_blocks
        # due: every active member reported (one was removed after the others reported), or the
        # deadline passed with the quorum; anyone may seal then
        due = reports >= len(ledger.members()) or (
            deadline and reports >= self.task.quorum and ledger.block_number() > ledger.round_close_block(r) + deadline)
        if due:
            try:
                ledger.seal_availability(r)
                log.info("round %d: availability sealed with %d report(s)", r, reports)
                return True
            except LedgerError as exc:           # someone else sealed it first
                log.debug("sealAvailability(%d) refused: %s", r, exc)
        self._wait(f"the other members' availability reports of round {r}")
        return False

    def _drill(self, r: int, action: str, outcome: str, refused: bool = False) -> None:
        """Log and record one drill action of a hostile node (metrics event "drill")."""
        log.warning("DRILL round %d: %s: %s", r, action, outcome)
        self._write_metrics({"event": "drill", "round": r, "action": action, "refused": refused,
                             "outcome": outcome})

    def _drill_sample_counts(self, r: int) -> None:
        """Drill: before its real update, try to submit one claiming 0 and one claiming 2**64-1
        samples (the ledger refuses both; recorded as refused)."""
        from medchain import codec
        from medchain.chain import LedgerError
        for action, n in (("zero-samples", 0), ("huge-samples", 2 ** 64 - 1)):
            if action not in self.hostile or (r, action) in self._drilled:
                continue
            delta = self._delta[1]
            payload = codec.encode_update(delta, self.inst.layout.layout_id, total_size=self.inst.layout.size)
            try:                                          # digest only: the count is what is tested
                self.ledger.submit_update(r, codec.digest(payload), delta.size, n)
                self._drill(r, action, f"n_samples={n} was ACCEPTED by the ledger")
                self._submitted.add(r)
            except LedgerError as exc:
                self._drill(r, action, f"refused by the ledger: {exc}", refused=True)
            self._drilled.add((r, action))

    def _wait(self, what: str) -> None:
        now = time.monotonic()
        if self._waiting_since is None:
            self._waiting_since = self._last_wait_log = now
        elif now - self._waiting_since > self.round_timeout:
            from medchain.chain import LedgerTimeout
            raise LedgerTimeout(f"waited {self.round_timeout:.0f} s for {what} on ledger {self.ledger.address}; "
                                "members may have stopped and the task has no deadline (or not enough "
                                "updates for its quorum)")
        elif now - self._last_wait_log > 30:
            self._last_wait_log = now
            log.info("still waiting for %s (%.0f s)", what, now - self._waiting_since)
        t = time.perf_counter()
        time.sleep(self.poll_interval)
        self._wait_s += time.perf_counter() - t

    def _maybe_close(self, r: int) -> None:
        """Close round r ourselves once its deadline has passed and the quorum is reached."""
        from medchain.chain import LedgerError
        if not self.task.round_deadline_blocks:
            return
        ledger = self.ledger
        if r not in self._deadlines:
            self._deadlines[r] = ledger.round_deadline_block(r)
        deadline = self._deadlines[r]
        if not deadline or ledger.block_number() <= deadline:
            return
        n = ledger.submitted_count(r)
        if n < self.task.quorum or ledger.round_close_block(r):
            return
        try:
            ledger.close_round()
            log.info("round %d: deadline block %d passed with %d update(s) (quorum %d); closed it",
                     r, deadline, n, self.task.quorum)
        except LedgerError as exc:   # someone else closed it first, or the next round is not due
            log.debug("close_round for round %d refused: %s", r, exc)

    def _log_round(self, r: int, digest: bytes) -> None:
        from medchain.params import load_flat
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

    def _warm_up(self) -> None:
        """Build one optimizer before the first round: torch imports torch._dynamo lazily on the
        first optimizer (seconds), which would otherwise land in round 0's training time (and
        could miss a round deadline)."""
        import torch

        from medchain.training import make_optimizer
        make_optimizer([torch.nn.Parameter(torch.zeros(1))], self.cfg.train_config())

    # -------------------------------------------------------------- run
    def run(self) -> NodeResult:
        self._resilient(self._setup)
        self._warm_up()
        self.ready_s = round(time.time() - self._process_start, 3)
        log.info("ready %.1f s after process start", self.ready_s)
        self._write_metrics({"event": "ready", "ready_s": self.ready_s})
        cur = self._resilient(lambda: self.ledger.current_round() if self.ledger.started() else 0)
        if cur > 0:
            log.info("resuming: %d closed round(s) on the chain; replaying them to rebuild the global "
                     "model", min(cur, self.cfg.rounds))
        self.replayed_at_start = min(cur, self.cfg.rounds)
        while True:
            tm = self.inst.timings
            busy0 = tm["train"] + tm["encode"] + tm["replay"] + self._wait_s + self._eval_s
            t = time.perf_counter()
            done = self._resilient(self._step)
            busy1 = tm["train"] + tm["encode"] + tm["replay"] + self._wait_s + self._eval_s
            self._chain_s += max(0.0, (time.perf_counter() - t) - (busy1 - busy0))
            if done:
                break
        digest = self.inst.global_digest().hex()
        timings = {**{k: round(v, 4) for k, v in self.inst.timings.items()},
                   "chain_total": round(self._chain_s, 4), "wait": round(self._wait_s, 4),
                   "eval": round(self._eval_s, 4)}
        res = NodeResult(self.me, self.data.index, self.ledger.address, digest, self.records,
                         self.replayed_at_start, self.ready_s,
                         None if self._first_train is None else round(self._first_train - self._process_start, 3),
                         round(time.perf_counter() - self._t0, 3), timings, round(_peak_rss_mb(), 1),
                         None if self._first_train_cpu is None else round(self._first_train_cpu, 3), _pss_mb())
        log.info("task over: final global %s…, %d round(s) logged, %.1f s, peak RSS %.0f MB", digest[:16],
                 len(self.records), res.wall_s, res.peak_rss_mb)
        self._write_metrics({"event": "final", **{k: v for k, v in asdict(res).items() if k != "rounds"}})
        return res


def run_node(rpc: str, ledger_address: str, account, data, n_classes: int | None = None, *, store=None, select=None,
             poll_interval: float = 0.2, rpc_timeout: float = 120.0, round_timeout: float = 3600.0,
             availability_wait: float = 5.0, metrics_path: str | Path | None = None,
             hostile: frozenset[str] = frozenset()) -> NodeResult:
    """Run one institution until the task ends (see the module docstring). ``account``: its signing
    account (e.g. :func:`medchain.chain.key_from_env`). ``data``: its InstitutionData, or a callable
    ``cfg -> (InstitutionData, n_classes)`` (see :class:`InstitutionNode`)."""
    from medchain.chain import LedgerClient, connect

    started = time.monotonic()
    while True:       # the endpoint may not be up yet: same patience as for an outage
        try:
            w3 = connect(rpc)
            break
        except ConnectionError as exc:
            if time.monotonic() - started >= rpc_timeout:
                raise NodeError(f"cannot reach the RPC endpoint for {rpc_timeout:.0f} s: {exc}") from None
            log.warning("RPC endpoint unreachable at start (%s); retrying in 1 s", str(exc).split(" (")[0][:120])
            time.sleep(1.0)
    # gas limit = 2 × the estimate: whether an update closes its round (and pays for opening the next)
    # depends on the other members' updates mined just before it; unused gas is not charged
    ledger = LedgerClient(w3, ledger_address, account, gas_margin=1.2)
    node = InstitutionNode(ledger, data, n_classes, store=store, select=select, poll_interval=poll_interval,
                           rpc_timeout=rpc_timeout, round_timeout=round_timeout,
                           availability_wait=availability_wait, metrics_path=metrics_path, hostile=hostile)
    return node.run()


# ------------------------------------------------------------------------------ observers
def rebuild_global(ledger, data, n_classes: int, *, store=None, until: int | None = None):
    """Rebuild the global model purely from the chain, as a (re)starting node does: an
    :class:`Institution` over a read-only ledger client replays every closed round (or the first
    ``until``). Returns the Institution (``global_vec``, ``global_digest()``, ``model``)."""
    from medchain.protocol import Institution

    task = ledger.task()
    cfg = config_from_task(task)
    inst = Institution(data, n_classes, cfg, ledger, store)
    if inst.global_digest() != task.initial_model_digest:
        raise NodeError("the rebuilt initial model does not match the task's initial-model digest")
    closed = min(ledger.current_round(), cfg.rounds) if task.started else 0
    inst.replay_closed(closed if until is None else min(until, closed))
    return inst


# ------------------------------------------------------------------------------ local drill
@dataclass
class NodeProcess:
    """One ``medchain node`` subprocess; its key travels in the environment variable KEY_ENV."""
    index: int
    account: Any
    argv: list[str]
    log_path: Path
    metrics_path: Path
    threads: int = 1
    proc: subprocess.Popen | None = None
    launched_at: float = 0.0
    launches: int = 0

    def start(self) -> "NodeProcess":
        env = {**os.environ, KEY_ENV: "0x" + bytes(self.account.key).hex(),
               "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads),
               "PYTHONUNBUFFERED": "1"}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_path, "ab")
        self.launched_at = time.time()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        logf.close()
        self.launches += 1
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL (a crash: no clean-up)."""
        if self.running:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]


class Deployment:
    """A local drill of deployment mode: one anvil node (one chain), one task, N institution
    processes (``medchain node``), each with its own key (passed in an environment variable).
    Used by ``medchain simulate``, the fault tests and the deployment benchmark.

    workdir: logs, metrics, the chain's state file and the blob store live there.
    block_time: anvil mines a block every block_time seconds besides one per transaction (needed
    for round deadlines, which count blocks; None: no interval mining unless deadline_blocks > 0,
    then 0.25 s). byzantine: {index: attack kind or "kind:scale"} for drills. node_args: extra
    ``medchain node`` arguments per index (they win over the defaults).
    """

    def __init__(self, processes: int, cfg, *, data: str, workdir: str | Path, partition: str = "iid",
                 alpha: float = 0.5, fraction: float = 1.0, deadline_blocks: int = 0, quorum: int | None = None,
                 block_time: float | None = None, chain_id: int = 31337, blobs: str | None = None,
                 byzantine: dict[int, str] | None = None, threads: int = 1, poll_interval: float = 0.2,
                 rpc_timeout: float = 120.0, persist_chain: bool = True,
                 node_args: dict[int, list[str]] | None = None):
        self.n, self.cfg = int(processes), cfg
        if self.n < 1:
            raise ValueError("need at least one institution process")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data, self.partition, self.alpha, self.fraction = data, partition, alpha, fraction
        self.deadline_blocks = int(deadline_blocks)
        self.quorum = int(quorum) if quorum is not None else self.n
        self.block_time = block_time if block_time is not None else (0.25 if self.deadline_blocks else None)
        self.chain_id = chain_id
        self.blobs = blobs or str(self.workdir / "blobs")
        self.byzantine = check_byzantine(byzantine or {}, self.n)
        self.threads, self.poll_interval, self.rpc_timeout = threads, poll_interval, rpc_timeout
        self.state_file = self.workdir / "chain-state.json" if persist_chain else None
        self.state_interval = 1          # anvil dumps its state every second: a SIGKILL loses <= ~1 s
        self.node_args = dict(node_args or {})
        self.chain = None
        self.port: int | None = None
        self.w3 = None
        self.ledger = None
        self.accounts: list = []
        self.nodes: list[NodeProcess] = []
        self.timeline: dict[str, float] = {}

    # -------------------------------------------------------------- chain
    def _anvil(self, port: int | None):
        from medchain.chain.anvil import AnvilNode
        extra = ["--mixed-mining"] if self.block_time else []
        return AnvilNode(self.chain_id, port=port, state_file=self.state_file, block_time=self.block_time,
                         extra_args=extra, state_interval=self.state_interval if self.state_file else None)

    def start_chain(self) -> "Deployment":
        self.chain = self._anvil(None).start()
        self.port = self.chain.port
        from medchain.chain import connect
        self.w3 = connect(self.chain.url)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop_chain(self) -> None:
        """Stop the node (SIGINT: anvil writes its --state file)."""
        if self.chain is not None:
            self.chain.stop()

    def kill_chain(self) -> None:
        """SIGKILL the node (a crash: no final state dump; what survives is its last periodic dump)."""
        if self.chain is not None:
            self.chain.kill()

    def restart_chain(self) -> None:
        """Start the node again on the same port from its state file."""
        if self.state_file is None:
            raise ValueError("restart_chain needs persist_chain=True (anvil --state)")
        self.chain = self._anvil(self.port).start()

    # -------------------------------------------------------------- task and processes
    def create_task(self, in_chans: int, n_classes: int, *, start: bool = False) -> str:
        """Deploy the task with N members (dev accounts 1..N; account 0 is the admin). Not started
        unless ``start``: :meth:`start_task` once the processes are ready, so that round 0 does not
        race their start-up."""
        from dataclasses import replace

        from medchain.chain import dev_accounts
        if self.cfg.max_samples is None:   # cap the reported sample counts at the largest share
            self.cfg = replace(self.cfg, max_samples=self.largest_share())
        self.accounts = dev_accounts(self.w3, self.n + 1)
        admin, members = self.accounts[0], self.accounts[1:]
        self.ledger = create_task(self.w3, admin, self.cfg, [m.address for m in members], n_classes=n_classes,
                                  in_chans=in_chans, deadline_blocks=self.deadline_blocks, quorum=self.quorum,
                                  start=start)
        self.nodes = [self._node_process(i) for i in range(self.n)]
        return self.ledger.address

    def largest_share(self) -> int:
        """Training images of the largest institution in the drill's split (the split the nodes
        make with the task's seed): the default cap on the sample count an update may report."""
        from medchain.data import load_dataset, partition as split
        insts = split(load_dataset(self.data), None if self.partition == "sites" else self.n, self.partition,
                      alpha=self.alpha, fraction=self.fraction, seed=self.cfg.seed)
        return max(1, max(len(d.train) for d in insts))

    def ready(self, i: int) -> bool:
        """Whether node i reported ready (set up, waiting to train) since its latest launch."""
        return sum(1 for m in self.nodes[i].metrics() if m["event"] == "ready") >= self.nodes[i].launches

    def start_task(self, ready_timeout: float = 300.0) -> None:
        """Wait until every launched node is ready, then open round 0."""
        self.wait_for(lambda: all(self.ready(p.index) for p in self.nodes if p.proc is not None),
                      ready_timeout, "the institution processes to be ready")
        self.ledger.start()
        self.timeline["started"] = time.time()

    def _node_process(self, i: int) -> NodeProcess:
        argv = [sys.executable, "-m", "medchain",
                "node", "--rpc", self.url, "--ledger", self.ledger.address, "--key-env", KEY_ENV,
                "--data", self.data, "--partition", self.partition, "--institutions", str(self.n),
                "--institution-index", str(i), "--alpha", str(self.alpha), "--fraction", str(self.fraction),
                "--blobs", self.blobs, "--metrics", str(self.workdir / f"node-{i}.jsonl"),
                "--threads", str(self.threads), "--poll-interval", str(self.poll_interval),
                "--rpc-timeout", str(self.rpc_timeout)]
        if i in self.byzantine:
            argv += ["--byzantine", self.byzantine[i]]
        argv += list(self.node_args.get(i, []))
        return NodeProcess(i, self.accounts[i + 1], argv, self.workdir / f"node-{i}.log",
                           self.workdir / f"node-{i}.jsonl", self.threads)

    def launch(self, indices: list[int] | None = None) -> None:
        for i in (range(self.n) if indices is None else indices):
            self.nodes[i].start()
        self.timeline.setdefault("launched", time.time())

    def wait(self, timeout: float = 600.0, indices: list[int] | None = None, *,
             fail_fast: bool = True) -> dict[int, int]:
        """Wait for the given node processes (default all) to exit; returns {index: exit code}.
        Raises TimeoutError (after killing them) if they run longer than ``timeout``; with
        ``fail_fast``, RuntimeError (after killing the others) as soon as one exits with an error."""
        todo = [self.nodes[i] for i in (range(self.n) if indices is None else indices)]
        t_end = time.monotonic() + timeout
        while any(p.running for p in todo):
            bad = [p for p in todo if p.proc is not None and p.proc.poll() not in (None, 0)]
            if fail_fast and bad:
                self.kill_all()
                raise RuntimeError(f"institution process {bad[0].index} exited with code "
                                   f"{bad[0].proc.returncode}; its log:\n{bad[0].log_tail()}")
            if time.monotonic() > t_end:
                tails = "\n".join(f"--- node {p.index}:\n{p.log_tail(1500)}" for p in todo if p.running)
                self.kill_all()
                raise TimeoutError(f"node processes still running after {timeout:.0f} s:\n{tails}")
            time.sleep(0.2)
        self.timeline["finished"] = time.time()
        return {p.index: p.proc.returncode for p in todo}

    def kill_all(self) -> None:
        for p in self.nodes:
            p.kill()

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str, *,
                 tolerate: tuple[int, ...] = ()) -> None:
        """Poll ``predicate`` until true; raise TimeoutError after ``timeout`` s, or RuntimeError as soon
        as a node process (other than those in ``tolerate``) exits with an error."""
        t_end = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > t_end:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
            dead = [p for p in self.nodes if p.proc is not None and p.proc.poll() not in (None, 0)
                    and p.index not in tolerate]
            if dead:
                raise RuntimeError(f"node {dead[0].index} exited with {dead[0].proc.returncode} while waiting "
                                   f"for {what}:\n{dead[0].log_tail()}")
            time.sleep(0.1)

    def close(self) -> None:
        self.kill_all()
        self.stop_chain()

    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------- results
    def results(self, dataset) -> tuple[list[dict], dict]:
        """(metric rows, summary) after the run: per-node round records, and the global model rebuilt
        from the chain here, scored on the pooled test splits of all institutions."""
        from medchain.baselines import pooled_test
        from medchain.blobstore import store_for
        from medchain.chain import LedgerClient, chain_identity, final_block_hash
        from medchain.data import partition as split
        from medchain.training import evaluate

        insts = split(dataset, None if self.partition == "sites" else self.n, self.partition, alpha=self.alpha,
                      fraction=self.fraction, seed=self.cfg.seed)
        reader = LedgerClient(self.w3, self.ledger.address)
        observer = rebuild_global(reader, insts[0], dataset.n_classes, store=store_for(self.blobs))
        model = observer.personal_model()
        final = evaluate(model, pooled_test(insts))
        last = self.cfg.rounds - 1
        on_chain = reader.majority_digest(last)
        rows, finals = [], []
        for p in self.nodes:
            for m in p.metrics():
                if m["event"] == "round":
                    rows.append({"institution": p.index, "byzantine": self.byzantine.get(p.index, ""), **m})
                elif m["event"] == "final":
                    finals.append({"institution": p.index, "launched_at": p.launched_at, **m})
        rows.append({"event": "final", "institution": -1, "round": last, "eval_on": "pooled_test",
                     "digest": observer.global_digest().hex(), **{k: final[k] for k in ("acc", "auc", "loss")
                                                                  if k in final}})
        node_digests = sorted({f["final_digest"] for f in finals})
        busy = sum(f["timings"]["train"] + f["timings"]["encode"] + f["timings"]["replay"] + f["timings"]["chain_total"]
                   + f["timings"]["eval"] for f in finals)
        chain = sum(f["timings"]["chain_total"] for f in finals)
        span = (self.timeline.get("finished", time.time())
                - self.timeline.get("started", self.timeline.get("launched", time.time())))
        round_rows = [r for r in rows if r.get("event") == "round"]
        first_close = min((r["t"] for r in round_rows if r["round"] == 0), default=None)
        per_round = []   # steady state: from the close of round 0 to that of the last round, per node
        for i in range(self.n):
            ts = {r["round"]: r["t"] for r in round_rows if r["institution"] == i}
            if self.cfg.rounds > 1 and 0 in ts and last in ts and ts[last] > ts[0]:
                per_round.append((ts[last] - ts[0]) / last)
        round_s = float(np.median(per_round)) if per_round else None
        summary = {
            "final_acc": final["acc"], "final_auc": final.get("auc"),
            "final_digest": observer.global_digest().hex(),
            "final_digest_on_chain": None if on_chain is None else on_chain.hex(),
            "node_final_digests": node_digests,
            "all_nodes_agree": node_digests == [observer.global_digest().hex()],
            "ledger_address": self.ledger.address,
            "chain_identity": chain_identity(self.w3, self.ledger.address),
            "final_block_hash": final_block_hash(self.w3),
            "processes": self.n, "rounds": self.cfg.rounds, "aggregation": self.cfg.aggregation,
            "byzantine": {str(k): v for k, v in self.byzantine.items()},
            "refused_updates": {str(r): [s for s, _ in v] for r, v in observer.refused.items() if v},
            **self._what_happened(reader, observer),
            "wall_s": round(span, 3),
            "rounds_per_min": round(60 * self.cfg.rounds / span, 2) if span > 0 else None,
            "round_s_steady": None if round_s is None else round(round_s, 3),
            "rounds_per_min_steady": round(60 / round_s, 2) if round_s else None,
            "chain_overhead_pct": round(100 * chain / busy, 2) if busy else None,
            "ready_s": {str(f["institution"]): f["ready_s"] for f in finals},
            "startup_s": {str(f["institution"]): f["startup_s"] for f in finals},
            "startup_cpu_s": {str(f["institution"]): f.get("startup_cpu_s") for f in finals},
            "peak_rss_mb": {str(f["institution"]): f["peak_rss_mb"] for f in finals},
            "pss_mb": {str(f["institution"]): f.get("pss_mb") for f in finals},
            "first_round_closed_s": first_close,
            "anvil_peak_rss_mb": _proc_peak_rss_mb(getattr(getattr(self.chain, "_proc", None), "pid", None)),
        }
        return rows, summary

    def _what_happened(self, reader, observer) -> dict:
        """What the chain and the nodes' drill records say happened beyond plain rounds: updates left
        out (withdrawn, unavailable, refused payloads) and why, attestations that differ from the
        majority, members no longer active, drill actions and whether the ledger refused them; plus
        ``what_happened``, the same as one sentence per fact."""
        who = {a.address: i for i, a in enumerate(self.accounts[1:])}

        def name(addr: str) -> str:
            return f"institution {who[addr]}" if addr in who else addr

        active = set(reader.members())
        removed = sorted(name(a) for a in who if a not in active)
        mismatches, lines = {}, []
        for r in range(self.cfg.rounds):
            majority = reader.majority_digest(r)
            bad = [a.member for a in reader.attestations(r) if a.digest != majority]
            if bad:
                mismatches[str(r)] = bad
                lines += [f"round {r}: {name(m)} attested a global digest that differs from the majority"
                          + (" (its attestation no longer counts: removed)" if m not in active else "")
                          for m in bad]
        for r, refused in sorted(observer.refused.items()):
            lines += [f"round {r}: the update of {name(s)} was left out by every replica: {why}" for s, why in refused]
        drills = [{"institution": p.index, **{k: m[k] for k in ("round", "action", "refused", "outcome")}}
                  for p in self.nodes for m in p.metrics() if m["event"] == "drill"]
        seen = set()
        for d in drills:                     # a node restarted mid-round may repeat an action: once each
            key = (d["institution"], d["round"], d["action"])
            if key not in seen:
                seen.add(key)
                lines.append(f"round {d['round']}: institution {d['institution']} (drill) {d['action']}: {d['outcome']}")
        lines += [f"{m} was removed from the task by the admin" for m in removed]
        unavailable = {}
        for r in range(self.cfg.rounds):
            gone = [u.sender for u in reader.updates(r) if u.unavailable and not u.payload]
            if gone:
                unavailable[str(r)] = gone
        return {"unavailable_updates": unavailable, "attestation_mismatches": mismatches,
                "removed_members": removed, "drill_actions": drills, "what_happened": lines}


LOCK_NAME = ".medchain-run.lock"


def fresh_run_dir(base: str | Path = "results/simulate") -> Path:
    """A new, not yet existing folder ``base/run-YYYYmmdd-HHMMSS[-k]`` for one run."""
    base = Path(base)
    stamp = time.strftime("run-%Y%m%d-%H%M%S")
    path, k = base / stamp, 1
    while path.exists():
        k += 1
        path = base / f"{stamp}-{k}"
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunDir:
    """Exclusive use of an output folder by one run: created if missing, refused if it already
    holds anything (a new run's metrics would mix with an old run's), and locked by a lock file
    (created atomically, holding this process id) while the run writes; the lock is removed on exit.
    A second run into the same folder is refused with a message naming the holder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lock = self.path / LOCK_NAME

    def __enter__(self) -> Path:
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"--out {self.path} is a file, not a folder")
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = int(self.lock.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                holder = None
            if holder is not None and _pid_alive(holder):
                raise RuntimeError(f"{self.path} is in use by another run (process {holder} holds "
                                   f"{self.lock}); wait for it to finish or choose another --out") from None
            raise RuntimeError(f"{self.path} holds a lock left by a run that is no longer running "
                               f"({self.lock}); its results may be incomplete: choose another --out, or "
                               "delete that folder if you do not need it") from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        others = sorted(p.name for p in self.path.iterdir() if p.name != LOCK_NAME)
        if others:
            self.lock.unlink()
            shown = ", ".join(others[:4]) + (", …" if len(others) > 4 else "")
            raise RuntimeError(f"--out {self.path} is not empty ({shown}): one folder holds one run, and a "
                               "new run would mix its metrics with the old ones. Choose a new --out, or "
                               "omit --out for a fresh folder under results/simulate/")
        return self.path

    def __exit__(self, *exc) -> None:
        try:
            self.lock.unlink()
        except FileNotFoundError:
            pass


def simulate(processes: int, cfg, *, data: str = "simulated:n=600", out: str | Path | None = None,
             partition: str = "iid", alpha: float = 0.5, fraction: float = 1.0, deadline_blocks: int = 0,
             quorum: int | None = None, byzantine: dict[int, str] | None = None, threads: int = 1,
             timeout: float = 1800.0, chain_id: int = 31337) -> dict:
    """``medchain simulate``: an anvil node, one task, ``processes`` institution processes; waits for
    them and writes ``out/metrics.csv`` (one row per node and round, plus the final global model on
    the pooled test splits) and ``out/summary.json`` (final ACC, digest, ledger address, block hash,
    overhead, start-up time, peak memory, parameters, versions). Returns the summary (its
    ``out`` key names the folder).

    ``out`` must be empty or absent (None: a fresh ``results/simulate/run-<time>``); it is locked
    while the run writes (:class:`RunDir`). Arguments are checked before anything starts."""
    if int(processes) < 1:
        raise ValueError(f"need at least one institution process, got {processes}")
    byzantine = check_byzantine(byzantine or {}, int(processes))
    out = fresh_run_dir() if out is None else Path(out)
    with RunDir(out):
        return _simulate_into(out, processes, cfg, data=data, partition=partition, alpha=alpha,
                              fraction=fraction, deadline_blocks=deadline_blocks, quorum=quorum,
                              byzantine=byzantine, threads=threads, timeout=timeout, chain_id=chain_id)


def _simulate_into(out: Path, processes: int, cfg, *, data, partition, alpha, fraction, deadline_blocks,
                   quorum, byzantine, threads, timeout, chain_id) -> dict:
    from medchain.data import load_dataset, save_npz
    from medchain.results import write_metrics, write_summary

    dataset = load_dataset(data)
    source = data
    if data.strip().lower().startswith("simulated"):    # generate once, not once per process
        source = str(save_npz(dataset, out / "data.npz"))
    t0 = time.time()
    with Deployment(processes, cfg, data=source, workdir=out / "run", partition=partition, alpha=alpha,
                    fraction=fraction, deadline_blocks=deadline_blocks, quorum=quorum, chain_id=chain_id,
                    byzantine=byzantine, threads=threads) as dep:
        dep.start_chain()
        address = dep.create_task(dataset.n_channels, dataset.n_classes)
        log.info("task %s on %s; launching %d institution processes", address, dep.url, processes)
        dep.launch()
        dep.start_task(ready_timeout=timeout)
        log.info("all %d processes ready; task started", processes)
        codes = dep.wait(timeout)
        failed = {i: c for i, c in codes.items() if c != 0}
        if failed:
            i = next(iter(failed))
            raise RuntimeError(f"institution process(es) {sorted(failed)} failed (exit codes {failed}); "
                               f"log of institution {i}:\n{dep.nodes[i].log_tail()}")
        rows, summary = dep.results(dataset)
    summary["total_s"] = round(time.time() - t0, 3)
    summary["data"] = data
    summary["out"] = str(out)
    write_metrics(rows, out / "metrics.csv")
    params = {**dep.cfg.to_dict(), "processes": processes, "partition": partition, "alpha": alpha,
              "fraction": fraction, "deadline_blocks": deadline_blocks, "quorum": quorum, "threads": threads}
    return write_summary(summary, out / "summary.json", params=params, seed=cfg.seed)

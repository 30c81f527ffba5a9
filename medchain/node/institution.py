"""The loop of one institution process (:class:`InstitutionNode`, :func:`run_node`, ``medchain node``)
and an observer's rebuild of the global model from the chain (:func:`rebuild_global`); the rules
the loop follows are in :mod:`medchain.node`."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from medchain.attacks.byzantine import BEHAVIOURS
from medchain.chain import (AlreadyAttested, AlreadySubmitted, LedgerClient, LedgerError, LedgerTimeout,
                            RoundClosed, RoundNotClosed, TransactionReverted, connect)
from medchain.chain.connection import node_label
from medchain.node import procstats
from medchain.node.availability import AvailabilityDuty
from medchain.node.hostile import HostileActs
from medchain.node.report import NodeReporting, NodeResult, RoundRecord
from medchain.node.task import NodeError, config_from_task
from medchain.protocol import AttestationMismatchError, Institution, check_attestations

log = logging.getLogger("medchain.node")


class InstitutionNode(AvailabilityDuty, HostileActs, NodeReporting):
    """The loop of one institution process (see :mod:`medchain.node` for its rules).

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
        self._unsettled: dict[int, bytes] = {}  # rounds with a dissenting attestation and no majority yet
        self._dissent_logged: set[tuple[int, str]] = set()
        self._started = False
        self._submitted: set[int] = set()
        self._deadlines: dict[int, int] = {}
        self._delta: tuple[int, np.ndarray] | None = None
        self._down_since: float | None = None
        self._outages = 0
        self._t0 = time.perf_counter()
        self._process_start = procstats.process_start_epoch()
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
        inst, ledger = self.inst, self.ledger

        if self._pending_attest is not None:                 # attest a round already aggregated
            r, digest = self._pending_attest
            attested = self._attested_digest(r, digest)      # a digest nobody computed in a drill
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
                self._check_agreement(r, digest)
                if r >= 1 and self._last_digest is not None:     # late attestations of the round before
                    self._check_agreement(r - 1, self._last_digest)
            self._last_digest = digest
            self._pending_attest = None
            self._log_round(r, digest)
            return False

        for u, d in list(self._unsettled.items()):           # dissent seen, majority not reached yet
            self._check_agreement(u, d)
        r = inst.rounds_applied
        if r >= self.cfg.rounds:
            if self._unsettled:
                self._wait("a majority of the members to attest round(s) "
                           f"{sorted(self._unsettled)} (a member attested another digest)")
                return False
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
                    self._first_train, self._first_train_cpu = time.time(), procstats.cpu_s()
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

    def _check_agreement(self, r: int, digest: bytes) -> None:
        """Compare round r's attestations with this node's digest (deployment rule of
        :func:`~medchain.protocol.check_attestations`): a dissenting member is logged once and left to
        the admin while a strict majority of the members agrees with this node; without a majority yet
        the round is rechecked on every step (and the node does not finish before it is settled);
        AttestationMismatchError when another digest has the majority."""
        agreement = check_attestations(self.ledger, r, digest)
        for member in agreement.dissenters:
            if (r, member) not in self._dissent_logged:
                self._dissent_logged.add((r, member))
                log.warning("round %d: member %s attested a global digest other than this node's %s…; %s",
                            r, member, digest.hex()[:16],
                            "a majority of the members agrees with this node, so it goes on (the admin may "
                            "remove that member)" if agreement.settled else
                            "waiting for a majority of the members' attestations")
        if agreement.settled:
            self._unsettled.pop(r, None)
            return
        self._unsettled[r] = digest
        if self.me not in agreement.attesters:
            # my attestation went with blocks the chain lost (restored from an older state dump):
            # without it the honest majority may never form
            log.warning("round %d: my attestation is no longer on chain; attesting again", r)
            try:
                self.ledger.attest(r, digest)
            except AlreadyAttested:
                pass

    def _wait(self, what: str) -> None:
        now = time.monotonic()
        if self._waiting_since is None:
            self._waiting_since = self._last_wait_log = now
        elif now - self._waiting_since > self.round_timeout:
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

    # -------------------------------------------------------------- run
    def run(self) -> NodeResult:
        self._resilient(self._setup)
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
        return self._result()


def run_node(rpc: str, ledger_address: str, account, data, n_classes: int | None = None, *, store=None, select=None,
             poll_interval: float = 0.2, rpc_timeout: float = 120.0, round_timeout: float = 3600.0,
             availability_wait: float = 5.0, metrics_path: str | Path | None = None,
             hostile: frozenset[str] = frozenset()) -> NodeResult:
    """Run one institution until the task ends (see :mod:`medchain.node`). ``account``: its signing
    account (e.g. :func:`medchain.chain.key_from_env`). ``data``: its InstitutionData, or a callable
    ``cfg -> (InstitutionData, n_classes)`` (see :class:`InstitutionNode`)."""
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


def rebuild_global(ledger, data, n_classes: int, *, store=None, until: int | None = None):
    """Rebuild the global model purely from the chain, as a (re)starting node does: an
    :class:`Institution` over a read-only ledger client replays every closed round (or the first
    ``until``). Returns the Institution (``global_vec``, ``global_digest()``, ``model``)."""
    task = ledger.task()
    cfg = config_from_task(task)
    inst = Institution(data, n_classes, cfg, ledger, store)
    if inst.global_digest() != task.initial_model_digest:
        raise NodeError("the rebuilt initial model does not match the task's initial-model digest")
    closed = min(ledger.current_round(), cfg.rounds) if task.started else 0
    inst.replay_closed(closed if until is None else min(until, closed))
    return inst

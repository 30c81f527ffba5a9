"""Deployment mode: each institution is its own process, talking to a real Ethereum JSON-RPC node.

The simulation (:func:`medchain.protocol.run_collaborative`) and this mode run the *same*
:class:`~medchain.protocol.Institution` code: ``train_round`` → ``upload`` → (round closes) →
``apply_round`` (replay from the chain, verify, aggregate) → attest. What this package adds is the
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
  r (and, for late ones, for r − 1). A dissenting attestation is never silently ignored: while a
  strict majority of the active members attested the node's own digest it logs the dissenter and
  goes on (a member attesting garbage on purpose cannot halt the honest majority; the admin may
  remove it, and from its removal on its attestations no longer count); while no digest has that
  majority it rechecks the round on every step and does not finish before it is settled; once
  another digest has the majority it stops with :class:`~medchain.protocol.AttestationMismatchError`
  (this node computed something else than the majority). Members that have not attested (yet) are
  tolerated.
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
Hostile members for drills: :mod:`medchain.attacks.byzantine` makes their update values and parses
the drill specs; :mod:`medchain.node.hostile` acts out the behaviours that need the chain.

Modules: :mod:`~medchain.node.task` (task parameters on chain ↔ :class:`CollabConfig`, task
set-up, an institution's data share), :mod:`~medchain.node.institution` (:class:`InstitutionNode`,
:func:`run_node`, :func:`rebuild_global`) with its parts :mod:`~medchain.node.availability`,
:mod:`~medchain.node.hostile` and :mod:`~medchain.node.report` (round records, metrics file),
:mod:`~medchain.node.procstats` (memory, CPU, start time), :mod:`~medchain.node.drill`
(:class:`NodeProcess`, :class:`Deployment`, :func:`simulate`) with
:mod:`~medchain.node.drill_report` (its results), :mod:`~medchain.node.rundir` (run folders).
"""
from medchain.attacks.byzantine import ATTACKS, BEHAVIOURS, byzantine_select, check_byzantine, parse_drill
from medchain.node.drill import KEY_ENV, Deployment, NodeProcess, simulate
from medchain.node.institution import InstitutionNode, rebuild_global, run_node
from medchain.node.report import NodeResult, RoundRecord, val_accuracy
from medchain.node.rundir import LOCK_NAME, RunDir, fresh_run_dir
from medchain.node.task import NodeError, config_from_task, create_task, load_institution, task_params

__all__ = ["NodeError", "NodeResult", "RoundRecord", "config_from_task", "task_params", "create_task",
           "run_node", "InstitutionNode", "load_institution", "val_accuracy", "byzantine_select", "ATTACKS",
           "BEHAVIOURS", "parse_drill", "check_byzantine", "Deployment", "NodeProcess", "rebuild_global",
           "KEY_ENV", "simulate", "RunDir", "fresh_run_dir", "LOCK_NAME"]

"""A node's data-availability duty for a closed round whose updates include digest-only payloads:
report the payloads it cannot fetch and verify, seal the round's availability when it is due, and
aggregate the round only once it is sealed (contracts/TaskLedger.sol; the rules are in
:mod:`medchain.node`)."""
from __future__ import annotations

import logging

from medchain.chain import AlreadyReported, AlreadySealed, LedgerError, RoundNotClosed

log = logging.getLogger("medchain.node")


class AvailabilityDuty:
    """The availability part of :class:`~medchain.node.institution.InstitutionNode` (a mixin: it
    reads the node's ledger, institution and task, and waits with its ``_wait``)."""

    def _availability_sealed(self, r: int) -> bool:
        """Round r (closed) may be aggregated once its data availability is sealed on chain (at once
        if all its payloads are inline). Until then: post this node's report (the payloads it cannot
        fetch within availability_wait) unless the chain has it, seal the round when it is due
        (anyone may), and wait."""
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

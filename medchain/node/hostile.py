"""The drill behaviours a hostile node acts out beyond its update's values
(:data:`medchain.attacks.byzantine.BEHAVIOURS`): submitting updates that claim 0 or 2**64-1 samples,
attesting a digest nobody computed, posting a digest whose payload it never stores. They need the
chain client, which :mod:`medchain.attacks` (below the chain in the layers) may not import, so
they live here; the malicious update values are :func:`medchain.attacks.byzantine.byzantine_select`."""
from __future__ import annotations

import hashlib
import logging

from medchain import codec
from medchain.chain import LedgerError

log = logging.getLogger("medchain.node")


class HostileActs:
    """The drill part of :class:`~medchain.node.institution.InstitutionNode` (a mixin: it reads the
    node's ``hostile`` behaviours, ledger, institution and current update)."""

    def _attested_digest(self, r: int, digest: bytes) -> bytes:
        """What this node attests for round r: ``digest``, or with "garbage-attest" a digest nobody computed."""
        if "garbage-attest" in self.hostile:
            return hashlib.sha256(b"garbage-%d" % r).digest()
        return digest

    def _drill(self, r: int, action: str, outcome: str, refused: bool = False) -> None:
        """Log and record one drill action of a hostile node (metrics event "drill")."""
        log.warning("DRILL round %d: %s: %s", r, action, outcome)
        self._write_metrics({"event": "drill", "round": r, "action": action, "refused": refused,
                             "outcome": outcome})

    def _drill_sample_counts(self, r: int) -> None:
        """Drill: before its real update, try to submit one claiming 0 and one claiming 2**64-1
        samples (the ledger refuses both; recorded as refused)."""
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

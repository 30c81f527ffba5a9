"""Agreement of the replicas: every institution attests the global digest it computed.

In a simulation every replica is ours, so any disagreement stops the run with
:class:`AttestationMismatchError` naming the round. In deployment a member may attest garbage on
purpose; an honest node then goes on as long as a strict majority of the task's active members
attested the digest it computed (the dissenters are returned, to be logged and left to the admin),
waits while no digest has that majority, and stops only when another digest has it (this node, not
the others, computed something else)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass


class AttestationMismatchError(RuntimeError):
    """Institutions computed different global models for a round: the run cannot continue."""


@dataclass(frozen=True)
class Agreement:
    """What the attestations of one round say about this node's digest.
    settled: nothing more to wait for (no dissent so far, or a strict majority of the active members
    attested this node's digest); dissenters: accounts whose attestation differs from it;
    attesters: every account whose attestation counted (active members only)."""
    settled: bool
    dissenters: tuple[str, ...] = ()
    attesters: tuple[str, ...] = ()


def check_attestations(ledger, r: int, expected: bytes, n_members: int | None = None) -> Agreement:
    """Check the attestations of round r against this replica's digest `expected`.

    n_members given (simulation): all n_members attestations must equal `expected`, else raise.
    n_members None (deployment: members may be absent or not attested yet): attestations of accounts
    that are no longer members (removed by the admin) do not count; with no dissent the round is
    settled; with dissent it is settled once more than half of the active members attested
    `expected`, pending (settled False) while no digest has such a majority, and an
    :class:`AttestationMismatchError` once another digest has it."""
    atts = ledger.attestations(r)
    m = len(atts)                     # a ledger without a member list: every attester counts
    if hasattr(ledger, "members"):
        active = set(ledger.members())
        atts = [a for a in atts if a.member in active]
        m = len(active)
    bad = [a for a in atts if a.digest != expected]
    attesters = tuple(a.member for a in atts)
    if n_members is None:
        dissenters = tuple(a.member for a in bad)
        if not bad or 2 * (len(atts) - len(bad)) > m:
            return Agreement(True, dissenters, attesters)
        if not any(2 * c > m for c in Counter(a.digest for a in bad).values()):
            return Agreement(False, dissenters, attesters)
    elif not bad and len(atts) == n_members:
        return Agreement(True, (), attesters)
    detail = ", ".join(f"{a.member}: {a.digest.hex()[:16]}…" for a in atts)
    of = f" of {n_members}" if n_members is not None else ""
    who = ("a majority of the members attested another digest; " if n_members is None else "")
    raise AttestationMismatchError(
        f"round {r}: institutions disagree on the global model (expected {expected.hex()[:16]}…, "
        f"{len(atts)}{of} attestations: {detail}); {who}the run is stopped — check that "
        "every institution runs the same medchain version, model and task parameters")

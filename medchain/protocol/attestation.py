"""Agreement of the replicas: every institution attests the global digest it computed; any
disagreement stops the run with :class:`AttestationMismatchError` naming the round."""
from __future__ import annotations


class AttestationMismatchError(RuntimeError):
    """Institutions computed different global models for a round: the run cannot continue."""


def check_attestations(ledger, r: int, expected: bytes, n_members: int | None = None) -> None:
    """All n_members attestations of round r must equal `expected`; else raise naming the round.
    n_members None (deployment: members may be absent or not attested yet): every attestation
    recorded so far must equal `expected`, however many there are. Attestations of accounts that
    are no longer members (removed by the admin) do not count: removing a member that attested
    garbage lets the honest ones go on (and restart) past that round."""
    atts = ledger.attestations(r)
    if hasattr(ledger, "members"):
        active = set(ledger.members())
        atts = [a for a in atts if a.member in active]
    bad = [a for a in atts if a.digest != expected]
    if bad or (n_members is not None and len(atts) != n_members):
        detail = ", ".join(f"{a.member}: {a.digest.hex()[:16]}…" for a in atts)
        of = f" of {n_members}" if n_members is not None else ""
        raise AttestationMismatchError(
            f"round {r}: institutions disagree on the global model (expected {expected.hex()[:16]}…, "
            f"{len(atts)}{of} attestations: {detail}); the run is stopped — check that "
            "every institution runs the same medchain version, model and task parameters")

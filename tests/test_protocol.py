"""Collaborative training over the ledger: determinism, equality with the chain-free reference,
and refusal of tampered, replayed or oversized updates."""
import numpy as np
import pytest

from conftest import toy_images
from medchain import codec
from medchain.chain import RoundClosed
from medchain.data.types import InstitutionData
from medchain.protocol import (AttestationMismatchError, CollabConfig, Institution, MemoryLedger,
                               check_attestations, run_collaborative)

CFG = CollabConfig(rounds=2, local_epochs=1, batch_size=32, lr=3e-3, model="lenet")


def _insts(n=3, size=60):
    return [InstitutionData(i, toy_images(size, 10 * i), toy_images(20, 10 * i + 1), toy_images(30, 10 * i + 2))
            for i in range(n)]


@pytest.fixture(scope="module")
def chain_run():
    return run_collaborative(_insts(), 2, CFG, chain="embedded")


def test_chain_run_equals_chain_free_reference_bit_for_bit(chain_run):
    ref = run_collaborative(_insts(), 2, CFG, chain=None)
    assert [h["digest"] for h in chain_run.history] == [h["digest"] for h in ref.history]
    assert [h["acc"] for h in chain_run.history] == [h["acc"] for h in ref.history]
    assert chain_run.final_digest == ref.final_digest
    assert chain_run.ledger_address.startswith("0x") and chain_run.chain_identity.startswith("eip155:")


def test_same_seed_same_digests_other_seed_differs(chain_run):
    again = run_collaborative(_insts(), 2, CFG, chain="embedded")
    assert again.final_digest == chain_run.final_digest
    other = run_collaborative(_insts(), 2, CollabConfig(**{**CFG.to_dict(), "seed": 1}), chain=None)
    assert other.final_digest != chain_run.final_digest


def test_every_institution_attested_the_same_digest_on_chain(chain_run):
    ledger = chain_run.institutions[0].ledger
    for r, h in enumerate(chain_run.history):
        atts = ledger.attestations(r)
        assert len(atts) == 3 and {a.digest.hex() for a in atts} == {h["digest"]}
        assert len(ledger.updates(r)) == 3


def test_a_diverging_institution_stops_the_run_naming_the_round():
    insts = _insts(2)
    ledger = MemoryLedger(b"\0" * 32, 1)
    members = [Institution(d, 2, CFG, ledger.as_account(f"m{d.index}")) for d in insts]
    for m in members:
        m.upload(0, m.train_round(0))
    good = members[0].sync_round(0)
    members[1].global_vec = members[1].global_vec + np.float32(1e-3)   # a corrupted replica
    members[1].sync_round(0)
    with pytest.raises(AttestationMismatchError, match="round 0: institutions disagree"):
        check_attestations(members[0].ledger, 0, good, 2)


def test_tampered_blob_is_refused_at_replay():
    ledger = MemoryLedger(b"\0" * 32, 1)
    inst = Institution(_insts(1)[0], 2, CollabConfig(**{**CFG.to_dict(), "max_inline_bytes": 0}), ledger.as_account("a"))
    from medchain.blobstore import MemoryBlobStore
    inst.store = MemoryBlobStore()
    digest = inst.upload(0, inst.train_round(0))
    data = bytearray(inst.store.get(digest))
    data[-1] ^= 0xFF
    inst.store._blobs[digest] = bytes(data)      # corrupt the stored payload behind the digest
    with pytest.raises(codec.DigestMismatch):
        inst.sync_round(0)


def test_oversized_update_is_refused_at_replay():
    ledger = MemoryLedger(b"\0" * 32, 1)
    inst = Institution(_insts(1)[0], 2, CFG, ledger.as_account("a"))
    delta = inst.train_round(0)
    delta[0] = 5e3                                # beyond max_abs_update = 1e3
    inst.upload(0, delta)
    before = inst.global_digest()
    assert inst.sync_round(0) == before           # its only update refused: the model stays as it was
    assert len(inst.refused[0]) == 1 and "oversized" in inst.refused[0][0][1]


def test_a_replayed_round_submission_is_rejected_by_the_ledger():
    seen = {}

    def replay_round_zero(r, insts):
        if r != 0:
            return
        ledger = insts[0].ledger
        before = ledger.updates(0)
        with pytest.raises(RoundClosed, match="round 0"):     # round 0 closed, round 1 is open
            insts[0].upload(0, np.zeros(insts[0].layout.size, np.float32))
        seen["unchanged"] = ledger.updates(0) == before and ledger.current_round() == 1

    run_collaborative(_insts(2), 2, CFG, chain="embedded", round_callback=replay_round_zero)
    assert seen == {"unchanged": True}


def test_local_mask_coordinates_are_never_uploaded():
    """FedPer from the policy (keep_local="fedper"): the head never goes on the ledger."""
    ledger = MemoryLedger(b"\0" * 32, 1)
    data = _insts(1)[0]
    cfg = CollabConfig(**{**CFG.to_dict(), "keep_local": "fedper"})
    probe = Institution(data, 2, CFG, ledger.as_account("probe"))
    from medchain.params import select_names
    mask = select_names(probe.layout, include=["head.*"])
    inst = Institution(data, 2, cfg, ledger.as_account("a"))
    assert np.array_equal(inst.local_mask, mask)
    inst.upload(0, inst.train_round(0))
    rec = inst.ledger.updates(0)[0]
    dec = codec.decode_update(rec.payload or inst.store.get(rec.digest))
    assert not mask[dec.indices].any() and dec.n == int((~mask).sum())


def test_partial_upload_and_download_follow_the_task_parameters():
    cfg = CollabConfig(**{**CFG.to_dict(), "theta_u": 0.1, "theta_d": 0.5})
    res = run_collaborative(_insts(2), 2, cfg, chain=None)
    inst = res.institutions[0]
    idx, vals = inst.last_upload
    from medchain.privacy import n_selected, trainable_mask
    trainable = trainable_mask(inst.layout)     # θu counts over trainable parameters; BN statistics
    assert len(idx) == n_selected(0.1, int(trainable.sum())) + int((~trainable).sum())   # shared on top
    # the uploaded coordinates are the largest-magnitude ones of that round's update
    assert inst.select.options["rule"] == "largest" and inst.select.options["theta_u"] == 0.1
    # with θd < 1 an institution keeps its own model and takes only part of the global one
    assert inst.own_vec is not None
    assert 0 < np.mean(inst.own_vec == inst.global_vec) < 1

"""One hospital in the protocol: :class:`Institution` — local training, upload (select, encode,
place, submit), replay of a round from the ledger (verify, decode, aggregate), attestation."""
from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np
from torch import nn

from medchain import codec
from medchain.aggregation import ServerOptimizer, SparseUpdate, aggregate, weighted_mean
from medchain.blobstore import BlobStore, fetch_payload, place_payload
from medchain.data.types import InstitutionData
from medchain.harmonize import Augmenter, attach_standardization
from medchain.params import Layout, digest_vector, load_flat, model_vector, unflatten
from medchain.privacy import apply_download, download_mask, make_selector, trainable_mask
from medchain.protocol.config import CollabConfig, scaffold_layout_id
from medchain.protocol.policy import start_model
from medchain.records import MemberLedger, Update
from medchain.training import recalibrate_bn, train_epochs

log = logging.getLogger("medchain.protocol")


class Institution:
    """One hospital: private data, its own model copy, its own ledger client (its own key).

    ledger: a :class:`medchain.records.MemberLedger` acting as this institution (a
    :class:`medchain.chain.LedgerClient` with this institution's account, or a
    :class:`MemoryLedger.Member`; None: a probe that only builds the model). store: the blob store
    for payloads too large to go inline (and for a bridged model's payload). Everything it does
    follows the task's policy ``cfg`` (:mod:`medchain.protocol.policy`): what it uploads (θu
    selection, ``keep_local``: FedPer / FedBN, ``bn_stats``), its local objective (FedProx μ, L2-SP
    β toward the bridged model, SCAFFOLD) and its initial model (fresh, or warm-started from the
    bridged model, which it receives from the bridge on its ledger's chain and verifies itself:
    :func:`~medchain.protocol.policy.start_model`).

    Two arguments lie outside the policy, for what a policy cannot express: select — ``(delta
    float32 (P,), round) -> (indices int64 (n,), values float32 (n,))``, an upload that ignores the
    policy (a Byzantine member in drills and robustness tests; an attack's custom selection);
    init_model — initial weights handed over in process (simulation only: personalization after a
    FedAvg run, the inversion case's trained model), whose digest the driver checks against the task's;
    dp_plan — with ``cfg.dp_epsilon``, the DP-SGD plan (:class:`medchain.dp.DPPlan`) of another
    institution instead of calibrating one for its own training set (simulation only: an attack
    replaying one institution's round with that institution's real noise). With DP-SGD every
    step it takes is charged to ``accountant`` (Opacus RDP); ``dp_plan`` holds its noise and budget.

    With ``cfg.scaffold`` the institution also holds SCAFFOLD's control variates, float32 (P,),
    zero on buffers: ``c_server`` (derived from the chain: the weighted mean of every accepted
    Δc added each round) and ``c_own`` (its own Δc as accepted on chain, summed).
    """

    def __init__(self, data: InstitutionData, n_classes: int, cfg: CollabConfig, ledger: MemberLedger | None,
                 store: BlobStore | None = None, *,
                 select: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]] | None = None,
                 init_model: nn.Module | None = None, dp_plan=None):
        self.data, self.cfg, self.ledger, self.store = data, cfg, ledger, store
        self.index = data.index
        if init_model is not None and cfg.bridged_model is not None:
            raise ValueError("the task starts from its bridged model (bridged_model); init_model cannot apply")
        self.model, anchor = (init_model, None) if init_model is not None else \
            start_model(cfg, data.train.n_channels, n_classes, w3=getattr(ledger, "w3", None), store=store)
        if cfg.standardize:
            attach_standardization(self.model)
        self.layout = Layout.from_module(self.model)
        local_mask = None
        if cfg.keep_local != "none":
            from medchain.personalize import local_mask_for
            local_mask = local_mask_for(cfg.keep_local, self.layout)
        if cfg.scaffold and select is not None:
            raise ValueError("scaffold uploads the full update (Δw, Δc): a custom select cannot apply")
        self.augment = Augmenter(cfg.augment) if cfg.augment else None
        self.param_mask = trainable_mask(self.layout)
        self.c_server = np.zeros(self.layout.size, dtype=np.float32) if cfg.scaffold else None
        self.c_own = np.zeros(self.layout.size, dtype=np.float32) if cfg.scaffold else None
        self.wire_layout_id, self.wire_size = (scaffold_layout_id(self.layout), 2 * self.layout.size) \
            if cfg.scaffold else (self.layout.layout_id, self.layout.size)
        self.global_vec = model_vector(self.model, self.layout)
        if select is None and (cfg.theta_u < 1 or cfg.gamma is not None or cfg.sigma):
            select = make_selector(cfg, self.layout, cfg.seed, institution=self.index)
        self.select = select
        self.own_vec = self.global_vec.copy() if cfg.theta_d < 1 else None   # partial download
        if cfg.bn_stats == "local":   # statistics buffers never leave the institution
            buffers = ~self.param_mask
            local_mask = buffers if local_mask is None else (np.asarray(local_mask, bool) | buffers)
        self.local_mask = local_mask
        self.local_vec = self.global_vec.copy()          # this institution's personal coordinates
        self.anchor, self.anchor_strength = anchor, cfg.l2sp_beta   # L2-SP (None: no anchor)
        self.server = ServerOptimizer(cfg.server_lr, cfg.server_momentum,
                                      averaged=~self.param_mask if cfg.server_momentum > 0 or cfg.server_lr != 1 else None)
        self.timings = {"train": 0.0, "encode": 0.0, "chain": 0.0, "replay": 0.0}
        self.last_upload: tuple[np.ndarray, np.ndarray] | None = None
        self.rounds_applied = 0                          # rounds aggregated into global_vec so far
        self.refused: dict[int, list[tuple[str, str]]] = {}   # round -> [(sender, reason)]
        self.dp_plan, self.accountant = None, None
        if cfg.dp_epsilon is not None:
            from medchain.dp import check_dp_model, new_accountant, plan
            check_dp_model(self.model, cfg.model)
            self.dp_plan = dp_plan or plan(cfg.dp_epsilon, self.n_samples, batch_size=cfg.batch_size,
                                           rounds=cfg.rounds, local_epochs=cfg.local_epochs,
                                           max_grad_norm=cfg.dp_max_grad_norm, delta=cfg.dp_delta)
            self.accountant = new_accountant()
        elif dp_plan is not None:
            raise ValueError("dp_plan given but the task has no dp_epsilon")

    @property
    def n_samples(self) -> int:
        return len(self.data.train)

    def global_digest(self) -> bytes:
        return digest_vector(self.global_vec, self.layout)

    def working_vector(self) -> np.ndarray:
        """The model this institution trains and uses: the global model (with θd < 1: its own
        model with only the downloaded coordinates replaced), except its local-only coordinates
        (if any), which keep their personal values."""
        base = self.global_vec if self.own_vec is None else self.own_vec
        if self.local_mask is None:
            return base
        return np.where(self.local_mask, self.local_vec, base).astype(np.float32)

    def train_round(self, r: int) -> np.ndarray:
        """Local training of round r from the current global model; returns Δ float32 (P,).

        With ``cfg.scaffold`` (option II of Karimireddy et al. 2020): every gradient step adds
        c_server − c_own, and the result is (Δw, Δc) float32 (2P,) with, on the parameters,
        Δc = −c_server + (w_start − w_trained) / D, where D is the displacement a constant unit
        gradient would have produced over the same SGD steps (K·lr for plain SGD with a constant
        lr; with momentum and this round's lr schedule, their exact sum)."""
        t0 = time.perf_counter()
        start = self.working_vector()
        load_flat(self.model, start, self.layout)
        anchor, strength = self.anchor, self.anchor_strength
        if self.cfg.prox_mu > 0:   # FedProx: stay near this round's starting point
            anchor = {k: v.detach().clone() for k, v in self.model.named_parameters()}
            strength = self.cfg.prox_mu
        offset = None
        if self.cfg.scaffold:
            names = {n for n, _ in self.model.named_parameters()}
            offset = {k: v for k, v in unflatten(self.c_server - self.c_own, self.layout).items() if k in names}
        seed = self.cfg.seed * 100_003 + r * 1_009 + self.index
        if self.dp_plan is not None:
            from medchain.dp import dp_train_epochs
            stats = dp_train_epochs(self.model, self.data.train, self.cfg.train_config(), self.dp_plan,
                                    self.accountant, lr_range=self.cfg.round_lr(r), seed=seed)
        else:
            stats = train_epochs(self.model, self.data.train, self.cfg.train_config(), lr_range=self.cfg.round_lr(r),
                                 anchor=anchor, anchor_strength=strength, seed=seed,
                                 augment=self.augment, grad_offset=offset)
        if self.cfg.bn_recalibrate:
            recalibrate_bn(self.model, self.data.train)
        trained = model_vector(self.model, self.layout)
        if self.local_mask is not None:
            self.local_vec = np.where(self.local_mask, trained, self.local_vec).astype(np.float32)
        if self.own_vec is not None:
            self.own_vec = trained
        self.timings["train"] += time.perf_counter() - t0
        delta = (trained.astype(np.float64) - start.astype(np.float64)).astype(np.float32)
        if not self.cfg.scaffold:
            return delta
        unit = stats["unit_displacement"]
        if not unit or unit <= 0:
            raise RuntimeError(f"institution {self.index}: round {r} made no SGD step; SCAFFOLD cannot "
                               "estimate its control variate (is the training set smaller than 2 images?)")
        dc = np.where(self.param_mask, -self.c_server.astype(np.float64)
                      - delta.astype(np.float64) / unit, 0.0).astype(np.float32)
        return np.concatenate([delta, dc])

    def selection(self, delta: np.ndarray, r: int) -> tuple[np.ndarray | None, np.ndarray]:
        """What round r's update ``delta`` (float32 (P,)) would share: (indices int64 (n,) or None
        for all, values float32 (n,)) — the task's selection, never a local-only coordinate."""
        if self.select is not None:
            idx, vals = self.select(delta, r)
        elif self.local_mask is not None:
            idx = np.flatnonzero(~self.local_mask)
            vals = delta[idx]
        else:
            idx, vals = None, delta
        if self.local_mask is not None and idx is not None and self.local_mask[idx].any():
            raise RuntimeError(f"institution {self.index}: the selection would upload local-only "
                               "coordinates; refusing to share them")
        return idx, vals

    def upload(self, r: int, delta: np.ndarray, *, withhold: bool = False) -> bytes:
        """Select, encode, place and submit round r's update; returns its digest. ``withhold``
        (drills only): submit the digest alone and store the payload nowhere, as a member trying to
        stall the task would."""
        t0 = time.perf_counter()
        idx, vals = self.selection(delta, r)
        self.last_upload = (idx, vals)
        payload = codec.encode_update(vals, self.wire_layout_id, indices=idx, total_size=self.wire_size)
        if withhold:
            digest, inline = codec.digest(payload), b""
        else:
            digest, inline = place_payload(payload, self.store, self.cfg.max_inline_bytes)
        t1 = time.perf_counter()
        self.ledger.submit_update(r, digest, len(vals), self.n_samples, inline)
        t2 = time.perf_counter()
        self.timings["encode"] += t1 - t0
        self.timings["chain"] += t2 - t1
        return digest

    def read_round(self, r: int) -> list[tuple[Update, codec.DecodedUpdate]]:
        """Round r's accepted updates from the ledger, in chain order, each verified and decoded.

        An update is *refused* -- left out of the round, logged, and listed in ``self.refused[r]``
        as ``(sender, reason)`` -- when the bytes every institution sees make it unusable: an inline
        payload that does not match its on-chain digest, a payload that fails strict decoding
        (malformed, another layout or size, non-finite, any value beyond ``max_abs_update``), or a
        value count that differs from the recorded ``n_values``. These checks depend only on the
        chain and the content-addressed payload bytes, so every honest institution refuses exactly
        the same updates and aggregates the rest. A payload missing from this institution's blob
        store, or stored bytes that do not match the digest, is a *local* problem (another
        institution may hold the right bytes): it raises (BlobNotFound / DigestMismatch) instead of
        being refused, since refusing it here alone would make this replica diverge; a payload that
        a majority of the members cannot fetch becomes an on-chain exclusion through the
        availability reports (:meth:`report_availability`), which deployed nodes post and wait to
        see sealed before they aggregate a round.

        Also left out, before any payload is read: an update the ledger marks ``withdrawn`` (its
        sender was removed before the round closed; final once the round closed), one it marks
        ``unavailable`` (the round's sealed availability reports say a majority of the other members
        could not fetch its payload -- left out even where the bytes are at hand, so that the chain,
        not local blob luck, decides; see :meth:`missing_payloads`), and one whose
        ``n_samples`` is 0 or above the task's ``max_samples`` (the contract already refuses both;
        the check keeps the chain-free reference and older ledgers to the same rule).
        """
        t0 = time.perf_counter()
        records = self.ledger.updates(r)
        t1 = time.perf_counter()
        out, refused = [], []
        cap = self.cfg.max_samples
        for rec in records:
            if getattr(rec, "withdrawn", False):
                refused.append((rec.sender, "withdrawn: the member was removed before the round closed"))
                log.warning("round %d: left out the update of %s (removed before the round closed)", r, rec.sender)
                continue
            if getattr(rec, "unavailable", False) and not rec.payload:   # an inline payload is always there
                refused.append((rec.sender, "unavailable: a majority of the other members could not fetch its "
                                            "payload (sealed on chain)"))
                log.warning("round %d: left out the update of %s (payload unavailable, sealed on chain)", r, rec.sender)
                continue
            if rec.n_samples < 1 or (cap is not None and rec.n_samples > cap):
                why = (f"n_samples={rec.n_samples} is outside [1, {cap if cap is not None else 2 ** 64 - 1}] "
                       "(the task's max_samples)")
                refused.append((rec.sender, why))
                log.warning("round %d: refused the update of %s: %s", r, rec.sender, why)
                continue
            inline = bytes(rec.payload)
            payload = inline if inline else fetch_payload(rec.digest, b"", self.store)
            try:
                if inline:
                    codec.verify(inline, rec.digest, what=f"inline payload of {rec.sender}")
                dec = codec.decode_update(payload, expected_layout_id=self.wire_layout_id,
                                          expected_size=self.wire_size, max_abs=self.cfg.max_abs_update)
                if dec.n != rec.n_values:
                    raise codec.CodecError(f"update of {rec.sender} carries {dec.n} values but the "
                                           f"ledger records n_values={rec.n_values}")
            except codec.CodecError as exc:
                refused.append((rec.sender, str(exc)))
                log.warning("round %d: refused the update of %s: %s", r, rec.sender, exc)
                continue
            out.append((rec, dec))
        self.refused[r] = refused
        self.timings["chain"] += t1 - t0
        self.timings["replay"] += time.perf_counter() - t1
        return out

    def needs_availability(self, r: int) -> bool:
        """Whether round r (closed) holds an update whose payload lives off chain (digest only, not
        withdrawn): only then can an update be unavailable, and only then do deployed nodes report
        and wait for the round's availability seal. A round whose payloads are all inline (in the
        chain's log) is aggregated at once: every replica has the bytes."""
        return any(not u.payload and not getattr(u, "withdrawn", False) for u in self.ledger.updates(r))

    def missing_payloads(self, r: int, *, wait: float = 0.0, poll: float = 0.2) -> list[str]:
        """Senders of round r's (closed) updates whose payload this institution cannot fetch from its
        blob store and verify against the on-chain digest, waiting up to ``wait`` seconds for late
        ones: what it reports on chain (:meth:`report_availability`). Its own update, inline
        payloads (they are in the chain's log) and updates left out anyway (withdrawn) are not
        checked."""
        from medchain.blobstore import BlobNotFound

        me = getattr(self.ledger, "account", None)
        me = getattr(me, "address", me)
        pending = [u for u in self.ledger.updates(r)
                   if not u.payload and not getattr(u, "withdrawn", False) and u.sender != me]
        t_end = time.monotonic() + max(0.0, wait)
        while True:
            missing = []
            for u in pending:
                try:
                    fetch_payload(u.digest, b"", self.store)
                except (BlobNotFound, codec.DigestMismatch, OSError):
                    missing.append(u)
            if not missing or time.monotonic() >= t_end:
                return sorted({u.sender for u in missing})
            pending = missing
            time.sleep(poll)

    def report_availability(self, r: int, *, wait: float = 0.0) -> list[str]:
        """Post this institution's availability report of round r (closed): the senders whose payload
        it could not fetch (:meth:`missing_payloads`). Every member reports once per round; the
        report that completes them seals the round (contracts/TaskLedger.sol). Returns the senders
        reported. A ledger without availability reports (the chain-free reference) is left alone."""
        if not hasattr(self.ledger, "report_availability"):
            return []
        missing = self.missing_payloads(r, wait=wait)
        if missing:
            log.warning("round %d: payload(s) of %s not in the blob store or not matching their digest; "
                        "reporting them unavailable", r, ", ".join(missing))
        t0 = time.perf_counter()
        self.ledger.report_availability(r, missing)
        self.timings["chain"] += time.perf_counter() - t0
        return missing

    def apply_round(self, r: int) -> bytes:
        """Replay round r from the ledger and aggregate its accepted updates into the global model
        (no attestation); returns the new global digest.

        Updates are combined in a canonical order -- by payload digest, then sample count -- so the
        result depends only on the *set* of accepted updates, not on the order in which they reached
        the chain (separate processes submit in any order; the in-process simulation in index
        order: both give the same digest). A round with no acceptable update
        (all refused or withdrawn) leaves the global model unchanged: the same rule on every
        replica, so one member's unusable update cannot stall the task.
        """
        decoded = self.read_round(r)
        if not decoded:
            reasons = "; ".join(f"{s}: {why}" for s, why in self.refused.get(r, [])) or "no updates"
            log.warning("round %d: no acceptable update (%s); the global model stays as it was", r, reasons)
            self.rounds_applied = r + 1
            return self.global_digest()
        t0 = time.perf_counter()
        decoded = sorted(decoded, key=lambda rd: (bytes(rd[0].digest), int(rd[0].n_samples)))
        if self.cfg.scaffold:
            decoded = self._apply_controls(decoded)
        updates = [SparseUpdate(d.indices, d.values, float(rec.n_samples), self.layout.size)
                   for rec, d in decoded]
        previous = self.global_vec
        self.global_vec = aggregate(self.global_vec, updates, self.cfg.aggregation, self.server)
        if self.own_vec is not None:   # Shokri's θd: take only the most-changed global coordinates
            mask = download_mask(self.global_vec, previous, self.cfg.theta_d)
            self.own_vec = apply_download(self.own_vec, self.global_vec, mask)
        self.rounds_applied = r + 1
        self.timings["replay"] += time.perf_counter() - t0
        return self.global_digest()

    def _apply_controls(self, decoded: list) -> list:
        """SCAFFOLD: split each accepted (Δw, Δc) into its halves, add the weighted mean of the Δc
        (the same weights as the model's mean) to c_server and this institution's own Δc, as the
        chain holds it, to c_own. Returns the updates with only their Δw half (dense, P values)."""
        size = self.layout.size
        me = getattr(self.ledger, "account", None)
        me = getattr(me, "address", me)
        full = np.arange(size, dtype=np.int64)
        controls = [SparseUpdate(full, d.values[size:], float(rec.n_samples), size) for rec, d in decoded]
        self.c_server = (self.c_server.astype(np.float64) + weighted_mean(controls)).astype(np.float32)
        for (rec, d), c in zip(decoded, controls):
            if me is not None and rec.sender == me:
                self.c_own = (self.c_own.astype(np.float64) + c.values.astype(np.float64)).astype(np.float32)
        return [(rec, codec.DecodedUpdate(d.layout_id, size, full, d.values[:size], True)) for rec, d in decoded]

    def replay_closed(self, until: int) -> list[bytes]:
        """Apply rounds ``rounds_applied .. until-1`` (all closed) from the ledger: how an
        institution that (re)starts rebuilds the global model purely from the chain. Returns the
        digests, one per applied round."""
        return [self.apply_round(r) for r in range(self.rounds_applied, until)]

    def sync_round(self, r: int) -> bytes:
        """Replay round r from the ledger, aggregate, attest; returns the new global digest."""
        digest = self.apply_round(r)
        t1 = time.perf_counter()
        self.ledger.attest(r, digest)
        self.timings["chain"] += time.perf_counter() - t1
        return digest

    def personal_model(self) -> nn.Module:
        """The model this institution would deploy: global weights (+ its local-only ones)."""
        load_flat(self.model, self.working_vector(), self.layout)
        return self.model

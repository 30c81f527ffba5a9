"""Collaborative training coordinated by a task ledger — no central server.

Each :class:`Institution` holds only its own private data. One round ``r``:

1. every institution starts from its copy of the global model ``w``, trains ``local_epochs`` on its
   own data, and forms its update ``Δ = w_local − w`` (all floating tensors, BatchNorm statistics
   included);
2. it selects what to share (``theta_u`` = 1: everything; see :mod:`medchain.privacy`), encodes it
   (:mod:`medchain.codec`) and submits digest + payload (inline, or the digest only with the payload
   in the blob store) to the ledger with its sample count;
3. once the round has closed, every institution *independently* reads the round's updates from the
   ledger in chain order, verifies each payload against its on-chain digest, decodes it strictly and
   aggregates deterministically (:mod:`medchain.aggregation`) into the next global model (deployed
   nodes first report which payloads they could not fetch and wait for the round's availability to
   be sealed on chain: an update a majority cannot fetch is left out by every replica);
4. each attests the digest of the global model it computed; all attestations must agree, otherwise
   the run stops with :class:`AttestationMismatchError` naming the round.

The same :class:`Institution` code runs in one process (simulation, :func:`run_collaborative`) or one
process per hospital (deployment). :class:`MemoryLedger` is the chain-free FedAvg reference: same
code, same aggregation, an in-memory log instead of a chain — identical seeds give identical digests.
The ledger records come from :mod:`medchain.records`; :mod:`medchain.chain` is imported only inside
the chain paths, so the chain-free reference never loads web3 (tests/test_layers.py).
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from medchain import codec
from medchain.aggregation import ServerOptimizer, SparseUpdate, aggregate, validate_rule, weighted_mean
from medchain.baselines import pooled_test
from medchain.blobstore import BlobStore, MemoryBlobStore, fetch_payload, place_payload
from medchain.data.types import ImageSet, InstitutionData
from medchain.harmonize import Augmenter, attach_standardization, validate_augment
from medchain.models import build_model
from medchain.privacy import apply_download, download_mask, make_selector, trainable_mask
from medchain.params import Layout, digest_vector, load_flat, model_vector, unflatten
from medchain.records import Attestation, Update
from medchain.training import TrainConfig, cosine_lr, evaluate, recalibrate_bn, train_epochs


log = logging.getLogger("medchain.protocol")


class AttestationMismatchError(RuntimeError):
    """Institutions computed different global models for a round: the run cannot continue."""


@dataclass
class CollabConfig:
    """Parameters of a collaborative task (recorded on chain as the task's params).

    lr decays by a cosine over rounds from lr to lr*lr_floor; each round's local training runs at
    that round's lr. prox_mu > 0 adds FedProx's proximal term; server_momentum > 0 is FedAvgM.
    theta_u / theta_d: fractions of each update uploaded / of the global model downloaded
    (:mod:`medchain.privacy`); select_rule ("largest" | "random"), select_scope ("global" |
    "layer"), gamma (clip bound) and sigma (noise) shape the upload when theta_u < 1.
    max_inline_bytes: payloads up to this size travel in the transaction, larger ones in the blob
    store. max_abs_update: any update value beyond ±this is refused as oversized.
    max_samples: the largest sample count an update may report (None: no cap beyond 2**64 − 1).
    The ledger is deployed with it and refuses 0 and anything above; every replica also refuses
    such an update. Sample counts are self-reported: with rule ``mean`` the cap bounds one member's
    weight — set it near the largest honest institution's training set.
    bn_stats: what happens to BatchNorm running statistics (the model's floating buffers):
    ``"shared"`` (default) — uploaded with every update and averaged like weights (θu counts over
    trainable parameters only; the statistics come on top, see :mod:`medchain.privacy`);
    ``"local"`` — never uploaded: each institution keeps its own as local-only coordinates, and
    the model it evaluates and deploys is the global weights with its own statistics.
    bn_recalibrate: after local training, recompute BatchNorm statistics exactly over the local
    training data (a few local steps leave the running averages stale; measured: without it the
    global model sits at the majority rate for the first rounds).

    Methods for feature shift between sites (claim 1 under scanner shift), each recorded here:
    scaffold: SCAFFOLD (Karimireddy et al. 2020) with option-II control variates — each update
    carries (Δw, Δc_i), 2P values, and every replica derives the server variate c from them
    (needs optimizer "sgd", full upload, rule "mean"; see :meth:`Institution.train_round`).
    keep_local: coordinates that never leave an institution — "fedbn" (every BatchNorm weight,
    bias and running statistic: FedBN, Li et al. 2021), "fedper" (the head) or "none"
    (:func:`medchain.personalize.local_mask_for`). standardize: each image is standardized to
    mean 0 / std 1 inside the model (:mod:`medchain.harmonize`). augment: {key: [low, high]}
    ranges of the scanner augmentation drawn during local training (keys
    :data:`medchain.harmonize.AUGMENT_KEYS`; {} for none).

    DP-SGD per institution (:mod:`medchain.dp`, Opacus): dp_epsilon — every institution trains
    with per-sample clipping at dp_max_grad_norm and Gaussian noise calibrated by the RDP
    accountant so that the whole task spends this ε at δ = dp_delta (None: 1/n, n = the sample
    count its updates report on chain); None: no DP. Needs a model without BatchNorm (``cnn_gn``).
    """

    rounds: int = 20
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 2e-3
    lr_floor: float = 0.02
    optimizer: str = "adam"
    weight_decay: float = 0.0
    prox_mu: float = 0.0
    server_lr: float = 1.0
    server_momentum: float = 0.0
    aggregation: str = "mean"
    theta_u: float = 1.0
    theta_d: float = 1.0
    select_rule: str = "largest"
    select_scope: str = "global"
    gamma: float | None = None
    sigma: float | None = None
    model: str = "cnn"
    seed: int = 0
    max_inline_bytes: int = 64_000
    max_abs_update: float = 1e3
    bn_recalibrate: bool = True
    max_samples: int | None = None
    scaffold: bool = False
    keep_local: str = "none"
    standardize: bool = False
    augment: dict = field(default_factory=dict)
    bn_stats: str = "shared"
    dp_epsilon: float | None = None
    dp_delta: float | None = None
    dp_max_grad_norm: float = 1.0

    def __post_init__(self):
        """Every parameter is checked here, so that a bad one is refused before a task is deployed
        (a ledger's parameters cannot be changed afterwards)."""
        from medchain.models import list_models
        from medchain.privacy import BN_POLICIES, RULES as SELECT_RULES, SCOPES
        from medchain.training import OPTIMIZERS

        def need(ok: bool, what: str, value) -> None:
            if not ok:
                raise ValueError(f"task parameter {what}, got {value!r}")

        def integer(name: str) -> int:
            v = getattr(self, name)
            need(isinstance(v, (int, np.integer)) and not isinstance(v, bool), f"{name} must be an integer", v)
            return int(v)

        def number(name: str) -> float:
            v = getattr(self, name)
            need(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                 and np.isfinite(float(v)), f"{name} must be a finite number", v)
            return float(v)

        need(integer("rounds") >= 1, "rounds must be >= 1", self.rounds)
        need(integer("local_epochs") >= 1, "local_epochs must be >= 1", self.local_epochs)
        need(integer("batch_size") >= 1, "batch_size must be >= 1", self.batch_size)
        need(number("lr") > 0, "lr must be > 0", self.lr)
        need(0 <= number("lr_floor") <= 1, "lr_floor must be in [0, 1]", self.lr_floor)
        need(self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}", self.optimizer)
        need(number("weight_decay") >= 0, "weight_decay must be >= 0", self.weight_decay)
        need(number("prox_mu") >= 0, "prox_mu must be >= 0", self.prox_mu)
        need(number("server_lr") > 0, "server_lr must be > 0", self.server_lr)
        need(0 <= number("server_momentum") < 1, "server_momentum must be in [0, 1)", self.server_momentum)
        for name in ("theta_u", "theta_d"):
            need(0 < number(name) <= 1, f"{name} must be in (0, 1]", getattr(self, name))
        need(self.select_rule in SELECT_RULES, f"select_rule must be one of {SELECT_RULES}", self.select_rule)
        need(self.select_scope in SCOPES, f"select_scope must be one of {SCOPES}", self.select_scope)
        if self.gamma is not None:
            need(number("gamma") > 0, "gamma (clip bound) must be > 0 or None", self.gamma)
        if self.sigma is not None:
            need(number("sigma") >= 0, "sigma (noise) must be >= 0 or None", self.sigma)
        need(isinstance(self.model, str) and (self.model in list_models() or self.model.startswith("timm:")),
             f"model must be one of {list_models()} or 'timm:<name>'", self.model)
        need(0 <= integer("seed") < 2 ** 63, "seed must be in [0, 2**63)", self.seed)
        need(integer("max_inline_bytes") >= 0, "max_inline_bytes must be >= 0", self.max_inline_bytes)
        need(number("max_abs_update") > 0, "max_abs_update must be > 0", self.max_abs_update)
        need(isinstance(self.bn_recalibrate, bool), "bn_recalibrate must be true or false", self.bn_recalibrate)
        if self.max_samples is not None:
            need(1 <= integer("max_samples") < 2 ** 64, "max_samples must be in [1, 2**64) or None",
                 self.max_samples)
        need(self.bn_stats in BN_POLICIES, f"bn_stats must be one of {BN_POLICIES}", self.bn_stats)
        validate_rule(self.aggregation)
        if self.dp_epsilon is not None:
            need(number("dp_epsilon") > 0, "dp_epsilon must be > 0 or None", self.dp_epsilon)
            need(not self.scaffold and self.prox_mu == 0 and not self.augment,
                 "dp_epsilon (DP-SGD) cannot be combined with scaffold, prox_mu or augment",
                 (self.scaffold, self.prox_mu, self.augment))
        if self.dp_delta is not None:
            need(0 < number("dp_delta") < 1, "dp_delta must be in (0, 1) or None", self.dp_delta)
        need(number("dp_max_grad_norm") > 0, "dp_max_grad_norm must be > 0", self.dp_max_grad_norm)
        need(self.keep_local in KEEP_LOCAL, f"keep_local must be one of {KEEP_LOCAL}", self.keep_local)
        for name in ("scaffold", "standardize"):
            need(isinstance(getattr(self, name), bool), f"{name} must be true or false", getattr(self, name))
        self.augment = validate_augment(self.augment)
        if self.scaffold:
            need(self.optimizer == "sgd", "scaffold needs optimizer 'sgd' (option-II control variates "
                 "estimate the gradient from the SGD displacement)", self.optimizer)
            need(self.theta_u == 1 and self.theta_d == 1 and self.gamma is None and not self.sigma,
                 "scaffold needs the full update (theta_u = theta_d = 1, no gamma/sigma)",
                 (self.theta_u, self.theta_d, self.gamma, self.sigma))
            need(self.aggregation == "mean", "scaffold needs aggregation 'mean'", self.aggregation)
            need(self.keep_local == "none", "scaffold cannot be combined with keep_local", self.keep_local)
            need(self.bn_stats == "shared", "scaffold needs bn_stats 'shared' (its control variates cover "
                 "every uploaded coordinate)", self.bn_stats)

    def to_dict(self) -> dict:
        return asdict(self)

    def round_lr(self, r: int) -> tuple[float, float]:
        """(lr at the first step, lr at the last step) of round r's local training."""
        return (cosine_lr(self.lr, r, self.rounds, self.lr_floor),
                cosine_lr(self.lr, r + 1, self.rounds, self.lr_floor))

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.local_epochs, batch_size=self.batch_size, lr=self.lr,
                           optimizer=self.optimizer, weight_decay=self.weight_decay,
                           schedule="constant", seed=self.seed)


#: Choices of CollabConfig.keep_local.
KEEP_LOCAL: tuple[str, ...] = ("none", "fedbn", "fedper")


def task_model(cfg: CollabConfig, in_chans: int, n_classes: int) -> nn.Module:
    """A fresh ``cfg.model`` drawn from ``cfg.seed``, standardizing its inputs when
    ``cfg.standardize`` (the hook adds no tensor: same layout and digest)."""
    model = build_model(cfg.model, in_chans, n_classes, cfg.seed)
    return attach_standardization(model) if cfg.standardize else model


def scaffold_layout_id(layout: Layout) -> bytes:
    """The layout id a SCAFFOLD update (Δw then Δc, 2P values) travels under: distinct from the
    model's, so a payload of one kind can never be read as the other."""
    return hashlib.sha256(layout.layout_id + b"medchain/scaffold/delta+control").digest()


class MemoryLedger:
    """The chain-free reference: the TaskLedger's interface over an in-memory log (one shared
    object — exactly what the chain replaces). Used for the FedAvg reference and its comparison."""

    address = "memory"

    def __init__(self, initial_digest: bytes, n_rounds: int):
        self.initial_digest = initial_digest
        self.n_rounds = n_rounds
        self._updates: dict[int, list[Update]] = {}
        self._attest: dict[int, list[Attestation]] = {}
        self._members: list[str] = []
        self._seq = 0

    def as_account(self, account: str) -> "MemoryLedger.Member":
        if account not in self._members:
            self._members.append(account)
        return MemoryLedger.Member(self, account)

    class Member:
        """What one institution sees: submit, read, attest."""

        def __init__(self, ledger: "MemoryLedger", account: str):
            self.ledger, self.account = ledger, account

        def submit_update(self, round, digest, n_values, n_samples, payload=b""):
            lst = self.ledger._updates.setdefault(round, [])
            if any(u.sender == self.account for u in lst):
                raise ValueError(f"{self.account} already submitted an update for round {round}")
            self.ledger._seq += 1
            lst.append(Update(round, self.account, bytes(digest), n_values, n_samples, bytes(payload),
                              self.ledger._seq, 0, ""))

        def updates(self, round):
            return list(self.ledger._updates.get(round, []))

        def attest(self, round, digest):
            lst = self.ledger._attest.setdefault(round, [])
            lst.append(Attestation(round, self.account, bytes(digest), bytes(digest) == lst[0].digest if lst else True))

        def attestations(self, round):
            return list(self.ledger._attest.get(round, []))


class Institution:
    """One hospital: private data, its own model copy, its own ledger client (its own key).

    ledger: anything with submit_update / updates / attestations / attest acting as this
    institution (a :class:`medchain.chain.LedgerClient` with this institution's account, or a
    :class:`MemoryLedger.Member`). store: the blob store for payloads too large to go inline.
    select: optional ``(delta float32 (P,), round) -> (indices int64 (n,), values float32 (n,))``
    choosing what to upload (default: everything). local_mask: bool (P,) of coordinates that
    never leave the institution and are never overwritten by the global model (personalization;
    ``cfg.keep_local`` builds it from the task's parameters instead).

    With ``cfg.scaffold`` the institution also holds SCAFFOLD's control variates, float32 (P,),
    zero on buffers: ``c_server`` (derived from the chain: the weighted mean of every accepted
    Δc added each round) and ``c_own`` (its own Δc as accepted on chain, summed).

    With ``cfg.dp_epsilon`` it trains with DP-SGD: ``dp_plan`` (:class:`medchain.dp.DPPlan`; default
    :func:`medchain.dp.plan` for its training-set size) fixes the noise, and ``accountant`` (Opacus
    RDP) is charged every step it takes.
    """

    def __init__(self, data: InstitutionData, n_classes: int, cfg: CollabConfig, ledger,
                 store: BlobStore | None = None, *,
                 select: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]] | None = None,
                 local_mask: np.ndarray | None = None, anchor: dict[str, torch.Tensor] | None = None,
                 anchor_strength: float = 0.0, init_model: nn.Module | None = None, dp_plan=None):
        self.data, self.cfg, self.ledger, self.store = data, cfg, ledger, store
        self.index = data.index
        self.model = init_model if init_model is not None else \
            task_model(cfg, data.train.n_channels, n_classes)
        if cfg.standardize:
            attach_standardization(self.model)
        self.layout = Layout.from_module(self.model)
        if cfg.keep_local != "none":
            if local_mask is not None:
                raise ValueError("pass local_mask or set the task's keep_local, not both")
            from medchain.personalize import local_mask_for
            local_mask = local_mask_for(cfg.keep_local, self.layout)
        if cfg.scaffold and select is not None:
            raise ValueError("scaffold uploads the full update (Δw, Δc): a custom select cannot apply")
        self.augment = Augmenter(cfg.augment) if cfg.augment else None
        self.param_mask = np.zeros(self.layout.size, dtype=bool)    # trainable coordinates
        for e in self.layout.entries:
            if e.kind == "param":
                self.param_mask[self.layout.slices[e.name]] = True
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
            buffers = ~trainable_mask(self.layout)
            local_mask = buffers if local_mask is None else (np.asarray(local_mask, bool) | buffers)
        self.local_mask = local_mask
        self.local_vec = self.global_vec.copy()          # this institution's personal coordinates
        self.anchor, self.anchor_strength = anchor, anchor_strength
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


def _evaluated_vector(inst: Institution) -> np.ndarray:
    """The model scored each round: the global model, or under ``bn_stats="local"`` (no global
    BatchNorm statistics exist) the global weights with this institution's own statistics."""
    if inst.cfg.bn_stats == "local":
        return np.where(inst.local_mask, inst.local_vec, inst.global_vec).astype(np.float32)
    return inst.global_vec


@dataclass
class CollabResult:
    """Outcome of run_collaborative. history: one row per round (pooled-test metrics of the global
    model, its digest, wall time). timings: seconds summed over institutions by phase."""

    history: list[dict]
    model: nn.Module
    institutions: list[Institution]
    final_digest: bytes
    ledger_address: str
    chain_identity: str = ""
    final_block_hash: str = ""
    timings: dict = field(default_factory=dict)
    wall_s: float = 0.0


def run_collaborative(institutions: list[InstitutionData], n_classes: int, cfg: CollabConfig, *,
                      chain: str | None = "embedded", store: BlobStore | None = None,
                      eval_set: ImageSet | None = None, quiet: bool = True,
                      institution_kwargs: Callable[[int], dict] | None = None,
                      round_callback: Callable[[int, list[Institution]], None] | None = None,
                      initial_model: nn.Module | None = None) -> CollabResult:
    """Simulate collaborative training with every institution in this process.

    chain: "embedded" (in-process eth-tester chain), an ``http://`` node URL (anvil, geth, ...),
      an already connected ``Web3`` (e.g. a chain that also hosts a bridge), or None for the
      chain-free reference (:class:`MemoryLedger`).
    eval_set: where the global model is scored each round (default: all institutions' test splits).
    institution_kwargs: per-institution extra arguments for :class:`Institution` (select, local_mask…).
    initial_model: the task's initial model, whose digest the ledger records (default: a fresh
      ``cfg.model`` drawn from ``cfg.seed``); every institution must start from exactly these
      weights (pass each its own copy as ``init_model`` through institution_kwargs).
    """
    t_start = time.perf_counter()
    store = store if store is not None else MemoryBlobStore()
    eval_set = eval_set if eval_set is not None else pooled_test(institutions)
    probe = initial_model if initial_model is not None else \
        build_model(cfg.model, institutions[0].train.n_channels, n_classes, cfg.seed)
    layout = Layout.from_module(probe)
    init_digest = digest_vector(model_vector(probe, layout), layout)
    if chain is None:
        admin = MemoryLedger(init_digest, cfg.rounds)
        clients = [admin.as_account(f"institution-{d.index}") for d in institutions]
        identity, block_hash = "memory", ""
    else:
        from medchain.chain import chain_identity, connect, deploy_ledger, dev_accounts, final_block_hash
        w3 = connect(None if chain == "embedded" else chain) if isinstance(chain, str) else chain
        accounts = dev_accounts(w3, len(institutions) + 1)
        admin = deploy_ledger(w3, accounts[0], cfg.model, init_digest, cfg.rounds,
                              params={**cfg.to_dict(), "layout_id": layout.layout_id_hex},
                              members=[a.address for a in accounts[1:]], start=True,
                              max_samples=cfg.max_samples if cfg.max_samples is not None else 2 ** 64 - 1)
        clients = [admin.as_account(a) for a in accounts[1:]]
    insts = [Institution(d, n_classes, cfg, c, store, **(institution_kwargs(d.index) if institution_kwargs else {}))
             for d, c in zip(institutions, clients)]
    for inst in insts:   # every institution checks it starts from the model the task recorded
        if inst.global_digest() != init_digest:
            raise AttestationMismatchError(f"institution {inst.index} built an initial model whose digest "
                                           "differs from the task's initial-model digest")
    history = []
    for r in tqdm(range(cfg.rounds), desc="collaborative rounds", disable=quiet):
        t0 = time.perf_counter()
        for inst in insts:
            inst.upload(r, inst.train_round(r))
        digests = [inst.sync_round(r) for inst in insts]
        check_attestations(insts[0].ledger, r, digests[0], len(insts))
        model = insts[0].model
        load_flat(model, _evaluated_vector(insts[0]), insts[0].layout)
        history.append({"round": r + 1, "digest": digests[0].hex(), "round_s": time.perf_counter() - t0,
                        **evaluate(model, eval_set)})
        if round_callback is not None:
            round_callback(r, insts)
    final = task_model(cfg, institutions[0].train.n_channels, n_classes)
    load_flat(final, _evaluated_vector(insts[0]), insts[0].layout)
    timings = {k: sum(i.timings[k] for i in insts) for k in insts[0].timings}
    if chain is not None:
        identity, block_hash = chain_identity(w3, admin.address), final_block_hash(w3)
    return CollabResult(history, final, insts, digests[0], admin.address, identity, block_hash,
                        timings, time.perf_counter() - t_start)

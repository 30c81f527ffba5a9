"""The task's parameters: :class:`CollabConfig` (recorded on chain as the task's params), the
task's initial model (:func:`task_model`) and SCAFFOLD's wire layout id."""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field

import numpy as np
from torch import nn

from medchain.aggregation import validate_rule
from medchain.harmonize import attach_standardization, validate_augment
from medchain.models import build_model
from medchain.params import Layout
from medchain.training import TrainConfig, cosine_lr


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

    Transfer from a model accepted by the task chain's bridge (:mod:`medchain.protocol.policy`):
    bridged_model: ``{"bridge": address, "message": 0x id, "model", "in_chans", "n_classes"}`` — the
    accepted message and the source model's architecture (to parse its payload), or None.
    init: ``"fresh"`` (``model`` drawn from ``seed``) or ``"warm_start"`` (that fresh model with the
    bridged feature weights copied in: the task's initial model). l2sp_beta: β of the L2-SP penalty
    (β/2)·‖w − w_source‖² toward the bridged feature weights in every local step (0: none).
    DP-SGD per institution (:mod:`medchain.dp`, Opacus): dp_epsilon — every institution trains
    with per-sample clipping at dp_max_grad_norm and Gaussian noise calibrated by the RDP
    accountant so that the whole task spends this ε at δ = dp_delta (None: 1/n, n = the sample
    count its updates report on chain); None: no DP. Needs a model without BatchNorm
    (``cnn_tanh``, ``cnn_gn``).
    The policy as a whole, grouped by what it decides: :func:`medchain.protocol.policy.policy_sections`.
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
    init: str = "fresh"
    l2sp_beta: float = 0.0
    bridged_model: dict | None = None
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
            need(not self.scaffold and self.prox_mu == 0 and not self.augment and self.l2sp_beta == 0,
                 "dp_epsilon (DP-SGD) cannot be combined with scaffold, prox_mu, l2sp_beta or augment",
                 (self.scaffold, self.prox_mu, self.l2sp_beta, self.augment))
        if self.dp_delta is not None:
            need(0 < number("dp_delta") < 1, "dp_delta must be in (0, 1) or None", self.dp_delta)
        need(number("dp_max_grad_norm") > 0, "dp_max_grad_norm must be > 0", self.dp_max_grad_norm)
        need(self.keep_local in KEEP_LOCAL, f"keep_local must be one of {KEEP_LOCAL}", self.keep_local)
        for name in ("scaffold", "standardize"):
            need(isinstance(getattr(self, name), bool), f"{name} must be true or false", getattr(self, name))
        self.augment = validate_augment(self.augment)
        need(self.init in INIT_CHOICES, f"init must be one of {INIT_CHOICES}", self.init)
        need(number("l2sp_beta") >= 0, "l2sp_beta must be >= 0", self.l2sp_beta)
        uses_source = self.init == "warm_start" or self.l2sp_beta > 0
        need((self.bridged_model is not None) == uses_source, "bridged_model must be given exactly when "
             "init is 'warm_start' or l2sp_beta > 0 (the bridged message they use)", self.bridged_model)
        if self.bridged_model is not None:
            from medchain.protocol.policy import check_bridged_model
            self.bridged_model = check_bridged_model(self.bridged_model)
        need(not (self.prox_mu > 0 and self.l2sp_beta > 0), "prox_mu and l2sp_beta cannot both be > 0 "
             "(one proximal anchor per local step: FedProx's or L2-SP's)", (self.prox_mu, self.l2sp_beta))
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
#: Choices of CollabConfig.init.
INIT_CHOICES: tuple[str, ...] = ("fresh", "warm_start")


def task_model(cfg: CollabConfig, in_chans: int, n_classes: int) -> nn.Module:
    """A fresh ``cfg.model`` drawn from ``cfg.seed``, standardizing its inputs when
    ``cfg.standardize`` (the hook adds no tensor: same layout and digest)."""
    model = build_model(cfg.model, in_chans, n_classes, cfg.seed)
    return attach_standardization(model) if cfg.standardize else model


def scaffold_layout_id(layout: Layout) -> bytes:
    """The layout id a SCAFFOLD update (Δw then Δc, 2P values) travels under: distinct from the
    model's, so a payload of one kind can never be read as the other."""
    return hashlib.sha256(layout.layout_id + b"medchain/scaffold/delta+control").digest()

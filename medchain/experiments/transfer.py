"""Claim 3: a task on one chain uses auxiliary information from a similar task on another chain,
sent peer to peer between the chains. Used by notebooks/03_cross_chain_transfer.ipynb.

The scenario, end to end:

1. **Source task on chain A.** Institutions of a source consortium train collaboratively over their
   own chain (:func:`train_source`: :func:`medchain.protocol.run_collaborative` on a fresh embedded
   chain or a node URL). Every member then publishes the global model it computed into chain A's
   blob store (:func:`medchain.crosschain.publish_global_model`); its sha256 is the digest it attested.
2. **Chain B** (:func:`open_target_chain`): the target consortium's chain. Its governance deploys a
   Bridge and registers chain A's task as a source — its members as signers, a quorum ``k``.
3. **Peer-to-peer transfer** (:func:`bridge_transfer`): a :class:`~medchain.crosschain.Relayer`
   takes the finished task's majority attested digest, asks chain A's members to sign (each signs
   only if the digest equals the global model *it* computed: :class:`~medchain.crosschain.MemberSigner`),
   copies the payload to chain B's blob store and relays the message; the bridge accepts it only
   with ``k`` valid member signatures.
4. **Target task on chain B** (:func:`run_target`): collaborative training on chain B (a new task
   ledger on the same chain as the bridge). With transfer, every target institution
   :func:`~medchain.crosschain.receive`\\ s the payload itself (verified against the accepted digest)
   and uses it: ``"warm_start"`` copies the source's feature extractor (the classifier head is never
   transferred, it starts fresh); ``"l2sp"`` warm-starts too and adds the L2-SP penalty
   ``(β/2)·Σ‖w − w_source‖²`` over the feature parameters to every local step (Li et al., ICML 2018,
   where the starting point is the source model); ``"none"`` trains from scratch.

:func:`medchain.experiments.transfer_sweep.run_sweep` repeats step 4 over target data fractions ×
arms (method × source) × seeds (one chain B per seed, one bridge message per source), and
:func:`~medchain.experiments.transfer_sweep.summarize` computes the numbers and the verdicts. The task
pairs with a stated relation (similar, same task, unrelated) are in
:mod:`medchain.experiments.transfer_pairs`; the controls (linear probe, pooled training) in
:mod:`medchain.experiments.transfer_controls`.

Simulated data (:func:`make_tasks`): the source is the simulated chest-CT nodule task at sites 0–4
(their own scanners and label mixes); the target is the *same* three-class task at unseen sites
(``site_offset``: other scanners — dose, views, reconstruction filter, blur, calibration, display
window) with another lesion mix (``class_probs``, default more malignant nodules: a referral
population). Related, but shifted in both images and labels; ``target_label_map`` gives the
target another label definition too (e.g. malignant vs not), and :func:`source_on_target` scores
the source model as it is on the target, to show how far apart the tasks are. Real data: any two
different MedMNIST sets of the same image size (e.g. source ``pneumoniamnist``, target
``breastmnist``); the number of classes may differ, because the head is never transferred. A grey
set paired with an RGB one (e.g. the simulated source and target ``retinamnist``) has its grey
channel repeated over three (:func:`grey_to_rgb`).

Chain identities: in-process chains all share one chain id and start with the same funded
accounts, so the same contract address can appear on two of them; here chain B's bridge is
deployed by its governance (dev account 9) and the relay is sent by dev account 0 (the target
consortium's task admin) before it deploys the target ledgers, so no address on chain B repeats
chain A's ledger, and :func:`genesis_hash` tells the chains apart. Real nodes have distinct ids.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from medchain.blobstore import BlobStore, MemoryBlobStore
from medchain.chain import BridgeClient, deploy_bridge
from medchain.crosschain import MemberSigner, RelayResult, Relayer, publish_global_model, receive
from medchain.data import Dataset, ImageSet, InstitutionData, content_sha256, partition
from medchain.params import Layout
from medchain.protocol import CollabConfig, CollabResult, run_collaborative, start_model

__all__ = [
    "METHODS", "CONTROLS", "METHOD_LABELS", "parse_arm", "arm_label", "SourceTask", "TargetChain", "TransferSweep",
    "make_tasks", "grey_to_rgb", "relabel", "split_institutions", "train_source", "source_on_target",
    "open_target_chain", "genesis_hash", "bridge_transfer",
    "local_epochs_for", "receive_source_model", "run_target", "target_policy",
]

#: Target-task methods trained on chain B: no transfer, warm start of the feature extractor, L2-SP.
METHODS: tuple[str, ...] = ("none", "warm_start", "l2sp")
#: Controls (:mod:`medchain.experiments.transfer_controls`): a linear probe on the relayed source's
#: frozen features, pooled no-privacy training of source + target, the source model as it is.
CONTROLS: tuple[str, ...] = ("probe", "pooled", "as_is")
METHOD_LABELS = {"none": "no transfer", "warm_start": "warm start", "l2sp": "L2-SP", "probe": "linear probe",
                 "pooled": "pooled (no privacy)", "as_is": "source as is"}
_COLORS = {"none": "tab:gray", "warm_start": "tab:blue", "l2sp": "tab:red", "probe": "tab:green",
           "pooled": "k", "as_is": "tab:brown"}
_LINES = {"similar": "-", "same_task": "-.", "unrelated": ":", None: "-"}

#: Default lesion mix of the simulated target task (no nodule, benign, malignant): a referral
#: population with more malignant nodules than the source's pooled mix (0.4, 0.3, 0.3).
TARGET_CLASS_PROBS = (0.2, 0.3, 0.5)


# ============================================================================ data
def make_tasks(source: str = "simulated", target: str = "simulated", *, source_n: int = 10_000,
               source_sites: int = 5, target_n: int = 4_800, target_sites: int = 2,
               target_site_offset: int = 5, target_class_probs: Sequence[float] | None = TARGET_CLASS_PROBS,
               target_label_map: Sequence[int] | None = None, data_seed: int = 0) -> tuple[Dataset, Dataset]:
    """The source and target data sets.

    ``"simulated"``: source = :func:`~medchain.data.simulate_ct` with ``source_n`` images at sites
    ``0 … source_sites-1``; target = ``target_n`` images at the unseen sites ``target_site_offset …``
    (other scanners) with the lesion mix ``target_class_probs`` at every target site (None: each
    site's own mix), drawn with another data seed. Anything else is passed to
    :func:`~medchain.data.load_dataset` (a MedMNIST flag, an .npz path, an image folder).
    target_label_map: another label definition for the target, ``new label = map[old label]``
    (e.g. ``(0, 0, 1)``: malignant vs not, a binary task on the simulated data).
    A grey set paired with an RGB one is lifted to RGB (:func:`grey_to_rgb`); two loaded sets with
    the same images, or images of different sizes, raise ValueError.
    """
    from medchain.data import load_dataset, simulate_ct
    if source == "simulated":
        src = simulate_ct(source_n, source_sites, data_seed)
    else:
        src = load_dataset(source)
    if target == "simulated":
        if source == "simulated" and target_site_offset < source_sites:
            raise ValueError(f"target_site_offset={target_site_offset} reuses source sites 0..{source_sites - 1}: "
                             "the target task must be at unseen sites")
        probs = None if target_class_probs is None else np.tile(np.asarray(target_class_probs, float),
                                                                (target_sites, 1))
        tgt = simulate_ct(target_n, target_sites, data_seed + 1, site_offset=target_site_offset,
                          class_probs=probs)
        tgt.name = "simulated_ct_target"
    else:
        tgt = load_dataset(target)
    if source != "simulated" and target != "simulated" and content_sha256(src) == content_sha256(tgt):
        raise ValueError(f"source {source!r} and target {target!r} hold the same images: the source model "
                         "would have trained on the target's training data, so transfer would look better "
                         "than it can be; pick two different data sets (or target=\"simulated\")")
    if target_label_map is not None:
        tgt = relabel(tgt, target_label_map)
    if src.image_shape[:2] != tgt.image_shape[:2]:
        raise ValueError(f"the source's images are {src.image_shape[0]}×{src.image_shape[1]}, the target's "
                         f"{tgt.image_shape[0]}×{tgt.image_shape[1]}: pick two data sets of the same image size")
    if src.n_channels != tgt.n_channels:
        if sorted((src.n_channels, tgt.n_channels)) != [1, 3]:
            raise ValueError(f"the source has {src.n_channels} image channel(s), the target "
                             f"{tgt.n_channels}: the feature extractor cannot be transferred; pick two "
                             "data sets with the same number of channels (or one grey and one RGB)")
        src, tgt = (grey_to_rgb(d) if d.n_channels == 1 else d for d in (src, tgt))
    return src, tgt


def grey_to_rgb(ds: Dataset) -> Dataset:
    """``ds`` with each grey image repeated over three channels (uint8 (N, H, W, 3)), so that a grey
    data set and an RGB one share a feature extractor. The source string records it (``;rgb``)."""
    if ds.n_channels != 1:
        raise ValueError(f"{ds.name} has {ds.n_channels} channels, not 1 (grey)")
    split = lambda s: ImageSet(np.repeat(s.images[..., None], 3, axis=-1), s.labels, s.site)  # noqa: E731
    return Dataset(name=ds.name, train=split(ds.train), val=split(ds.val), test=split(ds.test),
                   n_classes=ds.n_classes, class_names=list(ds.class_names), source=f"{ds.source};rgb",
                   origin=dict(ds.origin))


def relabel(ds: Dataset, label_map: Sequence[int]) -> Dataset:
    """``ds`` with label ``c`` replaced by ``label_map[c]`` (a new label definition; every new class
    0 … max must occur). Class names join the old names they merge."""
    lm = np.asarray(label_map, dtype=np.int64)
    if lm.shape != (ds.n_classes,):
        raise ValueError(f"label_map needs one new label per class ({ds.n_classes}), got {list(label_map)}")
    k = int(lm.max()) + 1
    if lm.min() < 0 or set(lm.tolist()) != set(range(k)) or k < 2:
        raise ValueError(f"label_map {list(label_map)} must map onto 0 … k-1 (k >= 2), every value used")
    names = list(ds.class_names) or [str(c) for c in range(ds.n_classes)]
    new_names = [" + ".join(names[c] for c in range(ds.n_classes) if lm[c] == j) for j in range(k)]
    split = lambda s: ImageSet(s.images, lm[s.labels], s.site)  # noqa: E731
    return Dataset(name=ds.name, train=split(ds.train), val=split(ds.val), test=split(ds.test), n_classes=k,
                   class_names=new_names, source=f"{ds.source};labels={'/'.join(map(str, lm))}",
                   origin=dict(ds.origin))


def split_institutions(ds: Dataset, institutions: int | None = None, *, fraction: float = 1.0,
                       seed: int = 0, no_sites: int = 2) -> list[InstitutionData]:
    """``institutions`` None: one institution per site when the data set has sites (the simulated
    data), else an IID split into ``no_sites`` institutions (MedMNIST has no sites); an integer: an
    IID split into that many. Each institution keeps ``fraction`` of its training split."""
    if institutions is None:
        if ds.train.site is not None:
            return partition(ds, None, "sites", fraction=fraction, seed=seed)
        institutions = no_sites
    return partition(ds, institutions, "iid", fraction=fraction, seed=seed)


# ============================================================================ chain A: the source
@dataclass
class SourceTask:
    """The finished source task on chain A: its run, its members (keys and the global-model digest
    each computed, per round), its blob store holding the published global model, and its layout."""

    result: CollabResult
    dataset: str
    n_classes: int
    n_channels: int
    model: str
    members: list            # LocalAccount of each member
    own_digests: list[dict]  # per member: round -> digest of the global model it computed
    store: BlobStore
    layout: Layout
    vector: np.ndarray
    data: Dataset | None = None   # the source's images (pooled control only; never sent anywhere)

    @property
    def ledger(self):
        """A read-only client of the source task's ledger on chain A."""
        return self.result.institutions[0].ledger.as_account(None)

    @property
    def chain_id(self) -> int:
        return self.ledger.w3.eth.chain_id

    @property
    def final_acc(self) -> float:
        return float(self.result.history[-1]["acc"])


def train_source(ds: Dataset, cfg: CollabConfig, *, institutions: int | None = 3,
                 chain="embedded", store: BlobStore | None = None, quiet: bool = True) -> SourceTask:
    """Collaborative training of the source task on its own chain A (``chain``: "embedded" = a fresh
    in-process chain, a node URL, or a connected Web3 — several source tasks on one chain A get
    their own task ledgers there), ``institutions`` members (None: one per site, IID split
    otherwise). Afterwards every member publishes the global model it computed into chain A's blob
    store; the round callback records each member's own digest of every round (what it will sign)."""
    if chain is None:
        raise ValueError("the source task must run on a chain (chain=None is the chain-free reference)")
    insts = split_institutions(ds, institutions, seed=cfg.seed)
    own: dict[int, dict[int, bytes]] = {}

    def remember(r, members):
        for i, m in enumerate(members):
            own.setdefault(i, {})[r] = m.global_digest()

    res = run_collaborative(insts, ds.n_classes, cfg, chain=chain, quiet=quiet, round_callback=remember)
    store = store if store is not None else MemoryBlobStore("chain-A")
    for m in res.institutions:      # each member publishes its own global model
        if publish_global_model(store, m.global_vec, m.layout) != m.global_digest():
            raise RuntimeError(f"member {m.index}: the published payload does not hash to its attested digest")
    first = res.institutions[0]
    return SourceTask(res, ds.source or ds.name, ds.n_classes, ds.train.n_channels, cfg.model,
                      [m.ledger.account for m in res.institutions], [own[i] for i in range(len(insts))],
                      store, first.layout, first.global_vec.copy(), ds)


def source_on_target(source: SourceTask, target_ds: Dataset) -> dict | None:
    """How different the tasks are: the source's final global model, unchanged (its own head), scored
    on the target's pooled test split — only when both tasks have the same classes (else None)."""
    from medchain.training import evaluate
    if source.n_classes != target_ds.n_classes:
        return None
    return evaluate(source.result.model, target_ds.test)


# ============================================================================ chain B: the bridge
@dataclass
class TargetChain:
    """Chain B: a Web3 connection, its governance account, its Bridge and its blob store."""

    w3: object
    governance: object
    bridge: BridgeClient
    store: BlobStore

    @property
    def identity(self) -> str:
        return self.bridge.identity


def open_target_chain(chain: str = "embedded", *, store: BlobStore | None = None,
                      governance_index: int = 9) -> TargetChain:
    """Connect chain B (a fresh embedded chain, or a node URL) and deploy its Bridge, administered by
    chain B's governance (dev account ``governance_index``)."""
    from medchain.chain import connect, dev_accounts
    w3 = connect(None if chain in (None, "embedded") else chain)
    gov = dev_accounts(w3, governance_index + 1)[governance_index]
    return TargetChain(w3, gov, deploy_bridge(w3, gov), store if store is not None else MemoryBlobStore("chain-B"))


def genesis_hash(w3) -> str:
    """Hash of block 0. In-process chains all share one chain id and start with the same accounts
    and nonces, so a contract address can repeat on two of them; their genesis hashes differ."""
    return "0x" + bytes(w3.eth.get_block(0)["hash"]).hex()


def bridge_transfer(source: SourceTask, chain_b: TargetChain, *, quorum: int = 2,
                    relayer_index: int = 0) -> RelayResult:
    """Carry the source task's final global model to chain B: chain B's governance registers the
    source (chain id + ledger address, its members as signers, ``quorum``), a relayer (any funded
    account of chain B; by default dev account 0, the target consortium's task admin, which then
    deploys the target task ledgers) builds the message from chain A's majority attested digest,
    every member signs only if the digest is the global model it computed, and the bridge accepts
    it with ``quorum`` valid signatures. Returns the relay result (``.id``: the accepted message id)."""
    from medchain.chain import dev_accounts
    ledger = source.ledger
    quorum = min(quorum, len(source.members))
    chain_b.bridge.register_source(source.chain_id, ledger.address, [m.address for m in source.members], quorum)
    relayer_acct = dev_accounts(chain_b.w3, relayer_index + 1)[relayer_index]
    relayer = Relayer(ledger, chain_b.bridge.as_account(relayer_acct), source.store, chain_b.store)
    signers = [MemberSigner(acct, digests, source_chain_id=source.chain_id, source_ledger=ledger.address)
               for acct, digests in zip(source.members, source.own_digests)]
    return relayer.relay(signers)


# ============================================================================ the target task
def local_epochs_for(institutions: list[InstitutionData], batch_size: int, min_local_steps: int,
                     base: int = 1) -> int:
    """Local epochs per round so that the smallest institution makes at least ``min_local_steps``
    optimizer steps per round (scarce data: a few images are one step per epoch)."""
    smallest = min(len(i.train) for i in institutions)
    steps = max(1, math.ceil(smallest / batch_size))
    return max(base, math.ceil(min_local_steps / steps))


def target_policy(cfg: CollabConfig, method: str, chain_b: TargetChain, message_id: bytes,
                  source: SourceTask, anchor_strength: float = 0.01) -> CollabConfig:
    """The target task's policy for ``method`` (``"warm_start"`` or ``"l2sp"``): ``cfg`` warm-started
    from the model chain B's bridge accepted as ``message_id`` (the source task's architecture, to
    parse it), plus, for L2-SP, the penalty of strength ``anchor_strength`` (β) toward it."""
    ref = {"bridge": chain_b.bridge.address, "message": "0x" + bytes(message_id).hex(), "model": source.model,
           "in_chans": int(source.n_channels), "n_classes": int(source.n_classes)}
    return replace(cfg, init="warm_start", bridged_model=ref,
                   l2sp_beta=float(anchor_strength) if method == "l2sp" else 0.0)


def receive_source_model(chain_b: TargetChain, message_id: bytes, source: SourceTask, model: str,
                         n_channels: int, n_classes: int, seed: int, method: str = "warm_start"):
    """What one target institution does on its own (:func:`medchain.protocol.start_model`): receive
    the payload of the accepted message ``message_id`` from chain B's bridge (verified against the
    accepted digest), parse it over the source task's layout, build its own model (``model``,
    drawn from ``seed``: the head stays this fresh one) and warm-start the feature extractor.
    Returns ``(model, anchor)``; the L2-SP anchor (``{feature parameter name: source tensor}``)
    only for ``method == "l2sp"``, else None."""
    cfg = target_policy(CollabConfig(model=model, seed=seed), method, chain_b, message_id, source)
    return start_model(cfg, n_channels, n_classes, w3=chain_b.w3, store=chain_b.store)


def run_target(institutions: list[InstitutionData], n_classes: int, cfg: CollabConfig, method: str,
               chain_b: TargetChain, *, message_id: bytes | None = None, source: SourceTask | None = None,
               anchor_strength: float = 0.01, quiet: bool = True) -> CollabResult:
    """Collaborative training of the target task on chain B with ``method`` ∈ :data:`METHODS`.

    With transfer, the task's policy (:func:`target_policy`) names the bridged message
    (``message_id`` on chain B's bridge, from ``source``): every institution receives the payload
    itself, verifies it and starts from the warm-started model — also the task's initial model
    recorded on the new ledger; ``"l2sp"`` adds the penalty of strength ``anchor_strength`` (β)
    toward the source's feature weights in every local step. The task's blob store holds the
    bridged payload, as the relayer leaves it in chain B's store."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    store = MemoryBlobStore()
    if method == "none":
        return run_collaborative(institutions, n_classes, cfg, chain=chain_b.w3, store=store, quiet=quiet)
    if message_id is None or source is None:
        raise ValueError(f"method {method!r} needs the bridge message_id and the source task")
    store.put(receive(chain_b.bridge.as_account(None), message_id, chain_b.store))
    return run_collaborative(institutions, n_classes,
                             target_policy(cfg, method, chain_b, message_id, source, anchor_strength),
                             chain=chain_b.w3, store=store, quiet=quiet)

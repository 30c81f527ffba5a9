"""FedPer and FedBN: coordinates that stay local during collaborative training
(:func:`run_local_mask`), each institution's personal model, and the audit from the chain that
no local-only coordinate was ever shared (:func:`audit_local_only`)."""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, replace
from typing import Iterable

import numpy as np
import torch
from torch import nn

from medchain import codec
from medchain.blobstore import fetch_payload
from medchain.data.types import ImageSet, InstitutionData
from medchain.models import build_model
from medchain.params import Layout, mask_for_module_types, model_vector, select_names
from medchain.personalize.choices import HEAD_PATTERNS
from medchain.training import to_tensor


def local_mask_for(method: str, layout: Layout, *, head_patterns: Iterable[str] = HEAD_PATTERNS) -> np.ndarray:
    """bool ``(P,)`` of the coordinates that stay local: ``"fedper"`` the head's tensors
    (``head_patterns``), ``"fedbn"`` every BatchNorm weight, bias and running statistic."""
    if method == "fedper":
        mask = select_names(layout, include=tuple(head_patterns), strict=True)
    elif method == "fedbn":
        mask = mask_for_module_types(layout)
        if not mask.any():
            raise ValueError("fedbn: the model has no BatchNorm layer, nothing can stay local")
    else:
        raise ValueError(f"unknown local-mask method {method!r}; choose 'fedper' or 'fedbn'")
    if mask.all():
        raise ValueError(f"{method}: every coordinate would stay local, nothing would be shared")
    return mask


def run_local_mask(institutions: list[InstitutionData], n_classes: int, cfg, method: str, *,
                   chain: str | None = "embedded", store=None, quiet: bool = True,
                   initial_model: nn.Module | None = None):
    """Collaborative training (:func:`medchain.protocol.run_collaborative`) under the policy
    ``cfg`` with ``keep_local=method``: every institution keeps the coordinates of
    :func:`local_mask_for` local. Returns ``(CollabResult, mask)``; the personal models are
    :func:`personal_models` (result).

    initial_model: start from these weights (e.g. the final FedAvg model: personalization
    *after* collaborative training, ``cfg.rounds`` more rounds) instead of a fresh ``cfg.model``
    drawn from ``cfg.seed`` (personalization *during* collaborative training, from scratch).
    Note: ``result.model`` (the "global" model) keeps the *initial* values at the local
    coordinates — nobody shares them — so it is not a model anyone should use."""
    from medchain.protocol import run_collaborative
    cfg = replace(cfg, keep_local=method)
    result = run_collaborative(institutions, n_classes, cfg, chain=chain, store=store, quiet=quiet,
                               initial_model=initial_model)
    return result, local_mask_for(method, result.institutions[0].layout)


def personal_models(result) -> list[nn.Module]:
    """Each institution's deployable model after a run (its own copy): the global weights with
    its local-only coordinates (if any) in place."""
    return [copy.deepcopy(inst.personal_model()).eval() for inst in result.institutions]


@dataclass
class LocalOnlyAudit:
    """What the chain shows about a run with local-only coordinates.

    rounds / payloads: rounds read and update payloads decoded (every one verified against its
    on-chain digest). local_coordinates: |mask|. shared_local: how many times a local-only
    coordinate appeared in a payload (must be 0). shared_union: coordinates shared at least once.
    union_is_complement: the shared coordinates are exactly the non-local ones.
    global_local_unchanged: the aggregated global model still holds the initial values at the
    local coordinates. personal_uses_local: every institution's personal model holds its own
    local values there (and the global values elsewhere). personal_distinct: institutions' local
    values differ from each other and from the initial ones.
    """

    rounds: int
    payloads: int
    senders: int
    local_coordinates: int
    shared_local: int
    shared_union: int
    union_is_complement: bool
    global_local_unchanged: bool
    personal_uses_local: bool
    personal_distinct: bool
    payload_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.shared_local == 0 and self.union_is_complement and self.global_local_unchanged
                and self.personal_uses_local and self.personal_distinct and self.payloads > 0)

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def audit_local_only(result, mask: np.ndarray, *, ledger=None, store=None,
                     initial_model: nn.Module | None = None) -> LocalOnlyAudit:
    """Decode EVERY update payload of every round of a finished run from the ledger
    (``ledger.updates(r)`` → :func:`medchain.blobstore.fetch_payload`, which verifies the
    on-chain digest → :func:`medchain.codec.decode_update`) and check that no coordinate of
    `mask` was ever shared; then check each institution's personal model (see
    :class:`LocalOnlyAudit`). ledger / store default to the first institution's; initial_model:
    the run's initial model (default: a fresh ``cfg.model`` from ``cfg.seed``, as the protocol
    builds it)."""
    insts = result.institutions
    ledger = ledger if ledger is not None else insts[0].ledger
    store = store if store is not None else insts[0].store
    layout: Layout = insts[0].layout
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (layout.size,):
        raise ValueError(f"mask has shape {mask.shape}, expected ({layout.size},)")
    shared = np.zeros(layout.size, dtype=bool)
    payloads = shared_local = nbytes = 0
    senders: set[str] = set()
    rounds = len(result.history)
    for r in range(rounds):
        for rec in ledger.updates(r):
            payload = fetch_payload(rec.digest, rec.payload, store)
            dec = codec.decode_update(payload, expected_layout_id=layout.layout_id,
                                      expected_size=layout.size)
            shared_local += int(mask[dec.indices].sum())
            shared[dec.indices] = True
            payloads += 1
            nbytes += len(payload)
            senders.add(rec.sender)
    cfg = insts[0].cfg
    if initial_model is None:
        n_classes = _output_dim(insts[0].model, insts[0].data.train)
        initial_model = build_model(cfg.model, insts[0].data.train.n_channels, n_classes, cfg.seed)
    init = model_vector(initial_model, layout)
    glob = insts[0].global_vec
    global_unchanged = bool(np.array_equal(glob[mask], init[mask]))
    uses_local, notes = True, []
    locals_ = []
    for inst in insts:
        pers = model_vector(inst.personal_model(), layout)
        own = bool(np.array_equal(pers[mask], inst.local_vec[mask]))
        rest = bool(np.array_equal(pers[~mask], inst.global_vec[~mask]))
        if not (own and rest):
            uses_local = False
            notes.append(f"institution {inst.index}: personal model "
                         f"{'lacks its local values' if not own else 'differs from the global model outside the mask'}")
        locals_.append(pers[mask])
    distinct = all(not np.array_equal(a, init[mask]) for a in locals_) and \
        all(not np.array_equal(locals_[i], locals_[j]) for i in range(len(locals_)) for j in range(i))
    return LocalOnlyAudit(rounds, payloads, len(senders), int(mask.sum()), shared_local,
                          int(shared.sum()), bool(np.array_equal(shared, ~mask)), global_unchanged,
                          uses_local, distinct, nbytes, notes)


def _output_dim(model: nn.Module, data: ImageSet) -> int:
    """Number of logits `model` produces (a forward pass on two images, in eval mode)."""
    probe = copy.deepcopy(model).eval()
    with torch.no_grad():
        return int(probe(to_tensor(data.images[:2])).shape[1])

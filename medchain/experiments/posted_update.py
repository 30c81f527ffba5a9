"""The update an institution really posts, as a gradient-inversion case (claim 2's main threat
setting): a one-round task run by the real :class:`medchain.protocol.Institution` and read back
from the ledger, so that "the update" has one implementation — the protocol's.

It lives here, above the protocol, because the attacks sit below it (import-linter layers): the
attacks decode and invert a payload; this module produces the payload the protocol posts.
"""
from __future__ import annotations

import math

from torch import nn

from medchain import codec
from medchain.attacks.inversion import InversionCase, PublicInfo, as_batch
from medchain.blobstore import fetch_payload
from medchain.data.types import ImageSet, InstitutionData
from medchain.models import build_model
from medchain.params import Layout, model_vector
from medchain.protocol import CollabConfig, run_collaborative


def protocol_case(images, labels, *, model: nn.Module, cfg: CollabConfig, num_classes: int,
                  others: tuple = (), chain=None, dp_plan=None) -> InversionCase:
    """The update the protocol really posts: a one-round task (``cfg`` with rounds = 1 and a
    constant lr) in which the target institution holds ``images`` (B, H, W[, C]) uint8 /
    ``labels`` (B,) and each further institution one ``(images, labels)`` of ``others``; every
    institution starts from ``model`` (the trained global model, left untouched) and runs
    :class:`~medchain.protocol.Institution` unchanged (the task's model, local epochs, batch size,
    optimizer, BN recalibration, θu / rule / γ / σ, BN-statistics policy). The payload is read back
    from the ledger (``chain=None``: the in-memory ledger; ``"embedded"`` or a URL: a chain) and
    the blob store, as any member reads it; the public information comes from the task parameters.
    dp_plan: with a DP-SGD task, the plan of the institution the target stands in for (its real
    noise multiplier and clip bound; the one-round task alone would calibrate other noise).
    """
    x, y = as_batch(images, labels)
    c = CollabConfig(**{**cfg.to_dict(), "rounds": 1, "lr_floor": 1.0})
    sets = [ImageSet(x, y)] + [ImageSet(*as_batch(bx, by)) for bx, by in others]
    insts = [InstitutionData(i, d, d, d) for i, d in enumerate(sets)]
    layout = Layout.from_module(model)
    if Layout.from_module(build_model(c.model, sets[0].n_channels, num_classes, 0)) != layout:
        raise ValueError(f"model does not have the layout of the task's model {c.model!r} "
                         f"({sets[0].n_channels} channels, {num_classes} classes)")
    res = run_collaborative(insts, num_classes, c, chain=chain, eval_set=sets[0], initial_model=model,
                            dp_plans={d.index: dp_plan for d in insts} if dp_plan is not None else None)
    inst = res.institutions[0]
    sender = getattr(inst.ledger.account, "address", inst.ledger.account)
    mine = [r for r in inst.ledger.updates(0) if r.sender == sender]
    if len(mine) != 1:
        raise RuntimeError(f"expected one update of the target institution on the ledger, found {len(mine)}")
    rec = mine[0]
    payload = fetch_payload(rec.digest, bytes(rec.payload), inst.store)
    steps = c.local_epochs * max(1, math.ceil(len(y) / c.batch_size))
    public = PublicInfo(c.model, sets[0].n_channels, num_classes, tuple(x.shape[1:3]),
                        model_vector(model, layout), float(c.lr), steps, int(rec.n_samples), True,
                        {}, c.optimizer)
    dec = codec.decode_update(payload, expected_layout_id=layout.layout_id, expected_size=layout.size)
    selection = {"theta_u": c.theta_u, "rule": c.select_rule, "bn_stats": c.bn_stats, "gamma": c.gamma,
                 "sigma": c.sigma, "n_shared": int(dec.n), "P": layout.size, "seed": c.seed,
                 "local_epochs": c.local_epochs, "batch_size": c.batch_size, "optimizer": c.optimizer,
                 "lr": c.lr, "ledger_address": res.ledger_address, "final_block_hash": res.final_block_hash,
                 "digest": bytes(rec.digest).hex(), "payload_bytes": len(payload)}
    return InversionCase(payload, public, x, y, "protocol", selection)

"""What a local drill reports once its node processes are done (:class:`DrillResults`, a part of
:class:`~medchain.node.drill.Deployment`): per-node round records, the global model rebuilt from
the chain and scored on the pooled test splits, speed and memory, and what happened beyond plain
rounds (updates left out and why, differing attestations, removed members, drill actions)."""
from __future__ import annotations

import time

import numpy as np

from medchain.baselines import pooled_test
from medchain.blobstore import store_for
from medchain.chain import LedgerClient, chain_identity, final_block_hash
from medchain.data import partition as split
from medchain.node.institution import rebuild_global
from medchain.node.procstats import proc_peak_rss_mb
from medchain.training import evaluate


class DrillResults:
    """The results part of :class:`~medchain.node.drill.Deployment` (a mixin: it reads the drill's
    chain, ledger, accounts, node processes and timeline)."""

    def results(self, dataset) -> tuple[list[dict], dict]:
        """(metric rows, summary) after the run: per-node round records, and the global model rebuilt
        from the chain here, scored on the pooled test splits of all institutions."""
        insts = split(dataset, None if self.partition == "sites" else self.n, self.partition, alpha=self.alpha,
                      fraction=self.fraction, seed=self.cfg.seed)
        reader = LedgerClient(self.w3, self.ledger.address)
        observer = rebuild_global(reader, insts[0], dataset.n_classes, store=store_for(self.blobs))
        model = observer.personal_model()
        final = evaluate(model, pooled_test(insts))
        last = self.cfg.rounds - 1
        on_chain = reader.majority_digest(last)
        rows, finals = [], []
        for p in self.nodes:
            for m in p.metrics():
                if m["event"] == "round":
                    rows.append({"institution": p.index, "byzantine": self.byzantine.get(p.index, ""), **m})
                elif m["event"] == "final":
                    finals.append({"institution": p.index, "launched_at": p.launched_at, **m})
        rows.append({"event": "final", "institution": -1, "round": last, "eval_on": "pooled_test",
                     "digest": observer.global_digest().hex(), **{k: final[k] for k in ("acc", "auc", "loss")
                                                                  if k in final}})
        node_digests = sorted({f["final_digest"] for f in finals})
        busy = sum(f["timings"]["train"] + f["timings"]["encode"] + f["timings"]["replay"] + f["timings"]["chain_total"]
                   + f["timings"]["eval"] for f in finals)
        chain = sum(f["timings"]["chain_total"] for f in finals)
        span = (self.timeline.get("finished", time.time())
                - self.timeline.get("started", self.timeline.get("launched", time.time())))
        round_rows = [r for r in rows if r.get("event") == "round"]
        first_close = min((r["t"] for r in round_rows if r["round"] == 0), default=None)
        per_round = []   # steady state: from the close of round 0 to that of the last round, per node
        for i in range(self.n):
            ts = {r["round"]: r["t"] for r in round_rows if r["institution"] == i}
            if self.cfg.rounds > 1 and 0 in ts and last in ts and ts[last] > ts[0]:
                per_round.append((ts[last] - ts[0]) / last)
        round_s = float(np.median(per_round)) if per_round else None
        summary = {
            "final_acc": final["acc"], "final_auc": final.get("auc"),
            "final_digest": observer.global_digest().hex(),
            "final_digest_on_chain": None if on_chain is None else on_chain.hex(),
            "node_final_digests": node_digests,
            "all_nodes_agree": node_digests == [observer.global_digest().hex()],
            "ledger_address": self.ledger.address,
            "chain_identity": chain_identity(self.w3, self.ledger.address),
            "final_block_hash": final_block_hash(self.w3),
            "processes": self.n, "rounds": self.cfg.rounds, "aggregation": self.cfg.aggregation,
            "byzantine": {str(k): v for k, v in self.byzantine.items()},
            "refused_updates": {str(r): [s for s, _ in v] for r, v in observer.refused.items() if v},
            **self._what_happened(reader, observer),
            "wall_s": round(span, 3),
            "rounds_per_min": round(60 * self.cfg.rounds / span, 2) if span > 0 else None,
            "round_s_steady": None if round_s is None else round(round_s, 3),
            "rounds_per_min_steady": round(60 / round_s, 2) if round_s else None,
            "chain_overhead_pct": round(100 * chain / busy, 2) if busy else None,
            "ready_s": {str(f["institution"]): f["ready_s"] for f in finals},
            "startup_s": {str(f["institution"]): f["startup_s"] for f in finals},
            "startup_cpu_s": {str(f["institution"]): f.get("startup_cpu_s") for f in finals},
            "peak_rss_mb": {str(f["institution"]): f["peak_rss_mb"] for f in finals},
            "pss_mb": {str(f["institution"]): f.get("pss_mb") for f in finals},
            "first_round_closed_s": first_close,
            "anvil_peak_rss_mb": proc_peak_rss_mb(getattr(getattr(self.chain, "_proc", None), "pid", None)),
        }
        return rows, summary

    def _what_happened(self, reader, observer) -> dict:
        """What the chain and the nodes' drill records say happened beyond plain rounds: updates left
        out (withdrawn, unavailable, refused payloads) and why, attestations that differ from the
        majority, members no longer active, drill actions and whether the ledger refused them; plus
        ``what_happened``, the same as one sentence per fact."""
        who = {a.address: i for i, a in enumerate(self.accounts[1:])}

        def name(addr: str) -> str:
            return f"institution {who[addr]}" if addr in who else addr

        active = set(reader.members())
        removed = sorted(name(a) for a in who if a not in active)
        mismatches, lines = {}, []
        for r in range(self.cfg.rounds):
            majority = reader.majority_digest(r)
            bad = [a.member for a in reader.attestations(r) if a.digest != majority]
            if bad:
                mismatches[str(r)] = bad
                lines += [f"round {r}: {name(m)} attested a global digest that differs from the majority"
                          + (" (its attestation no longer counts: removed)" if m not in active else "")
                          for m in bad]
        for r, refused in sorted(observer.refused.items()):
            lines += [f"round {r}: the update of {name(s)} was left out by every replica: {why}" for s, why in refused]
        drills = [{"institution": p.index, **{k: m[k] for k in ("round", "action", "refused", "outcome")}}
                  for p in self.nodes for m in p.metrics() if m["event"] == "drill"]
        seen = set()
        for d in drills:                     # a node restarted mid-round may repeat an action: once each
            key = (d["institution"], d["round"], d["action"])
            if key not in seen:
                seen.add(key)
                lines.append(f"round {d['round']}: institution {d['institution']} (drill) {d['action']}: {d['outcome']}")
        lines += [f"{m} was removed from the task by the admin" for m in removed]
        unavailable = {}
        for r in range(self.cfg.rounds):
            gone = [u.sender for u in reader.updates(r) if u.unavailable and not u.payload]
            if gone:
                unavailable[str(r)] = gone
        return {"unavailable_updates": unavailable, "attestation_mismatches": mismatches,
                "removed_members": removed, "drill_actions": drills, "what_happened": lines}

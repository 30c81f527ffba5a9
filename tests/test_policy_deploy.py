"""`medchain node` processes read the round policy from the task on chain and follow it: FedBN with
L2-SP toward (and a warm start from) a model accepted by the bridge on the task's chain, and a
partial update — with the same final digest as the in-process simulation of the same task, and the
policy printed by `medchain ledger show`."""
from __future__ import annotations

import pytest

from conftest import needs_anvil  # noqa: E402
from drills import final_digests, one_thread, toy_source  # noqa: E402


def bridged_source(w3, store) -> dict:
    """Put a source model (cnn, 1 channel, 3 classes) on ``w3``'s chain as chain B would receive it:
    a Bridge (admin: dev account 8), a registered source task (another chain id, one signer: dev
    account 9), the model's payload in ``store`` and the signed message relayed. Returns the
    policy's ``bridged_model`` reference."""
    from medchain.chain import deploy_bridge, dev_accounts
    from medchain.chain.bridge_message import KIND_GLOBAL_MODEL, BridgeMessage, sign_message
    from medchain.crosschain import model_payload
    from medchain.models import build_model
    from medchain.params import Layout, model_vector

    admin, signer = dev_accounts(w3, 10)[8:10]
    bridge = deploy_bridge(w3, admin)
    source_ledger = "0x" + "5a" * 20
    bridge.register_source(4242, source_ledger, [signer.address], 1)
    net = build_model("cnn", 1, 3, seed=77)
    layout = Layout.from_module(net)
    payload = model_payload(model_vector(net, layout), layout)
    digest = store.put(payload)
    msg = BridgeMessage(4242, source_ledger, 9, digest, KIND_GLOBAL_MODEL, len(payload))
    bridge.as_account(signer).relay(msg, [sign_message(signer, msg, w3.eth.chain_id, bridge.address)])
    assert bridge.accepted(msg.id())
    return {"bridge": bridge.address, "message": "0x" + msg.id().hex(), "model": "cnn", "in_chans": 1,
            "n_classes": 3}


POLICIES = {
    "fedbn+l2sp": lambda ref: {"keep_local": "fedbn", "init": "warm_start", "l2sp_beta": 0.5,
                               "bridged_model": ref},
    "partial": lambda ref: {"theta_u": 0.2},
}


def _decoded(ledger, store, rounds):
    from medchain import codec
    from medchain.blobstore import fetch_payload
    return [codec.decode_update(fetch_payload(u.digest, bytes(u.payload), store))
            for r in range(rounds) for u in ledger.updates(r)]


@pytest.mark.anvil
@needs_anvil
@pytest.mark.parametrize("name", list(POLICIES))
def test_node_processes_follow_the_policy_recorded_on_chain(name, tmp_path, capsys):
    from medchain.blobstore import store_for
    from medchain.chain import LedgerClient
    from medchain.cli import main
    from medchain.data import load_dataset, partition
    from medchain.node import Deployment
    from medchain.params import digest_vector, mask_for_module_types, model_vector
    from medchain.protocol import CollabConfig, run_collaborative, start_model

    src = toy_source(tmp_path)
    base = CollabConfig(rounds=2, batch_size=32, lr=3e-3, model="cnn")
    with Deployment(3, base, data=src, workdir=tmp_path / "run") as dep:
        dep.start_chain()
        store = store_for(dep.blobs)
        ref = bridged_source(dep.w3, store)
        dep.cfg = cfg = CollabConfig(**{**base.to_dict(), **POLICIES[name](ref)})
        dep.create_task(1, 2)
        dep.launch()
        dep.start_task()
        assert set(dep.wait(300).values()) == {0}
        nodes = final_digests(dep)
        cfg = dep.cfg                                     # with the drill's max_samples cap
        ledger = LedgerClient(dep.w3, dep.ledger.address)
        posted = _decoded(ledger, store, cfg.rounds)

        # the in-process simulation of the same task, on the same chain (whose bridge it also reads)
        insts = partition(load_dataset(src), 3, "iid", seed=cfg.seed)
        with one_thread():
            sim = run_collaborative(insts, 2, cfg, chain=dep.w3, store=store)
            # L2-SP acted: the same task without the anchor ends elsewhere
            plain = run_collaborative(insts, 2, CollabConfig(**{**cfg.to_dict(), "l2sp_beta": 0.0}),
                                      chain=dep.w3, store=store) if cfg.l2sp_beta else None
        assert nodes == {sim.final_digest.hex()}
        assert plain is None or plain.final_digest != sim.final_digest
        sim_posted = _decoded(sim.institutions[0].ledger, store, cfg.rounds)
        assert ledger.task().initial_model_digest == sim.institutions[0].ledger.task().initial_model_digest

        init_digest = ledger.task().initial_model_digest
        warm, anchor = start_model(cfg, 1, 2, w3=dep.w3, store=store)
        assert main(["ledger", "show", dep.url, dep.ledger.address]) == 0
        shown = capsys.readouterr().out

    layout = sim.institutions[0].layout
    assert len(posted) == 3 * cfg.rounds
    if name == "fedbn+l2sp":
        bn = mask_for_module_types(layout)
        assert not any(bn[d.indices].any() for d in posted)          # no BatchNorm value left a node
        assert all(d.n == int((~bn).sum()) for d in posted)
        fresh, _ = start_model(CollabConfig(**{**cfg.to_dict(), "init": "fresh", "l2sp_beta": 0.0,
                                               "bridged_model": None}), 1, 2)
        assert init_digest == digest_vector(model_vector(warm, layout), layout)
        assert digest_vector(model_vector(fresh, layout), layout) != init_digest
        assert anchor and not any(k.startswith("head.") for k in anchor)
        assert 'keep_local="fedbn"' in shown and "l2sp_beta=0.5" in shown
        assert ref["message"] in shown and 'init="warm_start"' in shown
    else:
        assert all(d.n < 0.5 * layout.size for d in posted)                 # θu = 0.2 of the update
        assert sorted(d.n for d in posted) == sorted(d.n for d in sim_posted)
        assert "theta_u=0.2" in shown and 'keep_local="none"' in shown
    assert "policy upload" in shown and "policy merge" in shown

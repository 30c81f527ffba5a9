"""The round policy: every CollabConfig field in one section, strict parsing of a task's
parameters (an unknown key is an error naming it), the bridged-model reference checked before a
task is deployed, and `--policy FILE` of `medchain task create`."""
from __future__ import annotations

import json
from dataclasses import fields
from types import SimpleNamespace

import pytest

from medchain.node.task import NodeError, config_from_task
from medchain.protocol import (METADATA_KEYS, POLICY_SECTIONS, CollabConfig, config_from_params,
                               policy_sections)

REF = {"bridge": "0x" + "ab" * 20, "message": "0x" + "CD" * 32, "model": "cnn", "in_chans": 1, "n_classes": 3}


def test_every_config_field_is_in_exactly_one_policy_section():
    placed = [k for keys in POLICY_SECTIONS.values() for k in keys]
    assert sorted(placed) == sorted(f.name for f in fields(CollabConfig))
    cfg = CollabConfig(keep_local="fedbn", theta_u=0.5)
    sec = policy_sections(cfg)
    assert sec["upload"]["keep_local"] == "fedbn" and sec["upload"]["theta_u"] == 0.5
    assert sec["init"] == {"model": "cnn", "seed": 0, "init": "fresh", "bridged_model": None}


def test_params_round_trip_with_metadata_keys():
    cfg = CollabConfig(rounds=3, init="warm_start", l2sp_beta=0.02, bridged_model=REF, keep_local="fedper")
    params = json.loads(json.dumps({**cfg.to_dict(), "layout_id": "00" * 32, "n_classes": 2, "in_chans": 1}))
    assert set(params) - {f.name for f in fields(CollabConfig)} == set(METADATA_KEYS)
    back = config_from_params(params)
    assert back == cfg
    assert back.bridged_model["message"] == REF["message"].lower()     # normalized once, stable after


def test_an_unknown_parameter_is_an_error_naming_it_and_the_valid_keys():
    params = {**CollabConfig().to_dict(), "keep_locals": "fedbn"}
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['keep_locals'\]") as exc:
        config_from_params(params, where="ledger 0xABC")
    msg = str(exc.value)
    assert "ledger 0xABC" in msg and "'keep_local'" in msg and "'layout_id'" in msg
    task = SimpleNamespace(params=params, n_rounds=20, address="0xABC")
    with pytest.raises(NodeError, match="keep_locals"):             # a node refuses to run it
        config_from_task(task)


def test_old_tasks_without_the_new_keys_still_parse():
    params = {k: v for k, v in CollabConfig(rounds=4).to_dict().items()
              if k not in ("init", "l2sp_beta", "bridged_model")}
    task = SimpleNamespace(params=params, n_rounds=4, address="0xABC")
    assert config_from_task(task) == CollabConfig(rounds=4)


@pytest.mark.parametrize("kw,match", [
    ({"init": "warm_start"}, "bridged_model must be given"),
    ({"l2sp_beta": 0.1}, "bridged_model must be given"),
    ({"bridged_model": REF}, "bridged_model must be given"),                       # given but unused
    ({"init": "scratch"}, "init must be one of"),
    ({"l2sp_beta": -1.0, "bridged_model": REF}, "l2sp_beta must be >= 0"),
    ({"l2sp_beta": 0.1, "prox_mu": 0.1, "bridged_model": REF}, "prox_mu and l2sp_beta"),
    ({"init": "warm_start", "bridged_model": {**REF, "extra": 1}}, "exactly the keys"),
    ({"init": "warm_start", "bridged_model": {**REF, "message": "0x12"}}, "accepted message id"),
    ({"init": "warm_start", "bridged_model": {**REF, "bridge": "bridge"}}, "0x address"),
    ({"init": "warm_start", "bridged_model": {**REF, "model": "vgg99"}}, "bridged_model.model"),
    ({"init": "warm_start", "bridged_model": {**REF, "n_classes": 1}}, "n_classes must be an integer >= 2"),
])
def test_bad_transfer_policies_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        CollabConfig(**kw)


def test_the_chain_free_reference_cannot_start_from_a_bridged_model():
    from medchain.data.types import InstitutionData
    from medchain.protocol import Institution, MemoryLedger

    from conftest import toy_images   # noqa: E402

    cfg = CollabConfig(init="warm_start", bridged_model=REF)
    d = InstitutionData(0, toy_images(8), toy_images(4, 1), toy_images(4, 2))
    with pytest.raises(ValueError, match="needs a chain ledger"):
        Institution(d, 2, cfg, MemoryLedger(b"\0" * 32, 1).as_account("a"))


def _create(tmp_path, monkeypatch, policy) -> tuple[int, str]:
    from medchain.cli import main

    path = tmp_path / "policy.json"
    path.write_text(policy if isinstance(policy, str) else json.dumps(policy))
    monkeypatch.setenv("TEST_ADMIN_KEY", "0x" + "11" * 32)
    return main(["task", "create", "--rpc", "http://127.0.0.1:9", "--key-env", "TEST_ADMIN_KEY",
                 "--members", "0x" + "22" * 20, "--classes", "2", "--policy", str(path)])


@pytest.mark.parametrize("policy,message", [
    ({"keep_local": "fedbn", "fedprox": 0.1}, "unknown parameter(s) ['fedprox']"),
    ({"layout_id": "00"}, "written by `task create` itself"),
    ({"keep_local": "fedxx"}, "keep_local must be one of"),
    ("[1, 2]", "expected a JSON object"),
    ("{not json", "cannot read a JSON object"),
])
def test_task_create_refuses_a_bad_policy_file_before_connecting(tmp_path, monkeypatch, capsys, policy, message):
    rc = _create(tmp_path, monkeypatch, policy)
    err = capsys.readouterr().err
    assert rc == 1 and message in err, err
    assert "127.0.0.1:9" not in err          # refused before any connection attempt

"""`medchain node` (one institution process), `medchain task create` (deploy + start a task) and
`medchain simulate` (an anvil node plus N institution processes on this machine)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields
from pathlib import Path

from medchain.cli._args import FRACTION, NONNEG_FLOAT, NONNEG_INT, POS_FLOAT, POS_INT, number as _number

#: The defaults of medchain.protocol.CollabConfig that the options below show, written out so that
#: registering them (``medchain node|task|simulate --help``) does not import torch and web3; kept
#: equal to CollabConfig by tests/test_cli.py.
TRAINING_DEFAULTS: dict = {
    "local_epochs": 1, "batch_size": 32, "lr": 2e-3, "lr_floor": 0.02, "optimizer": "adam",
    "weight_decay": 0.0, "prox_mu": 0.0, "server_lr": 1.0, "server_momentum": 0.0, "aggregation": "mean",
    "theta_u": 1.0, "theta_d": 1.0, "model": "cnn", "seed": 0, "max_inline_bytes": 64_000,
    "max_abs_update": 1e3, "max_samples": None, "bn_recalibrate": True,
}


def _add_training_args(p: argparse.ArgumentParser, rounds_default: int) -> None:
    d = argparse.Namespace(**TRAINING_DEFAULTS)
    g = p.add_argument_group("training parameters (recorded on chain in the task params)")
    g.add_argument("--rounds", type=POS_INT, default=rounds_default)
    g.add_argument("--local-epochs", type=POS_INT, default=d.local_epochs)
    g.add_argument("--batch-size", type=POS_INT, default=d.batch_size)
    g.add_argument("--lr", type=POS_FLOAT, default=d.lr)
    g.add_argument("--lr-floor", type=_number(float, low=0, high=1), default=d.lr_floor)
    g.add_argument("--optimizer", default=d.optimizer, choices=("adam", "adamw", "sgd"))
    g.add_argument("--weight-decay", type=NONNEG_FLOAT, default=d.weight_decay)
    g.add_argument("--prox-mu", type=NONNEG_FLOAT, default=d.prox_mu)
    g.add_argument("--server-lr", type=POS_FLOAT, default=d.server_lr)
    g.add_argument("--server-momentum", type=_number(float, low=0, high=1, high_open=True),
                   default=d.server_momentum)
    g.add_argument("--aggregation", default=d.aggregation,
                   help="mean | median | trimmed_mean[:beta] | norm_clip[:bound] | multi_krum[:f]")
    g.add_argument("--theta-u", type=FRACTION, default=d.theta_u, help="fraction of each update uploaded")
    g.add_argument("--theta-d", type=FRACTION, default=d.theta_d)
    g.add_argument("--model", default=d.model)
    g.add_argument("--seed", type=_number(int, low=0, high=2 ** 63, high_open=True), default=d.seed)
    g.add_argument("--max-inline-bytes", type=NONNEG_INT, default=d.max_inline_bytes)
    g.add_argument("--max-abs-update", type=POS_FLOAT, default=d.max_abs_update)
    g.add_argument("--max-samples", type=_number(int, low=1, high=2 ** 64, high_open=True), default=d.max_samples,
                   help="cap on the sample count an update may report (the ledger refuses 0 and more); "
                        "set it near the largest member's training set, above all with rule mean "
                        "(simulate: default the largest share; task create: default none)")
    g.add_argument("--no-bn-recalibrate", dest="bn_recalibrate", action="store_false", default=d.bn_recalibrate)
    g.add_argument("--deadline-blocks", type=NONNEG_INT, default=0,
                   help="after D blocks anyone may close a round that has --quorum updates (0: no deadline)")
    g.add_argument("--quorum", type=POS_INT, default=None, help="default: every member")
    g.add_argument("--policy", type=Path, default=None, metavar="FILE.json",
                   help="the round policy as a JSON object of task parameters; its keys win over the "
                        "options above. Any CollabConfig field: keep_local (none|fedbn|fedper), bn_stats "
                        "(shared|local), theta_u/select_rule/select_scope/gamma/sigma (partial update), prox_mu, "
                        "init (fresh|warm_start), l2sp_beta, bridged_model ({bridge, message, model, in_chans, "
                        "n_classes}: a model accepted by the bridge on this chain), aggregation, server_lr, ... "
                        "An unknown key is an error")


def _config(args):
    """The task's CollabConfig: the training options, overridden by the keys of ``--policy``."""
    from medchain.protocol import METADATA_KEYS, CollabConfig, config_from_params
    flags = {f.name: getattr(args, f.name) for f in fields(CollabConfig) if hasattr(args, f.name)}
    if getattr(args, "policy", None) is None:
        return CollabConfig(**flags)
    try:
        policy = json.loads(Path(args.policy).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--policy {args.policy}: cannot read a JSON object ({exc})") from None
    if not isinstance(policy, dict):
        raise ValueError(f"--policy {args.policy}: expected a JSON object of task parameters, got "
                         f"{type(policy).__name__}")
    meta = sorted(set(policy) & set(METADATA_KEYS))
    if meta:
        raise ValueError(f"--policy {args.policy}: {meta} are written by `task create` itself, not by the policy")
    return config_from_params({**flags, **policy}, where=f"--policy {args.policy}")


def _logging(level: str, prefix: str = "") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format=f"%(asctime)s {prefix}%(levelname)s %(message)s", datefmt="%H:%M:%S", force=True)
    for noisy in ("web3", "urllib3", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def register(sub) -> None:
    p = sub.add_parser("node", help="run one institution of a task on a JSON-RPC node (deployment mode)",
                       description="Run one institution: read the task from the ledger, then train, submit, "
                                   "replay and attest every round until the task ends. Resumes from the chain "
                                   "after a restart.")
    p.add_argument("--rpc", required=True, help="JSON-RPC URL of the node (http(s):// or ws(s)://)")
    p.add_argument("--ledger", required=True, help="address of the task's TaskLedger contract")
    p.add_argument("--key-env", required=True, metavar="VAR",
                   help="environment variable holding this institution's private key (never pass keys as arguments)")
    p.add_argument("--data", default="simulated", help="data source (see `medchain data info`)")
    p.add_argument("--partition", default="iid", help="iid | dirichlet | quantity | sites")
    p.add_argument("--institutions", type=POS_INT, required=True, help="number of institutions in the split")
    p.add_argument("--institution-index", type=NONNEG_INT, required=True,
                   help="this institution's share (0-based)")
    p.add_argument("--alpha", type=POS_FLOAT, default=0.5, help="Dirichlet concentration")
    p.add_argument("--fraction", type=FRACTION, default=1.0, help="keep this fraction of the train split")
    p.add_argument("--seed", type=NONNEG_INT, default=None, help="partition seed (default: the task's seed)")
    p.add_argument("--blobs", default=None, help="blob store directory or URI (payloads above max_inline_bytes)")
    p.add_argument("--metrics", type=Path, default=None, help="append one JSON line per round here")
    p.add_argument("--threads", type=POS_INT, default=1,
                   help="torch threads (default 1; bit-identical results need the same count everywhere)")
    p.add_argument("--poll-interval", type=POS_FLOAT, default=0.2, help="seconds between chain polls")
    p.add_argument("--rpc-timeout", type=POS_FLOAT, default=120.0,
                   help="stop after the RPC endpoint has been unreachable this long (s)")
    p.add_argument("--round-timeout", type=POS_FLOAT, default=3600.0,
                   help="stop after waiting this long for a round")
    p.add_argument("--availability-wait", type=NONNEG_FLOAT, default=5.0,
                   help="after a round closed, wait this long (s) for a payload missing from the blob store "
                        "before reporting it unavailable on chain")
    p.add_argument("--byzantine", default=None, metavar="KIND[:SCALE][+BEHAVIOUR...]",
                   help="drills only: submit a malicious update (signflip, scale, random, huge) and/or act out "
                        "zero-samples, huge-samples, garbage-attest, withhold-blob (joined by '+')")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=_node)

    t = sub.add_parser("task", help="create a collaborative task on a chain")
    tsub = t.add_subparsers(dest="task_command", required=True)
    c = tsub.add_parser("create", help="deploy, configure and start a TaskLedger; prints its address")
    c.add_argument("--rpc", required=True)
    c.add_argument("--key-env", required=True, metavar="VAR", help="environment variable with the admin's key")
    c.add_argument("--members", required=True, help="comma-separated member addresses")
    c.add_argument("--classes", type=_number(int, low=2), default=None, help="number of classes (or give --data)")
    c.add_argument("--channels", type=POS_INT, default=None, help="image channels (default 1, or from --data)")
    c.add_argument("--data", default=None, help="infer --classes/--channels from this data source")
    _add_training_args(c, 20)
    c.set_defaults(func=_task_create)

    s = sub.add_parser("simulate", help="an anvil chain plus N institution processes on this machine",
                       description="Launch a local anvil node, create a task, run N `medchain node` processes "
                                   "(keys passed in environment variables) and collect metrics.csv / summary.json.")
    s.add_argument("--processes", type=POS_INT, default=3)
    s.add_argument("--data", default="simulated:n=600")
    s.add_argument("--partition", default="iid")
    s.add_argument("--alpha", type=POS_FLOAT, default=0.5)
    s.add_argument("--fraction", type=FRACTION, default=1.0)
    s.add_argument("--out", type=Path, default=None,
                   help="an empty or new folder for this run (locked while it runs); default: a fresh "
                        "results/simulate/run-<date>-<time>")
    s.add_argument("--byzantine", default="", metavar="I:KIND[:SCALE],...",
                   help="drills: institutions that submit malicious updates, e.g. '0:signflip,3:huge:5000'")
    s.add_argument("--threads", type=POS_INT, default=1)
    s.add_argument("--timeout", type=POS_FLOAT, default=1800.0)
    s.add_argument("--chain-id", type=POS_INT, default=31337)
    _add_training_args(s, 5)
    s.set_defaults(func=_simulate)


def _node(args) -> int:
    import torch

    from medchain.attacks.byzantine import byzantine_select, check_byzantine, parse_drill
    from medchain.blobstore import store_for
    from medchain.chain import key_from_env
    from medchain.node import load_institution, run_node

    _logging(args.log_level, f"[institution {args.institution_index}] ")
    torch.set_num_threads(args.threads)
    account = key_from_env(args.key_env)

    def data(cfg):   # the split uses the task's seed unless --seed is given, as the simulation does
        inst, n_classes, _ = load_institution(args.data, args.partition, args.institutions,
                                              args.institution_index, alpha=args.alpha, fraction=args.fraction,
                                              seed=cfg.seed if args.seed is None else args.seed)
        return inst, n_classes
    select, hostile = None, frozenset()
    if args.byzantine:
        check_byzantine({args.institution_index: args.byzantine}, args.institution_index + 1)
        kind, scale, hostile = parse_drill(args.byzantine)
        if kind is not None:
            select = byzantine_select(kind, scale, seed=args.institution_index)
        logging.getLogger("medchain.node").warning("DRILL: this institution acts out %s", args.byzantine)
    res = run_node(args.rpc, args.ledger, account, data, store=store_for(args.blobs), select=select,
                   poll_interval=args.poll_interval, rpc_timeout=args.rpc_timeout,
                   round_timeout=args.round_timeout, availability_wait=args.availability_wait,
                   metrics_path=args.metrics, hostile=hostile)
    print(json.dumps({"final_digest": res.final_digest, "rounds": len(res.rounds)}))
    return 0


def _task_create(args) -> int:
    from medchain.chain import connect, key_from_env
    from medchain.node import create_task

    _logging("INFO")
    admin = key_from_env(args.key_env)
    members = [m.strip() for m in args.members.split(",") if m.strip()]
    classes, channels = args.classes, args.channels
    if args.data:
        from medchain.data import load_dataset
        ds = load_dataset(args.data)
        classes = classes or ds.n_classes
        channels = channels or ds.n_channels
    if classes is None:
        raise ValueError("give --classes K (or --data SOURCE to read it from the data)")
    cfg = _config(args)          # every training parameter checked (CollabConfig) before connecting
    from medchain.chain.ledger import member_address
    members = [member_address(m) for m in members]
    w3 = connect(args.rpc)       # create_task checks members, quorum and the model before any transaction
    ledger = create_task(w3, admin, cfg, members, n_classes=classes, in_chans=channels or 1,
                         deadline_blocks=args.deadline_blocks,
                         quorum=args.quorum if args.quorum is not None else len(members))
    print(ledger.address)
    return 0


def parse_byzantine(text: str) -> dict[int, str]:
    """'0:signflip,3:huge:5000' → {0: 'signflip', 3: 'huge:5000'}."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        idx, sep, kind = item.partition(":")
        if not sep or not idx.isdigit() or not kind:
            raise ValueError(f"bad --byzantine item {item!r}: expected INDEX:KIND[:SCALE]")
        out[int(idx)] = kind
    return out


def _simulate(args) -> int:
    from medchain.attacks.byzantine import check_byzantine

    byzantine = check_byzantine(parse_byzantine(args.byzantine), args.processes)   # before anything starts
    cfg = _config(args)
    _logging("INFO")
    from medchain.node import simulate   # loads torch and web3: only once the arguments are checked
    summary = simulate(args.processes, cfg, data=args.data, out=args.out, partition=args.partition,
                       alpha=args.alpha, fraction=args.fraction, deadline_blocks=args.deadline_blocks,
                       quorum=args.quorum, byzantine=byzantine, threads=args.threads,
                       timeout=args.timeout, chain_id=args.chain_id)
    keys = ("out", "final_acc", "final_digest", "all_nodes_agree", "ledger_address", "final_block_hash",
            "wall_s", "chain_overhead_pct")
    print(json.dumps({k: summary[k] for k in keys}, indent=1))
    return 0 if summary["all_nodes_agree"] else 1

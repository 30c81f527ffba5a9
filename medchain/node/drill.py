"""The local drill of deployment mode (``medchain simulate``, the fault tests, the deployment
benchmark): an anvil node, one task and N ``medchain node`` processes (:class:`NodeProcess`) whose
keys travel in environment variables, never on the command line (:class:`Deployment`,
:func:`simulate`)."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from medchain.attacks.byzantine import check_byzantine
from medchain.blobstore import store_for
from medchain.chain import connect, dev_accounts
from medchain.chain.anvil import AnvilNode
from medchain.data import load_dataset, partition as split, save_npz
from medchain.node.drill_report import DrillResults
from medchain.node.rundir import RunDir, fresh_run_dir
from medchain.node.task import create_task

log = logging.getLogger("medchain.node")

KEY_ENV = "MEDCHAIN_NODE_KEY"           # environment variable the drill passes each node's key in


@dataclass
class NodeProcess:
    """One ``medchain node`` subprocess; its key travels in the environment variable KEY_ENV."""
    index: int
    account: Any
    argv: list[str]
    log_path: Path
    metrics_path: Path
    threads: int = 1
    proc: subprocess.Popen | None = None
    launched_at: float = 0.0
    launches: int = 0

    def start(self) -> "NodeProcess":
        env = {**os.environ, KEY_ENV: "0x" + bytes(self.account.key).hex(),
               "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads),
               "PYTHONUNBUFFERED": "1"}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_path, "ab")
        self.launched_at = time.time()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        logf.close()
        self.launches += 1
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL (a crash: no clean-up)."""
        if self.running:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]


class Deployment(DrillResults):
    """A local drill of deployment mode: one anvil node (one chain), one task, N institution
    processes (``medchain node``), each with its own key (passed in an environment variable).
    Used by ``medchain simulate``, the fault tests and the deployment benchmark.

    workdir: logs, metrics, the chain's state file and the blob store live there.
    block_time: anvil mines a block every block_time seconds besides one per transaction (needed
    for round deadlines, which count blocks; None: no interval mining unless deadline_blocks > 0,
    then 0.25 s). byzantine: {index: attack kind or "kind:scale"} for drills. node_args: extra
    ``medchain node`` arguments per index (they win over the defaults).
    """

    def __init__(self, processes: int, cfg, *, data: str, workdir: str | Path, partition: str = "iid",
                 alpha: float = 0.5, fraction: float = 1.0, deadline_blocks: int = 0, quorum: int | None = None,
                 block_time: float | None = None, chain_id: int = 31337, blobs: str | None = None,
                 byzantine: dict[int, str] | None = None, threads: int = 1, poll_interval: float = 0.2,
                 rpc_timeout: float = 120.0, persist_chain: bool = True,
                 node_args: dict[int, list[str]] | None = None):
        self.n, self.cfg = int(processes), cfg
        if self.n < 1:
            raise ValueError("need at least one institution process")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data, self.partition, self.alpha, self.fraction = data, partition, alpha, fraction
        self.deadline_blocks = int(deadline_blocks)
        self.quorum = int(quorum) if quorum is not None else self.n
        self.block_time = block_time if block_time is not None else (0.25 if self.deadline_blocks else None)
        self.chain_id = chain_id
        self.blobs = blobs or str(self.workdir / "blobs")
        self.byzantine = check_byzantine(byzantine or {}, self.n)
        self.threads, self.poll_interval, self.rpc_timeout = threads, poll_interval, rpc_timeout
        self.state_file = self.workdir / "chain-state.json" if persist_chain else None
        self.state_interval = 1          # anvil dumps its state every second: a SIGKILL loses <= ~1 s
        self.node_args = dict(node_args or {})
        self.chain = None
        self.port: int | None = None
        self.w3 = None
        self.ledger = None
        self.accounts: list = []
        self.nodes: list[NodeProcess] = []
        self.timeline: dict[str, float] = {}

    # -------------------------------------------------------------- chain
    def _anvil(self, port: int | None):
        extra = ["--mixed-mining"] if self.block_time else []
        return AnvilNode(self.chain_id, port=port, state_file=self.state_file, block_time=self.block_time,
                         extra_args=extra, state_interval=self.state_interval if self.state_file else None)

    def start_chain(self) -> "Deployment":
        self.chain = self._anvil(None).start()
        self.port = self.chain.port
        self.w3 = connect(self.chain.url)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop_chain(self) -> None:
        """Stop the node (SIGINT: anvil writes its --state file)."""
        if self.chain is not None:
            self.chain.stop()

    def kill_chain(self) -> None:
        """SIGKILL the node (a crash: no final state dump; what survives is its last periodic dump)."""
        if self.chain is not None:
            self.chain.kill()

    def restart_chain(self) -> None:
        """Start the node again on the same port from its state file."""
        if self.state_file is None:
            raise ValueError("restart_chain needs persist_chain=True (anvil --state)")
        self.chain = self._anvil(self.port).start()

    # -------------------------------------------------------------- task and processes
    def create_task(self, in_chans: int, n_classes: int, *, start: bool = False) -> str:
        """Deploy the task with N members (dev accounts 1..N; account 0 is the admin). Not started
        unless ``start``: :meth:`start_task` once the processes are ready, so that round 0 does not
        race their start-up."""
        if self.cfg.max_samples is None:   # cap the reported sample counts at the largest share
            self.cfg = replace(self.cfg, max_samples=self.largest_share())
        self.accounts = dev_accounts(self.w3, self.n + 1)
        admin, members = self.accounts[0], self.accounts[1:]
        self.ledger = create_task(self.w3, admin, self.cfg, [m.address for m in members], n_classes=n_classes,
                                  in_chans=in_chans, deadline_blocks=self.deadline_blocks, quorum=self.quorum,
                                  start=start, store=store_for(self.blobs))
        self.nodes = [self._node_process(i) for i in range(self.n)]
        return self.ledger.address

    def largest_share(self) -> int:
        """Training images of the largest institution in the drill's split (the split the nodes
        make with the task's seed): the default cap on the sample count an update may report."""
        insts = split(load_dataset(self.data), None if self.partition == "sites" else self.n, self.partition,
                      alpha=self.alpha, fraction=self.fraction, seed=self.cfg.seed)
        return max(1, max(len(d.train) for d in insts))

    def ready(self, i: int) -> bool:
        """Whether node i reported ready (set up, waiting to train) since its latest launch."""
        return sum(1 for m in self.nodes[i].metrics() if m["event"] == "ready") >= self.nodes[i].launches

    def start_task(self, ready_timeout: float = 300.0) -> None:
        """Wait until every launched node is ready, then open round 0."""
        self.wait_for(lambda: all(self.ready(p.index) for p in self.nodes if p.proc is not None),
                      ready_timeout, "the institution processes to be ready")
        self.ledger.start()
        self.timeline["started"] = time.time()

    def _node_process(self, i: int) -> NodeProcess:
        argv = [sys.executable, "-m", "medchain",
                "node", "--rpc", self.url, "--ledger", self.ledger.address, "--key-env", KEY_ENV,
                "--data", self.data, "--partition", self.partition, "--institutions", str(self.n),
                "--institution-index", str(i), "--alpha", str(self.alpha), "--fraction", str(self.fraction),
                "--blobs", self.blobs, "--metrics", str(self.workdir / f"node-{i}.jsonl"),
                "--threads", str(self.threads), "--poll-interval", str(self.poll_interval),
                "--rpc-timeout", str(self.rpc_timeout)]
        if i in self.byzantine:
            argv += ["--byzantine", self.byzantine[i]]
        argv += list(self.node_args.get(i, []))
        return NodeProcess(i, self.accounts[i + 1], argv, self.workdir / f"node-{i}.log",
                           self.workdir / f"node-{i}.jsonl", self.threads)

    def launch(self, indices: list[int] | None = None) -> None:
        for i in (range(self.n) if indices is None else indices):
            self.nodes[i].start()
        self.timeline.setdefault("launched", time.time())

    def wait(self, timeout: float = 600.0, indices: list[int] | None = None, *,
             fail_fast: bool = True) -> dict[int, int]:
        """Wait for the given node processes (default all) to exit; returns {index: exit code}.
        Raises TimeoutError (after killing them) if they run longer than ``timeout``; with
        ``fail_fast``, RuntimeError (after killing the others) as soon as one exits with an error."""
        todo = [self.nodes[i] for i in (range(self.n) if indices is None else indices)]
        t_end = time.monotonic() + timeout
        while any(p.running for p in todo):
            bad = [p for p in todo if p.proc is not None and p.proc.poll() not in (None, 0)]
            if fail_fast and bad:
                self.kill_all()
                raise RuntimeError(f"institution process {bad[0].index} exited with code "
                                   f"{bad[0].proc.returncode}; its log:\n{bad[0].log_tail()}")
            if time.monotonic() > t_end:
                tails = "\n".join(f"--- node {p.index}:\n{p.log_tail(1500)}" for p in todo if p.running)
                self.kill_all()
                raise TimeoutError(f"node processes still running after {timeout:.0f} s:\n{tails}")
            time.sleep(0.2)
        self.timeline["finished"] = time.time()
        return {p.index: p.proc.returncode for p in todo}

    def kill_all(self) -> None:
        for p in self.nodes:
            p.kill()

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str, *,
                 tolerate: tuple[int, ...] = ()) -> None:
        """Poll ``predicate`` until true; raise TimeoutError after ``timeout`` s, or RuntimeError as soon
        as a node process (other than those in ``tolerate``) exits with an error."""
        t_end = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > t_end:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
            dead = [p for p in self.nodes if p.proc is not None and p.proc.poll() not in (None, 0)
                    and p.index not in tolerate]
            if dead:
                raise RuntimeError(f"node {dead[0].index} exited with {dead[0].proc.returncode} while waiting "
                                   f"for {what}:\n{dead[0].log_tail()}")
            time.sleep(0.1)

    def close(self) -> None:
        self.kill_all()
        self.stop_chain()

    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc) -> None:
        self.close()



def simulate(processes: int, cfg, *, data: str = "simulated:n=600", out: str | Path | None = None,
             partition: str = "iid", alpha: float = 0.5, fraction: float = 1.0, deadline_blocks: int = 0,
             quorum: int | None = None, byzantine: dict[int, str] | None = None, threads: int = 1,
             timeout: float = 1800.0, chain_id: int = 31337) -> dict:
    """``medchain simulate``: an anvil node, one task, ``processes`` institution processes; waits for
    them and writes ``out/metrics.csv`` (one row per node and round, plus the final global model on
    the pooled test splits) and ``out/summary.json`` (final ACC, digest, ledger address, block hash,
    overhead, start-up time, peak memory, parameters, versions). Returns the summary (its
    ``out`` key names the folder).

    ``out`` must be empty or absent (None: a fresh ``results/simulate/run-<time>``); it is locked
    while the run writes (:class:`RunDir`). Arguments are checked before anything starts."""
    if int(processes) < 1:
        raise ValueError(f"need at least one institution process, got {processes}")
    byzantine = check_byzantine(byzantine or {}, int(processes))
    out = fresh_run_dir() if out is None else Path(out)
    with RunDir(out):
        return _simulate_into(out, processes, cfg, data=data, partition=partition, alpha=alpha,
                              fraction=fraction, deadline_blocks=deadline_blocks, quorum=quorum,
                              byzantine=byzantine, threads=threads, timeout=timeout, chain_id=chain_id)


def _simulate_into(out: Path, processes: int, cfg, *, data, partition, alpha, fraction, deadline_blocks,
                   quorum, byzantine, threads, timeout, chain_id) -> dict:
    # pandas: imported here, not with this package, which every node process imports
    from medchain.results import write_metrics, write_summary

    dataset = load_dataset(data)
    source = data
    if data.strip().lower().startswith("simulated"):    # generate once, not once per process
        source = str(save_npz(dataset, out / "data.npz"))
    t0 = time.time()
    with Deployment(processes, cfg, data=source, workdir=out / "run", partition=partition, alpha=alpha,
                    fraction=fraction, deadline_blocks=deadline_blocks, quorum=quorum, chain_id=chain_id,
                    byzantine=byzantine, threads=threads) as dep:
        dep.start_chain()
        address = dep.create_task(dataset.n_channels, dataset.n_classes)
        log.info("task %s on %s; launching %d institution processes", address, dep.url, processes)
        dep.launch()
        dep.start_task(ready_timeout=timeout)
        log.info("all %d processes ready; task started", processes)
        codes = dep.wait(timeout)
        failed = {i: c for i, c in codes.items() if c != 0}
        if failed:
            i = next(iter(failed))
            raise RuntimeError(f"institution process(es) {sorted(failed)} failed (exit codes {failed}); "
                               f"log of institution {i}:\n{dep.nodes[i].log_tail()}")
        rows, summary = dep.results(dataset)
    summary["total_s"] = round(time.time() - t0, 3)
    summary["data"] = data
    summary["out"] = str(out)
    write_metrics(rows, out / "metrics.csv")
    params = {**dep.cfg.to_dict(), "processes": processes, "partition": partition, "alpha": alpha,
              "fraction": fraction, "deadline_blocks": deadline_blocks, "quorum": quorum, "threads": threads}
    return write_summary(summary, out / "summary.json", params=params, seed=cfg.seed)

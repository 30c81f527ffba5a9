"""Local anvil nodes (Foundry's development node): one node = one chain.

The binary comes from the pinned npm package (``contracts/package.json``: ``@foundry-rs/anvil``,
whose optional dependency ``@foundry-rs/anvil-linux-amd64`` ships it); ``npm install`` in
``contracts/`` puts it at ``contracts/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil``. The
``MEDCHAIN_ANVIL`` environment variable, then ``PATH``, are tried too.

Example::

    with AnvilNode(chain_id=7001) as node:
        w3 = connect(node.url)
        admin = Account.from_key(node.dev_keys[0])

medchain only uses standard JSON-RPC methods on these nodes, so the same code runs against geth,
Besu or any other node.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path

from .accounts import ANVIL_DEV_KEYS

__all__ = ["AnvilNode", "start_nodes", "find_anvil", "AnvilNotFound", "REPO_ROOT"]

log = logging.getLogger("medchain.chain")

REPO_ROOT = Path(__file__).resolve().parents[2]
_PLATFORM_PACKAGES = {
    ("Linux", "x86_64"): "anvil-linux-amd64",
    ("Linux", "aarch64"): "anvil-linux-arm64",
    ("Darwin", "x86_64"): "anvil-darwin-amd64",
    ("Darwin", "arm64"): "anvil-darwin-arm64",
}


class AnvilNotFound(FileNotFoundError):
    """The anvil binary is not installed."""


def _npm_binary() -> Path:
    pkg = _PLATFORM_PACKAGES.get((platform.system(), platform.machine()), "anvil-linux-amd64")
    return REPO_ROOT / "contracts" / "node_modules" / "@foundry-rs" / pkg / "bin" / "anvil"


def find_anvil() -> Path:
    """Path of the anvil binary: ``$MEDCHAIN_ANVIL``, the npm package in contracts/, then PATH."""
    env = os.environ.get("MEDCHAIN_ANVIL")
    if env:
        p = Path(env)
        if p.is_file() and os.access(p, os.X_OK):
            return p
        raise AnvilNotFound(f"MEDCHAIN_ANVIL={env} is not an executable file")
    npm = _npm_binary()
    if npm.is_file() and os.access(npm, os.X_OK):
        return npm
    which = shutil.which("anvil")
    if which:
        return Path(which)
    raise AnvilNotFound(
        f"anvil binary not found (looked at $MEDCHAIN_ANVIL, {npm} and PATH). Install the pinned "
        "version with `npm install` in contracts/ (do not pass --omit=optional: the binary ships in "
        "the optional package @foundry-rs/anvil-linux-amd64), or set MEDCHAIN_ANVIL to an anvil binary.")


def _port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on (host, port). SO_REUSEADDR, as anvil itself sets it:
    connections of a previous node on that port lingering in TIME_WAIT do not count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rpc(url: str, method: str, params: list | None = None, timeout: float = 2.0):
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []}).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        out = json.loads(resp.read())
    if "error" in out:
        raise RuntimeError(f"{method}: {out['error']}")
    return out["result"]


def _terminate(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop anvil with SIGINT (it then writes its --state file) and wait; kill if it hangs."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
    except (ProcessLookupError, OSError):  # pragma: no cover - already gone
        pass


class AnvilNode:
    """An anvil process serving one chain on ``127.0.0.1:port`` (a free port if None).

    ``state_file``: load the chain from this JSON file if it exists and write it back when the
    node stops (anvil ``--state``), so a stopped and restarted node keeps its blocks and contracts.
    ``state_interval``: also write it every that many whole seconds (anvil ``--state-interval``), so a
    node killed without a clean stop (SIGKILL, power loss) loses at most that many seconds of blocks;
    without it, such a node loses everything since its last clean stop.
    Use as a context manager, or call :meth:`start` / :meth:`stop`; the process is also stopped on
    garbage collection and at interpreter exit.
    """

    def __init__(self, chain_id: int = 31337, port: int | None = None,
                 state_file: str | os.PathLike | None = None, *, host: str = "127.0.0.1",
                 block_time: float | None = None, extra_args: list[str] | None = None,
                 startup_timeout: float = 15.0, state_interval: int | None = None):
        self.chain_id = int(chain_id)
        self.requested_port = port
        self.port: int | None = None
        self.host = host
        self.state_file = Path(state_file) if state_file is not None else None
        self.block_time = block_time
        if state_interval is not None and (int(state_interval) != state_interval or state_interval < 1):
            raise ValueError(f"state_interval must be a whole number of seconds >= 1 (anvil's "
                             f"--state-interval), got {state_interval}")
        if state_interval is not None and state_file is None:
            raise ValueError("state_interval needs a state_file to write to")
        self.state_interval = state_interval
        self.extra_args = list(extra_args or [])
        self.startup_timeout = startup_timeout
        self.dev_keys: tuple[str, ...] = ANVIL_DEV_KEYS
        self._proc: subprocess.Popen | None = None
        self._finalizer = None
        self._err_file = None
        self._keeper: tuple[threading.Thread, threading.Event] | None = None

    # ------------------------------------------------------------------ properties
    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the anvil node is not started")
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __repr__(self) -> str:
        where = self.url if self.port else "not started"
        return f"AnvilNode(chain_id={self.chain_id}, {where})"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "AnvilNode":
        if self.running:
            return self
        binary = find_anvil()
        if self.requested_port and _port_in_use(self.host, self.requested_port):
            raise RuntimeError(f"port {self.requested_port} on {self.host} is already in use (another node or "
                               "service?); choose another --port, or omit it for free ports")
        self._restore_state()
        attempts = 1 if self.requested_port else 3
        last_err = ""
        for _ in range(attempts):
            port = self.requested_port or _free_port()
            cmd = [str(binary), "--host", self.host, "--port", str(port), "--chain-id", str(self.chain_id),
                   "--silent"]
            if self.state_file is not None:
                self.state_file.parent.mkdir(parents=True, exist_ok=True)
                cmd += ["--state", str(self.state_file)]
                if self.state_interval:
                    cmd += ["--state-interval", str(int(self.state_interval))]
            if self.block_time:
                cmd += ["--block-time", str(self.block_time)]
            cmd += self.extra_args
            # stderr goes to a file (a pipe nobody reads could fill up and block the node).
            err_file = tempfile.TemporaryFile()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err_file, start_new_session=True)
            url = f"http://{self.host}:{port}"
            t_end = time.monotonic() + self.startup_timeout
            while time.monotonic() < t_end:
                if proc.poll() is not None:
                    err_file.seek(0)
                    last_err = err_file.read().decode(errors="replace").strip()[-2000:]
                    err_file.close()
                    break
                try:
                    cid = int(_rpc(url, "eth_chainId", timeout=1.0), 16)
                except (OSError, urllib.error.URLError, ValueError, RuntimeError):
                    time.sleep(0.05)
                    continue
                if proc.poll() is not None:    # the answer came from someone else on that port
                    continue
                if cid != self.chain_id:
                    _terminate(proc)
                    raise RuntimeError(f"anvil on port {port} reports chain id {cid}, expected "
                                       f"{self.chain_id} (is another node using that port?)")
                self._proc, self.port, self._err_file = proc, port, err_file
                self._finalizer = weakref.finalize(self, _terminate, proc)
                log.info("anvil chain %d at %s (pid %d)", self.chain_id, url, proc.pid)
                if self.state_interval:
                    stop = threading.Event()
                    keeper = threading.Thread(target=self._keep_complete_dumps, args=(stop,), daemon=True)
                    keeper.start()
                    self._keeper = (keeper, stop)
                return self
            else:
                _terminate(proc)
                err_file.close()
                last_err = f"no answer on {url} within {self.startup_timeout:.0f} s"
        raise RuntimeError(f"anvil (chain id {self.chain_id}) failed to start: {last_err or 'unknown error'}")

    def kill(self) -> None:
        """SIGKILL the node (a crash: no final state dump; tests and drills only)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)
        self.stop()

    # ------------------------------------------------------------------ state dumps
    @property
    def complete_state_file(self) -> Path | None:
        """The last periodic state dump that was a complete JSON document (kept beside the state file)."""
        return self.state_file.with_suffix(".complete.json") if self.state_file is not None else None

    def _keep_complete_dumps(self, stop: threading.Event) -> None:
        """Copy each complete periodic dump aside (atomic rename): anvil rewrites the state file in
        place, so a crash in the middle of a write leaves it truncated."""
        last = None
        while not stop.wait(self.state_interval / 2):
            data = _complete_json(self.state_file)
            if data is not None and data != last:
                tmp = self.complete_state_file.with_suffix(".tmp")
                tmp.write_bytes(data)
                os.replace(tmp, self.complete_state_file)
                last = data

    def _restore_state(self) -> None:
        """Before a start from a state file that a crash truncated: put the last complete dump back
        (the chain then lacks at most the blocks of one state interval — nodes recover from that)."""
        if self.state_file is None or not self.state_file.exists() or _complete_json(self.state_file) is not None:
            return
        good = _complete_json(self.complete_state_file)
        if good is None:
            raise RuntimeError(f"the chain's state file {self.state_file} is not complete JSON (a crash while anvil "
                               f"wrote it?) and there is no complete earlier dump ({self.complete_state_file}); "
                               "move it away to start an empty chain")
        log.warning("state file %s is truncated (a crash while anvil wrote it); starting from the last complete "
                    "dump %s", self.state_file, self.complete_state_file)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_bytes(good)
        os.replace(tmp, self.state_file)

    def stop(self) -> None:
        """Stop the node (writing its state file, if any)."""
        if self._keeper is not None:
            self._keeper[1].set()
            self._keeper[0].join(timeout=5)
            self._keeper = None
        if self._finalizer is not None:
            self._finalizer()  # runs _terminate once
            self._finalizer = None
        if self._err_file is not None:
            self._err_file.close()
            self._err_file = None
        self._proc = None
        self.port = None if self.requested_port is None else self.port

    def __enter__(self) -> "AnvilNode":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _complete_json(path: Path) -> bytes | None:
    """The file's bytes if they are a complete JSON document; None if missing or truncated."""
    try:
        data = path.read_bytes()
        json.loads(data)
    except (OSError, ValueError):
        return None
    return data


def start_nodes(n: int, base_chain_id: int = 31337, *, state_dir: str | os.PathLike | None = None,
                **kwargs) -> list[AnvilNode]:
    """Start ``n`` anvil nodes with chain ids ``base_chain_id``, ``base_chain_id + 1``, ... on free
    ports (state files ``<state_dir>/chain-<id>.json`` if ``state_dir``). Stops the ones already
    started if one fails."""
    nodes: list[AnvilNode] = []
    try:
        for i in range(n):
            cid = base_chain_id + i
            state = Path(state_dir) / f"chain-{cid}.json" if state_dir is not None else None
            nodes.append(AnvilNode(cid, state_file=state, **kwargs).start())
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return nodes


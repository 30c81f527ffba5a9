"""Connecting to a chain: the embedded eth-tester chain or any Ethereum JSON-RPC node.

``connect(None)`` (or ``"embedded"`` / ``"eth-tester"``) starts a fresh in-process chain (py-evm,
auto-mining one block per transaction) that lives as long as the returned ``Web3``. ``http(s)://``
and ``ws(s)://`` URLs connect to a node (geth, Besu, anvil, ...). Only standard ``eth_*`` methods
are used, so nothing depends on a particular node.

URLs are shown in messages and logs only through :func:`redact_url`, which drops credentials,
query strings and paths (hosted nodes put API keys there).
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from web3 import HTTPProvider, Web3
from web3.providers.base import JSONBaseProvider

__all__ = [
    "EMBEDDED", "connect", "is_embedded", "redact_url", "chain_identity", "final_block_hash",
    "with_retries", "node_label", "SyncWebSocketProvider",
]

log = logging.getLogger("medchain.chain")

EMBEDDED = ("embedded", "eth-tester", "ethtester", "")
T = TypeVar("T")

# Exceptions that mean "the node could not be reached / the connection broke" (retryable).
try:  # requests is a web3 dependency
    import requests
    _NET_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, requests.ConnectionError,
                                                     requests.Timeout)
except ImportError:  # pragma: no cover
    _NET_ERRORS = (ConnectionError, TimeoutError)
try:
    _HTTP_ERRORS: tuple[type[BaseException], ...] = (requests.HTTPError,)
except NameError:  # pragma: no cover
    _HTTP_ERRORS = ()
try:
    from web3.exceptions import ProviderConnectionError
    _NET_ERRORS = _NET_ERRORS + (ProviderConnectionError,)
except ImportError:  # pragma: no cover
    pass
try:
    from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
    _NET_ERRORS = _NET_ERRORS + (ConnectionClosed, InvalidHandshake, InvalidURI)
except ImportError:  # pragma: no cover
    pass


def redact_url(url: str | None) -> str:
    """``url`` without credentials, path, query or fragment: safe to log."""
    if url is None or url.strip().lower() in EMBEDDED:
        return "embedded eth-tester chain"
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparsable URL>"
    tail = "/…" if (parts.path not in ("", "/") or parts.query or parts.fragment) else ""
    return f"{parts.scheme}://{host}{port}{tail}"


def is_embedded(w3: Web3) -> bool:
    """Whether ``w3`` talks to an in-process eth-tester chain."""
    return hasattr(w3.provider, "ethereum_tester")


def node_label(w3: Web3) -> str:
    """A loggable name of the node behind ``w3``."""
    if is_embedded(w3):
        return "embedded eth-tester chain"
    return getattr(w3, "_medchain_label", None) or redact_url(getattr(w3.provider, "endpoint_uri", None))


# Retry policy for RPC calls on connection errors: RETRY_ATTEMPTS tries in all, waiting
# RETRY_BACKOFF * 2**i seconds before retry i+1 (0.25 + 0.5 + 1 + 2 = 3.75 s at most by default).
RETRY_ATTEMPTS = 5
RETRY_BACKOFF = 0.25


def with_retries(fn: Callable[[], T], *, what: str, label: str, attempts: int | None = None,
                 backoff: float | None = None) -> T:
    """Call ``fn``; on a connection error retry with exponential backoff (``attempts`` in all,
    each retry logged), then raise ``ConnectionError`` naming the node and what to check."""
    attempts = RETRY_ATTEMPTS if attempts is None else attempts
    backoff = RETRY_BACKOFF if backoff is None else backoff
    for i in range(attempts):
        try:
            return fn()
        except _HTTP_ERRORS as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status is not None and status < 500 or i == attempts - 1:
                # requests' message contains the full URL (and any API key in it): not repeated.
                raise ConnectionError(
                    f"{what}: the node at {label} answered HTTP {status}; check the URL and, for a "
                    "hosted node, its credentials") from None
            delay = backoff * 2 ** i
            log.warning("%s: %s answered HTTP %s; retry %d/%d in %.2f s", what, label, status,
                        i + 1, attempts - 1, delay)
            time.sleep(delay)
        except _NET_ERRORS as exc:
            if i == attempts - 1:
                raise ConnectionError(
                    f"{what}: cannot reach the Ethereum node at {label} after {attempts} attempts "
                    f"({_net_reason(exc)}). Check that the node is running, that "
                    "the URL (scheme, host, port) is right and that nothing blocks the connection; "
                    "for a local test node run `medchain chain up`.") from None
            delay = backoff * 2 ** i
            log.warning("%s: connection to %s failed (%s); retry %d/%d in %.2f s", what, label,
                        type(exc).__name__, i + 1, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


_REASONS = (("refused", "connection refused"), ("timed out", "timed out"), ("timeout", "timed out"),
            ("name or service not known", "host name not resolved"),
            ("nodename nor servname", "host name not resolved"),
            ("temporary failure in name resolution", "host name not resolved"),
            ("reset by peer", "connection reset"), ("closed", "connection closed"),
            ("ssl", "TLS error"), ("certificate", "TLS certificate error"))


def _net_reason(exc: BaseException) -> str:
    """A short reason for a connection error that never echoes the URL (which may hold secrets)."""
    text = str(exc).lower()
    for needle, reason in _REASONS:
        if needle in text:
            return reason
    return type(exc).__name__


class SyncWebSocketProvider(JSONBaseProvider):
    """A minimal synchronous JSON-RPC provider over a WebSocket (web3.py 8's WebSocketProvider is
    async-only). One request at a time per connection; reconnects when the connection drops."""

    def __init__(self, endpoint_uri: str, timeout: float = 30.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.endpoint_uri = endpoint_uri
        self.timeout = timeout
        self._conn = None
        self._lock = threading.Lock()
        self._ids = itertools.count()

    def __str__(self) -> str:
        return f"WebSocket connection {redact_url(self.endpoint_uri)}"

    def _connection(self):
        if self._conn is None:
            from websockets.sync.client import connect as ws_connect
            kw = {"open_timeout": self.timeout, "max_size": 2 ** 27}
            try:  # websockets >= 17 wants the direct (non-context-manager) use spelled out
                self._conn = ws_connect(self.endpoint_uri, legacy=True, **kw)
            except TypeError:
                self._conn = ws_connect(self.endpoint_uri, **kw)
        return self._conn

    def make_request(self, method, params):
        request = self.encode_rpc_request(method, params)
        with self._lock:
            try:
                conn = self._connection()
                conn.send(request.decode())
                raw = conn.recv(timeout=self.timeout)
            except Exception:
                self.close()
                raise
        return self.decode_rpc_response(raw.encode() if isinstance(raw, str) else raw)

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 - best effort
                pass
            self._conn = None

    def __del__(self):  # pragma: no cover - best effort
        self.close()


class _HTTPProvider(HTTPProvider):
    """web3's HTTPProvider, minus the full endpoint URL in its debug logs and str()."""
    logger = logging.getLogger("medchain.chain.rpc")

    def __str__(self) -> str:
        return f"RPC connection {redact_url(str(self.endpoint_uri))}"


# web3 logs the full URL at DEBUG level; this logger stays at INFO so URLs with secrets never show.
logging.getLogger("medchain.chain.rpc").setLevel(logging.INFO)


def _configure(w3: Web3) -> Web3:
    """Drop web3's "validation" middleware: it asks the node for its chain id before every
    eth_call / eth_estimateGas (doubling the round trips of a ledger read) and rejects blocks with
    long extraData, which proof-of-authority consortium chains (Clique, IBFT/QBFT) have. Transactions
    are signed locally with the chain id read once, so nothing is lost."""
    try:
        w3.middleware_onion.remove("validation")
    except (ValueError, KeyError):  # pragma: no cover - absent in this web3 version
        pass
    return w3


def _one_pass_gas_estimator(state, transaction) -> int:
    """Gas estimate for the embedded chain from a single execution: the gas consumed before
    refunds. py-evm's default binary search runs a transaction about 13 times (77 % of the time of
    a ledger transaction on the embedded chain). Exact for contracts that make no external calls
    (TaskLedger makes none); the client adds a margin and the calldata floor on top."""
    from eth.vm.spoof import SpoofTransaction

    spoof = SpoofTransaction(transaction, gas=state.gas_limit, gas_price=0)
    snapshot = state.snapshot()
    try:
        computation = state.apply_transaction(spoof)
        if computation.is_error:
            raise computation.error
        return state.gas_limit - computation.get_gas_remaining()
    finally:
        state.revert(snapshot)


def connect(url: str | None = None, *, timeout: float = 30.0, attempts: int = 3) -> Web3:
    """A ``Web3`` for ``url``.

    ``None``, ``"embedded"`` or ``"eth-tester"``: a fresh in-process eth-tester chain (its funded
    accounts: :func:`medchain.chain.accounts.embedded_accounts`). ``http://``, ``https://``,
    ``ws://``, ``wss://``: that JSON-RPC node; the connection is checked (``eth_chainId``) and an
    unreachable node raises ``ConnectionError`` naming the (redacted) URL and what to check.
    """
    if url is None or url.strip().lower() in EMBEDDED:
        from web3 import EthereumTesterProvider
        provider = EthereumTesterProvider()
        provider.ethereum_tester.backend.chain.gas_estimator = _one_pass_gas_estimator
        w3 = _configure(Web3(provider))
        w3._medchain_label = "embedded eth-tester chain"  # type: ignore[attr-defined]
        return w3
    label = redact_url(url)
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        provider = _HTTPProvider(url, request_kwargs={"timeout": timeout},
                                 exception_retry_configuration=None)
    elif scheme in ("ws", "wss"):
        provider = SyncWebSocketProvider(url, timeout=timeout)
    else:
        raise ValueError(f"unsupported chain URL {label!r}: use http(s)://host:port or ws(s)://host:port "
                         "for a JSON-RPC node, or 'embedded' for the in-process eth-tester chain")
    w3 = _configure(Web3(provider))
    w3._medchain_label = label  # type: ignore[attr-defined]
    # Errors on a fresh connection are usually "node not running": fail fast with a clear message.
    try:
        cid = with_retries(lambda: w3.eth.chain_id, what="connect", label=label, attempts=attempts, backoff=0.2)
    except ConnectionError:
        raise
    except Exception as exc:  # noqa: BLE001 - an answer, but not a JSON-RPC one (web3 decoding errors)
        raise ConnectionError(_not_a_node(label, exc)) from None
    if not isinstance(cid, int) or cid <= 0:
        raise ConnectionError(_not_a_node(label, f"eth_chainId answered {str(cid)[:40]!r}"))
    return w3


def _not_a_node(label: str, why: BaseException | str) -> str:
    reason = why if isinstance(why, str) else f"{type(why).__name__}: {str(why).splitlines()[0][:120] if str(why) else ''}"
    return (f"connect: {label} answered, but not as an Ethereum JSON-RPC node ({reason}); check the URL "
            "and port — another service may be listening there (for a local test node run "
            "`medchain chain up`)")


def chain_identity(w3: Web3, address: str) -> str:
    """``"eip155:<chain id>:<checksum address>"``. In-process eth-tester chains all share one
    chain id, so the identity of a task always includes its ledger address."""
    return f"eip155:{w3.eth.chain_id}:{Web3.to_checksum_address(address)}"


def final_block_hash(w3: Web3, block: int | str = "latest") -> str:
    """Hex hash of ``block`` (default the latest), to record the chain state a result came from."""
    h = w3.eth.get_block(block)["hash"]
    return "0x" + bytes(h).hex()


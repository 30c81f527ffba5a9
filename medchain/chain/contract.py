"""The plumbing every contract client shares: ABI encoding straight from the compiled artifact
(eth_abi, no web3 contract layer), argument checks, and :class:`ContractClient` — calls,
transactions (simulated first, see :mod:`.tx`), bounded log queries and deployment — whose
refusals are decoded from the contract's error table (:class:`~.errors.RevertDecoder`)."""
from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from eth_abi import decode as abi_decode
from eth_abi import encode as abi_encode
from eth_account.signers.local import LocalAccount
from eth_utils import keccak, to_checksum_address
from web3 import Web3

from .artifacts import load_artifact
from .connection import node_label, with_retries
from .errors import LedgerError, RevertDecoder, canonical_type
from .tx import call, send_transaction, wait_for_receipt

__all__ = ["Abi", "ContractClient", "digest32", "uint"]

log = logging.getLogger("medchain.chain")


def digest32(value: bytes | str, what: str = "digest") -> bytes:
    """``value`` (32 bytes, or 64 hex digits with or without 0x) as 32 bytes; ValueError naming
    ``what`` otherwise."""
    if isinstance(value, str):
        text = value[2:] if value.startswith("0x") else value
        try:
            value = bytes.fromhex(text)
        except ValueError:
            raise ValueError(f"{what} must be 32 bytes or 64 hex digits, got {value[:20]!r}…") from None
    value = bytes(value)
    if len(value) != 32:
        raise ValueError(f"{what} must be 32 bytes (a sha256 digest), got {len(value)} bytes")
    return value


def uint(value: int, bits: int, what: str) -> int:
    """``value`` as an int that fits a Solidity ``uint<bits>``; ValueError naming ``what`` otherwise."""
    v = int(value)
    if not 0 <= v < 2 ** bits:
        raise ValueError(f"{what} must be an integer in [0, 2**{bits}), got {value}")
    return v


class Abi:
    """Function/event encoding straight from an artifact's ABI."""

    def __init__(self, abi: list[dict]):
        self.functions: dict[str, tuple[bytes, list[str], list[str]]] = {}
        self.events: dict[str, dict] = {}
        for e in abi:
            if e.get("type") == "function":
                ins = [canonical_type(i) for i in e["inputs"]]
                outs = [canonical_type(o) for o in e["outputs"]]
                self.functions[e["name"]] = (keccak(text=f"{e['name']}({','.join(ins)})")[:4], ins, outs)
            elif e.get("type") == "event":
                ins = [canonical_type(i) for i in e["inputs"]]
                topic = keccak(text=f"{e['name']}({','.join(ins)})")
                self.events[e["name"]] = {
                    "topic": topic,
                    "indexed": [(i["name"], canonical_type(i)) for i in e["inputs"] if i["indexed"]],
                    "data": [(i["name"], canonical_type(i)) for i in e["inputs"] if not i["indexed"]],
                }
        ctor = next((e for e in abi if e.get("type") == "constructor"), {"inputs": []})
        self.constructor_types = [canonical_type(i) for i in ctor["inputs"]]

    def encode(self, name: str, *args: Any) -> bytes:
        sel, ins, _ = self.functions[name]
        return sel + abi_encode(ins, list(args))

    def decode(self, name: str, data: bytes) -> tuple:
        return tuple(abi_decode(self.functions[name][2], data))


@functools.lru_cache(maxsize=None)
def _codec(client: type["ContractClient"]) -> tuple[Abi, RevertDecoder]:
    abi = load_artifact(client.CONTRACT_NAME)["abi"]
    return Abi(abi), RevertDecoder(abi, client.ERRORS)


class ContractClient:
    """Client of one deployed contract at ``address``, acting as ``account`` (None: read-only).

    A subclass names its artifact (``CONTRACT_NAME``), its error table (``ERRORS``: custom error
    name -> exception class) and the exception raised when there is no contract (``ERROR``).
    Transactions are simulated first, so a refused call raises the table's exception and changes
    nothing on chain.
    """

    CONTRACT_NAME: ClassVar[str]
    ERRORS: ClassVar[Mapping[str, type[LedgerError]]]
    ERROR: ClassVar[type[LedgerError]] = LedgerError

    def __init__(self, w3: Web3, address: str, account: LocalAccount | None = None, *,
                 gas_margin: float = 1.2, tx_timeout: float = 120.0):
        self.w3 = w3
        self.address = to_checksum_address(address)
        self.account = account
        self.gas_margin = gas_margin
        self.tx_timeout = tx_timeout
        self._abi, self._decoder = _codec(type(self))
        self._label = node_label(w3)

    def __repr__(self) -> str:
        who = self.account.address if self.account is not None else "read-only"
        return f"{type(self).__name__}({self.address} on {self._label}, as {who})"

    def as_account(self, account: LocalAccount | None):
        """The same contract, acting as another account."""
        client = copy.copy(self)
        client.account = account
        return client

    def _call(self, name: str, *args: Any, block: int | str = "latest") -> tuple:
        raw = call(self.w3, self.address, self._abi.encode(name, *args), decoder=self._decoder,
                   contract=self.address, block=block)
        if not raw:
            raise self.ERROR(f"no contract code at {self.address} on {self._label} (wrong address or "
                             "chain?)", reason="NoContract")
        return self._abi.decode(name, raw)

    def _transact(self, name: str, *args: Any, gas: int | None = None, wait: bool = True,
                  gas_headroom: int = 0):
        if self.account is None:
            raise ValueError(f"{name}() sends a transaction: create the {type(self).__name__} with an "
                             "account")
        return send_transaction(self.w3, self.account, {"to": self.address, "data": self._abi.encode(name, *args)},
                                decoder=self._decoder, contract=self.address, gas=gas,
                                gas_margin=self.gas_margin, gas_headroom=gas_headroom,
                                timeout=self.tx_timeout, wait=wait)

    def wait_for_receipt(self, tx_hash: str):
        """The receipt of a transaction sent with ``wait=False`` (raises the decoded error if it
        reverted)."""
        return wait_for_receipt(self.w3, tx_hash, decoder=self._decoder, contract=self.address,
                                timeout=self.tx_timeout)

    def block_number(self) -> int:
        return with_retries(lambda: self.w3.eth.block_number, what="eth_blockNumber", label=self._label)

    def _logs(self, event: str, from_block: int, to_block: int, topics: list | None = None,
              max_range: int = 10_000) -> list:
        """This contract's ``event`` logs over ``[from_block, to_block]`` (``topics`` after the
        event's own), queried in chunks of at most ``max_range`` blocks."""
        ev = self._abi.events[event]
        out = []
        start = from_block
        while start <= to_block:
            end = min(to_block, start + max_range - 1)
            flt = {"address": self.address, "fromBlock": start, "toBlock": end,
                   "topics": ["0x" + ev["topic"].hex(), *(topics or [])]}
            out.extend(with_retries(lambda: self.w3.eth.get_logs(flt), what="eth_getLogs", label=self._label))
            start = end + 1
        return out

    @classmethod
    def _deploy(cls, w3: Web3, account: LocalAccount, args: Sequence[Any] = (), *,
                gas_margin: float) -> dict:
        """Deploy the contract with constructor ``args`` from ``account``; returns the receipt."""
        art = load_artifact(cls.CONTRACT_NAME)
        abi, decoder = _codec(cls)
        data = bytes.fromhex(art["bytecode"][2:]) + abi_encode(abi.constructor_types, list(args))
        receipt = send_transaction(w3, account, {"data": data}, decoder=decoder,
                                   contract=f"new {cls.CONTRACT_NAME}", gas_margin=gas_margin)
        log.info("deployed %s at %s on %s (block %d, gas %d)", cls.CONTRACT_NAME,
                 to_checksum_address(receipt["contractAddress"]), node_label(w3), receipt["blockNumber"],
                 receipt["gasUsed"])
        return receipt

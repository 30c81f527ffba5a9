"""Sending transactions: preflight, explicit gas, local signing, receipt, clear errors.

Every transaction is first simulated with ``eth_estimateGas``; a revert there raises the decoded
:class:`~medchain.chain.errors.LedgerError` *before* anything is sent, so a refused call costs no
gas and changes nothing. The gas limit is set explicitly to

    max(ceil(estimate × margin), calldata floor)

where the calldata floor (EIP-7623, active since Prague) is ``21000 + 10 × (zero bytes + 4 ×
non-zero bytes)``. The floor term matters on the embedded chain: eth-tester's estimates ignore it,
and a 100 KB payload measured 2.55 M estimated vs 4.01 M used (anvil estimates it exactly). A
transaction that reverts anyway (state changed between simulation and inclusion) is replayed with
``eth_call`` at the parent block to recover the reason. Connection errors are retried with
exponential backoff (bounded, logged), then raise ``ConnectionError``.
"""
from __future__ import annotations

import logging
import math
from typing import Any

from eth_account.signers.local import LocalAccount
from web3 import Web3

from .connection import node_label, with_retries
from .errors import (InsufficientFunds, LedgerError, LedgerTimeout, PayloadTooLarge, RevertDecoder,
                     TransactionReverted, revert_data_from_exception)

__all__ = ["calldata_floor_gas", "send_transaction", "wait_for_receipt", "call", "advance_blocks", "GAS_MARGIN", "DEFAULT_TIP_WEI"]

log = logging.getLogger("medchain.chain")

GAS_MARGIN = 1.2
DEFAULT_TIP_WEI = 10 ** 9  # 1 gwei, used when the node has no eth_maxPriorityFeePerGas
_EMPTY_DECODER = RevertDecoder([])


def calldata_floor_gas(data: bytes) -> int:
    """EIP-7623 floor of a transaction's gas use for calldata ``data``."""
    zeros = data.count(0)
    return 21000 + 10 * (zeros + 4 * (len(data) - zeros))


def _chain_id(w3: Web3, label: str) -> int:
    cid = getattr(w3, "_medchain_chain_id", None)
    if cid is None:
        cid = with_retries(lambda: w3.eth.chain_id, what="eth_chainId", label=label)
        w3._medchain_chain_id = cid  # type: ignore[attr-defined]
    return cid


def _tip(w3: Web3) -> int:
    tip = getattr(w3, "_medchain_tip", None)
    if tip is None:
        try:
            tip = int(w3.eth.max_priority_fee)
        except Exception:  # noqa: BLE001 - not every node (nor eth-tester) implements it
            tip = DEFAULT_TIP_WEI
        w3._medchain_tip = tip  # type: ignore[attr-defined]
    return tip


def _hex(data: bytes) -> str:
    return "0x" + data.hex()


def _raise_revert(exc: BaseException, decoder: RevertDecoder, contract: str,
                  tx_hash: str | None = None) -> None:
    data, is_revert = revert_data_from_exception(exc)
    if is_revert:
        raise decoder.decode(data, contract=contract, tx_hash=tx_hash,
                             fallback=str(exc)[:300]) from None


def _raise_funds(exc: BaseException, address: str, label: str) -> None:
    text = str(exc).lower()
    if "insufficient funds" in text or "insufficient balance" in text or "cannot afford" in text:
        raise InsufficientFunds(f"account {address} cannot pay for gas on {label}; fund it (on a "
                                "development chain: medchain.chain.fund)") from None


def call(w3: Web3, to: str, data: bytes, *, decoder: RevertDecoder | None = None,
         contract: str = "?", block: int | str = "latest", sender: str | None = None) -> bytes:
    """``eth_call`` with retries; a revert raises the decoded ``LedgerError``."""
    label = node_label(w3)
    params: dict[str, Any] = {"to": to, "data": _hex(data)}
    if sender:
        params["from"] = sender
    try:
        return bytes(with_retries(lambda: w3.eth.call(params, block), what="eth_call", label=label))
    except LedgerError:
        raise
    except Exception as exc:  # noqa: BLE001
        _raise_revert(exc, decoder or _EMPTY_DECODER, contract)
        raise


def send_transaction(w3: Web3, account: LocalAccount, tx: dict[str, Any], *,
                     decoder: RevertDecoder | None = None, contract: str | None = None,
                     gas: int | None = None, gas_margin: float = GAS_MARGIN, gas_headroom: int = 0,
                     timeout: float = 120.0, poll_latency: float = 0.05, wait: bool = True):
    """Simulate, sign (locally), send ``tx`` (keys ``to`` (absent to deploy), ``data`` (bytes),
    ``value``) from ``account``, wait for its receipt and return it (``wait=False``: return the
    transaction hash right after sending; a later revert is then only visible in the receipt).

    Raises the decoded ``LedgerError`` if the transaction would revert (nothing is sent) or did
    revert; ``PayloadTooLarge`` if it needs more gas than a block holds; ``LedgerTimeout`` if no
    receipt arrives within ``timeout`` seconds; ``ConnectionError`` if the node stays unreachable.
    gas_headroom: gas added to the estimate for work the estimate may not have seen (state can
    change between estimate and inclusion, e.g. another member's update arriving first).
    """
    decoder = decoder or _EMPTY_DECODER
    label = node_label(w3)
    data: bytes = bytes(tx.get("data", b""))
    to = tx.get("to")
    contract = contract or (to if to else "(new contract)")
    base: dict[str, Any] = {"from": account.address, "data": _hex(data), "value": int(tx.get("value", 0))}
    if to:
        base["to"] = to
    chain_id = _chain_id(w3, label)
    block = with_retries(lambda: w3.eth.get_block("latest"), what="eth_getBlockByNumber", label=label)
    gas_limit = int(block["gasLimit"])

    def too_large(needed: int, how: str) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"the transaction to {contract} needs {how} {needed:,} gas but a block of {label} holds "
            f"{gas_limit:,}; its calldata is {len(data):,} bytes. Put large payloads in the blob "
            "store (only the digest on chain) or lower the inline payload limit.")
    floor = calldata_floor_gas(data)
    if floor > gas_limit:          # no need to ask the node: the calldata alone does not fit a block
        raise too_large(floor, "at least")

    if gas is None:
        try:
            estimate = with_retries(lambda: w3.eth.estimate_gas(base), what="eth_estimateGas", label=label)
        except Exception as exc:  # noqa: BLE001
            _raise_revert(exc, decoder, contract)
            _raise_funds(exc, account.address, label)
            text = str(exc).lower()
            # nodes cap an estimate at the block gas limit and answer "out of gas" / "gas required
            # exceeds allowance" when even that is not enough
            if "out of gas" in text or "exceeds allowance" in text or "exceeds block gas limit" in text:
                raise too_large(gas_limit, "more than") from None
            raise
        gas = max(math.ceil(estimate * gas_margin), floor) + gas_headroom
    else:
        estimate = gas
    if gas > gas_limit:
        needed = max(estimate, floor)
        if needed > gas_limit:
            raise too_large(needed, "about")
        gas = gas_limit

    nonce = with_retries(lambda: w3.eth.get_transaction_count(account.address, "pending"),
                         what="eth_getTransactionCount", label=label)
    signed_tx: dict[str, Any] = {"chainId": chain_id, "nonce": nonce, "gas": int(gas),
                                 "value": base["value"], "data": data}
    if to:
        signed_tx["to"] = to
    base_fee = block.get("baseFeePerGas")
    if base_fee is None:
        signed_tx["gasPrice"] = with_retries(lambda: w3.eth.gas_price, what="eth_gasPrice", label=label)
    else:
        tip = _tip(w3)
        signed_tx["maxPriorityFeePerGas"] = tip
        signed_tx["maxFeePerGas"] = 2 * int(base_fee) + tip
    signed = account.sign_transaction(signed_tx)
    tx_hash = _hex(bytes(signed.hash))

    def _send():
        try:
            w3.eth.send_raw_transaction(signed.raw_transaction)
        except Exception as exc:  # noqa: BLE001
            text = str(exc).lower()
            # A retry after a dropped connection may find the first attempt already accepted.
            if "already known" in text or "known transaction" in text or "already imported" in text:
                return
            if "nonce too low" in text or "replacement transaction underpriced" in text:
                try:  # maybe our own first attempt, already mined
                    if w3.eth.get_transaction_receipt(tx_hash) is not None:
                        return
                except Exception:  # noqa: BLE001 - not ours
                    pass
                raise LedgerError(
                    f"{label} refused a transaction from {account.address} with nonce {nonce} ({text[:80]}): "
                    "another process sent a transaction with the same account meanwhile. Run one "
                    "medchain node (or script) per key; this step can be retried", reason="NonceConflict") from None
            raise
    try:
        with_retries(_send, what="eth_sendRawTransaction", label=label)
    except Exception as exc:  # noqa: BLE001
        _raise_funds(exc, account.address, label)
        raise
    if not wait:
        return tx_hash
    return wait_for_receipt(w3, tx_hash, decoder=decoder, contract=contract, timeout=timeout,
                            poll_latency=poll_latency, replay=base, gas=int(gas))


def wait_for_receipt(w3: Web3, tx_hash: str, *, decoder: RevertDecoder | None = None,
                     contract: str = "?", timeout: float = 120.0, poll_latency: float = 0.05,
                     replay: dict[str, Any] | None = None, gas: int | None = None):
    """Wait for the receipt of ``tx_hash``; a reverted transaction raises the decoded
    ``LedgerError`` (its reason recovered by replaying ``replay`` at the parent block)."""
    decoder = decoder or _EMPTY_DECODER
    label = node_label(w3)
    try:
        receipt = with_retries(
            lambda: w3.eth.wait_for_transaction_receipt(tx_hash, timeout=timeout, poll_latency=poll_latency),
            what="eth_getTransactionReceipt", label=label)
    except Exception as exc:  # noqa: BLE001
        from web3.exceptions import TimeExhausted
        if isinstance(exc, TimeExhausted):
            raise LedgerTimeout(f"transaction {tx_hash} to {contract} was not mined within {timeout:.0f} s "
                                f"on {label}; check that the node is mining", tx_hash=tx_hash) from None
        raise
    if receipt["status"] != 1:
        if replay is None:
            tx = w3.eth.get_transaction(tx_hash)
            replay = {"from": tx["from"], "data": "0x" + bytes(tx["input"]).hex(), "value": tx["value"]}
            if tx.get("to"):
                replay["to"] = tx["to"]
            gas = tx["gas"]
        # Replay at the parent block to recover the revert reason.
        try:
            w3.eth.call(replay, receipt["blockNumber"] - 1)
        except Exception as exc:  # noqa: BLE001
            _raise_revert(exc, decoder, contract, tx_hash=tx_hash)
        used = receipt["gasUsed"]
        hint = " (it ran out of gas)" if gas is not None and used >= gas else ""
        raise TransactionReverted(f"transaction {tx_hash} to {contract} reverted{hint}; gas used "
                                  f"{used:,}" + (f" of {gas:,}" if gas else ""), tx_hash=tx_hash)
    log.debug("tx %s to %s mined in block %d, gas %d", tx_hash, contract, receipt["blockNumber"],
              receipt["gasUsed"])
    return receipt


def advance_blocks(w3: Web3, n: int, account: LocalAccount | None = None) -> int:
    """Let ``n`` blocks pass (to reach a round deadline on a development chain); returns the new
    block number. The embedded chain mines empty blocks; on a node, ``account`` sends ``n``
    zero-value transfers to itself (standard methods only, so it works on any auto-mining node)."""
    tester = getattr(w3.provider, "ethereum_tester", None)
    if tester is not None:
        tester.mine_blocks(int(n))
    else:
        if account is None:
            raise ValueError("advance_blocks on a node needs an account to send transactions from")
        for _ in range(int(n)):
            send_transaction(w3, account, {"to": account.address, "value": 0, "data": b""})
    return w3.eth.block_number

"""Accounts that sign ledger transactions.

Transactions are always signed locally (eth-account), so nothing depends on accounts unlocked on
the node. Keys come from:

* the embedded eth-tester chain's funded accounts (:func:`embedded_accounts`);
* an environment variable holding a hex private key (:func:`key_from_env`), for real nodes;
* anvil's well-known development keys (:data:`ANVIL_DEV_KEYS`), for tests and local nodes only.

Private keys are never logged: ``LocalAccount``'s repr does not show the key, and error messages
name the environment variable, never its value.
"""
from __future__ import annotations

import hashlib
import os

from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

__all__ = ["LocalAccount", "ANVIL_DEV_KEYS", "key_from_env", "embedded_accounts", "dev_accounts",
           "derived_account", "fund"]

# The first 10 keys of anvil's default mnemonic ("test test ... junk"): public knowledge, with
# funds only on development chains. Never use them on a chain that holds anything of value.
ANVIL_DEV_KEYS: tuple[str, ...] = (
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
    "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",
    "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba",
    "0x92db14e403b83dfe3df233f83dfa3a0d7096f21ca9b0d6d6b8d88b2b4ec1564e",
    "0x4bbbf85ce3377467afe5d46f804f221813b2bb87f24d81f60f1fcdbf7cbf4356",
    "0xdbda1821b80551c9d65939329250298aa3472ba22feea921c0cf5d620ea67b97",
    "0x2a871d0798f97d79848a013d4936a73bf4cc922c825d33c1cf7073dff6d409c6",
)


def key_from_env(var: str) -> LocalAccount:
    """The account whose hex private key is in environment variable ``var``.

    Raises ``ValueError`` naming the variable (never its value) when it is unset or malformed.
    """
    raw = os.environ.get(var)
    if not raw or not raw.strip():
        raise ValueError(f"environment variable {var} is not set; put the hex private key of the "
                         f"account that signs ledger transactions in it (export {var}=0x…)")
    try:
        return Account.from_key(raw.strip())
    except Exception:  # noqa: BLE001 - do not chain: the message could echo the key
        raise ValueError(f"environment variable {var} does not hold a valid private key "
                         "(expected 32 bytes as 64 hex digits, optionally prefixed by 0x)") from None


def embedded_accounts(w3: Web3) -> list[LocalAccount]:
    """The funded accounts of an embedded eth-tester chain (10 by default), as signing accounts."""
    tester = getattr(w3.provider, "ethereum_tester", None)
    if tester is None:
        raise ValueError("embedded_accounts() needs the embedded eth-tester chain; for a node, use "
                         "key_from_env(...) or, on a development node, dev_accounts(...)")
    return [Account.from_key(k.to_bytes()) for k in tester.backend.account_keys]


def derived_account(seed: str | bytes, index: int) -> LocalAccount:
    """A deterministic account derived from ``seed`` and ``index`` (for simulations and tests)."""
    if isinstance(seed, str):
        seed = seed.encode()
    key = hashlib.sha256(b"medchain-account\x00" + seed + index.to_bytes(4, "big")).digest()
    return Account.from_key(key)


def fund(w3: Web3, sender: LocalAccount, to: str, wei: int) -> None:
    """Send ``wei`` from ``sender`` to ``to`` and wait for the receipt."""
    from .tx import send_transaction
    send_transaction(w3, sender, {"to": Web3.to_checksum_address(to), "value": int(wei), "data": b""})


def dev_accounts(w3: Web3, n: int, *, seed: str = "medchain-dev",
                 fund_wei: int = 10 ** 20) -> list[LocalAccount]:
    """``n`` funded accounts on a development chain (the embedded chain or anvil).

    The chain's own funded accounts come first; beyond those, accounts are derived from ``seed``
    and funded from the first one. For real consortium nodes use :func:`key_from_env`.
    """
    from .connection import is_embedded
    base = embedded_accounts(w3) if is_embedded(w3) else [Account.from_key(k) for k in ANVIL_DEV_KEYS]
    if n <= len(base):
        return base[:n]
    out = list(base)
    for i in range(n - len(base)):
        acct = derived_account(seed, i)
        if w3.eth.get_balance(acct.address) < fund_wei // 2:
            fund(w3, base[0], acct.address, fund_wei)
        out.append(acct)
    return out

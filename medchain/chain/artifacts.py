"""Compiled contract artifacts shipped with the package (``medchain/artifacts/<Name>.json``,
written by ``contracts/compile.js`` with the pinned solc; see contracts/README.md)."""
from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

__all__ = ["load_artifact", "ARTIFACT_DIR"]

ARTIFACT_DIR = resources.files("medchain") / "artifacts"


@functools.lru_cache(maxsize=None)
def load_artifact(name: str) -> dict[str, Any]:
    """The artifact of contract ``name``: abi, bytecode, deployedBytecode, compiler, settings,
    sourceSha256."""
    path = ARTIFACT_DIR / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no compiled artifact for contract {name!r} at {path}; run "
                                "`npm install && node compile.js` in contracts/")
    return json.loads(path.read_text(encoding="utf-8"))

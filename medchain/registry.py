"""A named registry of factories, filled by a decorator: the models (:mod:`medchain.models`) and
the data sources (:mod:`medchain.data.sources`) each keep one."""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

__all__ = ["Registry"]

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """``name -> factory``; ``kind`` names what is registered in error messages ("model")."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator: register the decorated factory as ``name`` (once)."""
        def wrap(fn: F) -> F:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = fn
            return fn
        return wrap

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __getitem__(self, name: str) -> F:
        if name not in self._items:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {self.names()}")
        return self._items[name]

"""The source registry: each source module registers its loader under its name (as
:mod:`medchain.models` does for models); :func:`medchain.data.sources.load_dataset` picks the
source a string names and calls its loader
``loader(spec, *, cache_dir, download, image_size) -> Dataset``, where ``spec`` is the part of the
source string the loader reads (the whole ``simulated:...`` text, a MedMNIST flag, a path)."""
from __future__ import annotations

from typing import Callable

from ...registry import Registry
from ..types import Dataset

__all__ = ["SOURCES", "list_sources", "register_source"]

SOURCES: Registry[Callable[..., Dataset]] = Registry("data source")

#: Decorator: ``@register_source("name")`` registers a loader.
register_source = SOURCES.register


def list_sources() -> list[str]:
    """Registered source names."""
    return SOURCES.names()

"""Image counts of a data set per class or per site, as a table."""
from __future__ import annotations

import numpy as np

from ..types import Dataset
from .layout import SPLITS

__all__ = ["describe"]


def describe(dataset: Dataset, by: str = "class"):
    """Image counts per split as a pandas DataFrame.

    ``by="class"``: one row per class (index ``label``), columns ``class`` (name), ``train``,
    ``val``, ``test``, ``total``. ``by="site"``: one row per acquisition site (index ``site``);
    needs site ids in every split.
    """
    import pandas as pd

    if by not in ("class", "site"):
        raise ValueError(f"describe: by must be 'class' or 'site', got {by!r}")
    parts = {s: getattr(dataset, s) for s in SPLITS}
    if by == "class":
        k = dataset.n_classes
        names = [dataset.class_names[c] if c < len(dataset.class_names) else str(c)
                 for c in range(k)]
        df = pd.DataFrame({"class": names}, index=pd.Index(np.arange(k), name="label"))
        for s, p in parts.items():
            df[s] = np.bincount(p.labels, minlength=dataset.n_classes)[:dataset.n_classes]
    else:
        if any(p.site is None for p in parts.values()):
            raise ValueError(f"describe: data set {dataset.name!r} has no site ids")
        keys = np.unique(np.concatenate([p.site for p in parts.values()]))
        df = pd.DataFrame(index=pd.Index(keys, name="site"))
        for s, p in parts.items():
            df[s] = [int((p.site == k).sum()) for k in keys]
    df["total"] = df[list(SPLITS)].sum(axis=1)
    return df

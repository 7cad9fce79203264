"""Study-level folds, stratified on the labels, saved and reused.

Every trial of a study must see the same split, so the split is written once per (data
fingerprint, n_folds, seed) under the cache folder and read back afterwards.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from .cache import atomic_write_bytes
from ..errors import UserError
from .layout import Layout


def _burden(labels: pd.DataFrame) -> pd.Series:
    """A study's degeneration burden: Moderate counts 1, Severe 3 (empty cells 0)."""
    w = labels["severity"].map({-1: 0, 0: 0, 1: 1, 2: 3})
    return w.groupby(labels["study_id"]).sum()


def make_folds(labels: pd.DataFrame, n_folds: int, seed: int) -> pd.DataFrame:
    """study_id -> fold, stratified on burden quantiles (each stratum holds >= 2 x n_folds studies)."""
    burden = _burden(labels).sort_index()
    n = len(burden)
    if n < n_folds:
        raise UserError(f"{n} studies cannot be split into {n_folds} folds")
    n_strata = int(max(1, min(5, n // (2 * n_folds))))
    strata = pd.qcut(burden.rank(method="first"), q=n_strata, labels=False) if n_strata > 1 else np.zeros(n)
    skf = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold = np.zeros(n, dtype=int)
    for k, (_, val) in enumerate(skf.split(np.zeros(n), strata)):
        fold[val] = k
    return pd.DataFrame({"study_id": burden.index.to_numpy(), "fold": fold})


def load_folds(layout: Layout, n_folds: int, seed: int, cache_root: Path, fingerprint: str) -> pd.DataFrame:
    """The saved split of `make_folds` (columns ``study_id, fold``) for this data fingerprint, n_folds and
    seed, from ``<cache_root>/folds/``; made and written (atomically) when missing, unreadable or not
    covering exactly the layout's studies.

    Raises:
        UserError: when it has to be made and there are fewer studies than `n_folds`.
    """
    path = Path(cache_root) / "folds" / f"{fingerprint}_{n_folds}_{seed}.csv"
    if path.exists():
        try:
            folds = pd.read_csv(path)
            if list(folds.columns) == ["study_id", "fold"] and set(folds["study_id"]) == set(layout.study_ids):
                return folds
        except Exception:
            pass  # unreadable: made again below
    folds = make_folds(layout.labels, n_folds, seed)
    atomic_write_bytes(path, folds.to_csv(index=False).encode())
    return folds

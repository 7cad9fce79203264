"""The names of a run's artifacts, written by a trial (`objective.py`) or a promotion
(`promote.py`) and read by `promote`, the registered model, ensembles and the dashboard: one home,
so a reader never guesses a writer's string.

A trial's run: ``config.yaml``, ``oof.csv`` and ``solution.csv`` (Kaggle form, every fold it
evaluated), ``augment_pipeline.json``, and per fold ``checkpoint.pt``, ``history.csv`` and
``confusion.json`` (``checkpoint_fold{k}.pt``... when the trial evaluated several folds); a
localiser's also ``oof_coordinates_fold{k}.csv`` (its points in the ``train_label_coordinates.csv``
form). A promotion puts every fold's checkpoint as ``checkpoint_fold{k}.pt`` under ``promoted/``,
with the joined OOF (a localiser's points also as ``oof_coordinates.csv``) and the registered model.
"""
from __future__ import annotations

import re

CONFIG = "config.yaml"
OOF = "oof.csv"
SOLUTION = "solution.csv"
OOF_POINTS = "oof_coordinates.csv"  # a localiser's out-of-fold points, train_label_coordinates.csv form
AUGMENT = "augment_pipeline.json"
PROMOTED = "promoted"
_PER_FOLD = re.compile(r"^(?P<kind>checkpoint|history|confusion)(?:_fold(?P<fold>\d+))?\.(?:pt|csv|json)$")
_SUFFIX = {"checkpoint": "pt", "history": "csv", "confusion": "json"}


def fold_file(kind: str, fold: int, n_folds: int = 2) -> str:
    """The artifact name of one fold's `kind` (checkpoint, history, confusion): ``history_fold2.csv``,
    or ``history.csv`` for a run that evaluated one fold (`n_folds` == 1)."""
    return f"{kind}{f'_fold{fold}' if n_folds > 1 else ''}.{_SUFFIX[kind]}"


def fold_table(name: str, fold: int) -> str:
    """The artifact name of a task's own per-fold table `name` (``points.csv`` -> ``points_fold0.csv``:
    a localiser's out-of-fold points)."""
    stem, ext = name.rsplit(".", 1)
    return f"{stem}_fold{fold}.{ext}"


def parse_fold_file(name: str) -> tuple[str, int | None] | None:
    """``"history_fold2.csv"`` -> ``("history", 2)``, ``"history.csv"`` -> ``("history", None)``;
    None for any other name."""
    m = _PER_FOLD.match(name.rsplit("/", 1)[-1])
    if not m:
        return None
    return m["kind"], int(m["fold"]) if m["fold"] is not None else None

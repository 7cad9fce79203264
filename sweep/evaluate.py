"""Fit a config on some folds, join their out-of-fold predictions and score them: the one loop
behind a trial (`objective`), `reproduce` (`query`) and `promote`.

What differs between them (Optuna reports, MLflow runs, fold artifacts, pruning) comes in as
`FoldHooks`; the loop itself knows nothing of Optuna or MLflow.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Callable

import pandas as pd

from trainer.config import TrainConfig
from trainer.metric import ScoreResult, score_groups


class FoldHooks:
    """What a caller does around each fold's `fit` (every method optional)."""

    def callbacks(self, i: int, fold: int) -> list:
        """The fit callbacks of the i-th fold (curves, a pruning reporter...)."""
        return []

    def done(self, i: int, fold: int, result) -> bool:
        """After a fold trained (its checkpoint still on disk): True stops before the next fold."""
        return False

    def failed(self, i: int, fold: int, error: BaseException) -> None:
        """The fold's fit raised (the error propagates after this)."""


@dataclass
class FoldScores:
    """What `evaluate_folds` returns: the folds it trained (their `FitResult`) and any OOF rows of
    folds trained earlier (`extra_oof`, `extra_solution`: a promotion adds its trial's), scored together."""

    results: list = field(default_factory=list)  # one FitResult per fold trained
    stopped: bool = False  # a hook stopped the loop (a pruned trial)
    extra_oof: list[pd.DataFrame] = field(default_factory=list)  # OOF of folds trained earlier
    extra_solution: list[pd.DataFrame] = field(default_factory=list)
    config: TrainConfig | None = None  # what was fitted: its task says how the OOF rows are scored

    @property
    def oof(self) -> pd.DataFrame:
        """The OOF predictions of every fold, earlier ones first (Kaggle form: ``row_id`` and the class columns)."""
        return pd.concat(self.extra_oof + [r.oof for r in self.results], ignore_index=True)

    @property
    def solution(self) -> pd.DataFrame:
        """The solution rows matching `oof`, in the same order."""
        return pd.concat(self.extra_solution + [r.solution for r in self.results], ignore_index=True)

    def score(self) -> ScoreResult:
        """The task's score (the host metric for a classifier, the point error for a localiser)
        on the joined OOF predictions of every fold (not a mean of fold scores)."""
        cfg = self.results[0].config if self.results else self.config
        if cfg is None:
            return score_groups(self.solution, self.oof)  # folds trained earlier only, task unknown: a classifier's
        from trainer.fit import score_oof

        return score_oof(cfg, self.solution, self.oof)

    @property
    def prior_score(self) -> float:
        """The mean prior score (training-fold class frequencies) of the folds trained here, not of the
        earlier ones.

        Raises:
            ZeroDivisionError: no fold was trained here."""
        return sum(r.prior_score for r in self.results) / len(self.results)


def evaluate_folds(cfg: TrainConfig, folds, hooks: FoldHooks | None = None,
                   fit_fn: Callable | None = None, prefix: str = "spinesweep-") -> FoldScores:
    """`fit` on each fold in turn (each in a scratch output folder, removed after `hooks.done`)."""
    if fit_fn is None:
        from trainer.fit import fit as fit_fn
    hooks = hooks or FoldHooks()
    out = FoldScores(config=cfg)
    for i, fold in enumerate(folds):
        work = tempfile.mkdtemp(prefix=f"{prefix}fold{fold}-")
        try:
            fold_cfg = cfg.with_overrides({"data.fold": fold, "output_dir": work})
            try:
                result = fit_fn(fold_cfg, callbacks=hooks.callbacks(i, fold))
            except BaseException as e:
                hooks.failed(i, fold, e)
                raise
            out.results.append(result)
            if hooks.done(i, fold, result):
                out.stopped = True
                return out
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return out

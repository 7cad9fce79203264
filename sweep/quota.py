"""The trial quota: `--n-trials N` is the study's total, exactly, however many workers or hosts
share it.

`optimize(n_trials=...)` counts per process and over-runs N when several share a study; here a
worker takes a lock every process sees (a file lock next to a SQLite file, a PostgreSQL advisory
lock on a shared database), counts the trials that count, and asks for a new one only while the
count is below N. Which trials count: not those replaced by a retry (a dead worker's), not those
whose worker died or that were interrupted (their parameters run again), not those skipped as
duplicates of a trial the study held (`sampling.py`), not imported log entries.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from .trials import is_legacy

__all__ = ["TrialQuota"]


class TrialQuota:
    """The count-then-ask of one study with a total of `n_trials`, serialised across processes.

    Args:
        storage_url: the study's storage (decides the lock: file or PostgreSQL advisory lock).
        study_name: the study.
        n_trials: the study's total (counted trials).
    """

    def __init__(self, storage_url: str, study_name: str, n_trials: int):
        from .stores import normalize_db_url, sqlite_path

        self.url, self.study_name, self.n_trials = normalize_db_url(storage_url), study_name, n_trials
        db = sqlite_path(storage_url)
        self.lock_path = db.with_name(f".{db.name}.{study_name}.lock") if db else Path(f".spinesweep.{study_name}.lock")

    @contextlib.contextmanager
    def lock(self, storage: RDBStorage | None = None):
        """Hold the study's quota lock (every host sharing a PostgreSQL database sees it)."""
        from .stores import advisory_lock, file_lock

        if self.url.startswith("postgresql") and storage is not None:
            with advisory_lock(storage.engine, self.study_name):
                yield
            return
        with file_lock(self.lock_path):
            yield

    @staticmethod
    def counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
        """The trials that count towards N (see the module docstring)."""
        retried = {t.system_attrs.get("failed_trial") for t in trials}
        return [t for t in trials if t.number not in retried and not is_legacy(t)
                and not t.user_attrs.get("interrupted") and not t.user_attrs.get("worker_died")
                and "duplicate_of" not in t.user_attrs]

    def full(self, trials: list[FrozenTrial]) -> bool:
        """The study holds its N counted trials and none of them waits to be run (an enqueued
        trial is run even when it is counted already)."""
        counted = self.counted(trials)
        return len(counted) >= self.n_trials and not any(t.state == TrialState.WAITING for t in counted)

    def used(self, study: optuna.Study) -> tuple[int, int]:
        """(trials that count towards N, of which waiting to be run)."""
        trials = self.counted(study.get_trials(deepcopy=False))
        return len(trials), sum(t.state == TrialState.WAITING for t in trials)

    def ask(self, study: optuna.Study, storage: RDBStorage | None = None) -> optuna.Trial | None:
        """Under the lock: a new trial (`study.ask()`), or None when the study is full."""
        with self.lock(storage):
            if self.full(study.get_trials(deepcopy=False)):
                return None
            return study.ask()

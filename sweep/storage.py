"""The Optuna storage of a study: opening it (with a heartbeat whose stale trials are retried and
have their MLflow runs closed), opening a study by name, and the one message for an outage.

Store *creation* is serialised in `stores.py` (several launchers may create one at once); this
module is what a launcher, a worker, `promote`, `dashboard` and `import-log` open it with.
"""
from __future__ import annotations

import contextlib
import os

import optuna
import sqlalchemy.exc
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from trainer.errors import UserError

from .tracking import Tracker, redact

__all__ = ["DEFAULT_STORAGE", "HEARTBEAT_INTERVAL", "STORAGE_ERRORS", "StudyError", "make_storage", "open_study",
           "unreachable"]

DEFAULT_STORAGE = "sqlite:///studies.db"
HEARTBEAT_INTERVAL = int(os.environ.get("SPINESWEEP_HEARTBEAT", "20"))  # seconds
# what the storage raises when its database goes away (Optuna wraps some commit failures)
STORAGE_ERRORS = (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError)


class StudyError(UserError):
    """The study cannot start or go on (storage, GPUs, an existing study...); the message says why."""


def make_storage(url: str, tracking_uri: str | None = None, heartbeat: int | None = None) -> RDBStorage:
    """An Optuna `RDBStorage` for `url` (SQLite with a 120 s busy timeout; other databases with
    pre-ping), created under the store-creation lock.

    Its heartbeat interval is `heartbeat` seconds (default ``$SPINESWEEP_HEARTBEAT`` or 20) with a
    grace period of three intervals; a trial whose heartbeat went stale is retried (Optuna's
    `RetryHeartbeatStaleTrialCallback`, at most 3 times) and, given `tracking_uri`, its MLflow run
    is tagged and ended FAILED.

    Raises:
        StudyError: the storage cannot be opened (the message is redacted: no password).
    """
    from .stores import creation_lock, normalize_db_url

    shown = redact(url)
    url = normalize_db_url(url)
    engine_kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    interval = heartbeat or HEARTBEAT_INTERVAL
    retry = RetryHeartbeatStaleTrialCallback(max_retry=3)

    def on_stale(study, trial):
        retry(study, trial)
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id and tracking_uri:
            with contextlib.suppress(Exception):
                Tracker(tracking_uri).fail_run(
                    run_id, "worker died (Optuna heartbeat went stale); the trial was retried")

    try:
        with creation_lock(url, "optuna"):  # launchers on a fresh storage create its tables one at a time
            return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=interval,
                              grace_period=interval * 3, heartbeat_stale_trial_callback=on_stale)
    except Exception as e:
        first = redact(str(e).splitlines()[0] if str(e) else "")
        raise StudyError(f"storage {shown} cannot be opened: {type(e).__name__}: {first}") from None


def open_study(storage: RDBStorage | str, study_name: str, **kwargs) -> optuna.Study:
    """`optuna.load_study` of an existing study (`kwargs`: sampler, pruner).

    Raises:
        StudyError: no study of that name (the message lists the studies the storage holds), or a
            SQLite storage file that does not exist (it is not created).
    """
    if isinstance(storage, str):
        from .stores import missing_sqlite

        if db := missing_sqlite(storage):
            raise StudyError(f"no study {study_name!r}: the storage {db} does not exist (run the study in this "
                             f"folder first, or name its storage with --storage)")
        storage = make_storage(storage)
    try:
        return optuna.load_study(study_name=study_name, storage=storage, **kwargs)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
        raise StudyError(f"no study {study_name!r} in {redact(storage.url)} "
                         f"(have: {', '.join(names) or 'none'})") from None


def unreachable(url: str, error: Exception) -> str:
    """The one line a study stops with when its storage stops answering."""
    return (f"storage {redact(url)} unreachable: {type(error).__name__}: {redact(str(error).splitlines()[0])}; "
            "the study stopped (resume it with --resume once the storage is back)")

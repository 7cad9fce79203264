"""The working folder's defaults, resolved one way for every command and library entry point: the
Optuna storage (``sqlite:///studies.db``), the MLflow tracking store (SQLite under ``mlruns/``),
the data folder (the phantom in ``data/phantom``, built on first use), and the checks a study runs
on them before its first trial.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from trainer.errors import UserError

__all__ = ["DEFAULT_PHANTOM", "check_stores", "check_study_name", "default_data_dir", "ensure_data",
           "resolve_storage", "resolve_tracking_uri"]

DEFAULT_PHANTOM = dict(studies=50, test_studies=5, seed=0)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def resolve_storage(url: str | None) -> str:
    """The Optuna storage URL: `url`, or ``sqlite:///studies.db`` in the working folder."""
    from .storage import DEFAULT_STORAGE

    return url or DEFAULT_STORAGE


def resolve_tracking_uri(uri: str | None) -> str:
    """The MLflow tracking URI: `uri`, or the SQLite store ``mlruns/mlflow.db`` in the working folder."""
    from .tracking import default_tracking_uri

    return uri or default_tracking_uri()


def check_study_name(name: str) -> str:
    """Study names become file names (dashboards/NAME.html, lock files): no path tricks.

    Raises:
        UserError: characters other than letters, digits, '.', '-', '_', a leading '.' or '-',
            '..', or more than 128 characters.
    """
    if not _SAFE_NAME.match(name) or ".." in name:
        raise UserError(f"study name {name!r}: use letters, digits, '.', '-' and '_' (at most 128, "
                        "not starting with '.' or '-', no '..')")
    return name


def default_data_dir() -> Path:
    """``$SPINESWEEP_DATA`` or ``data/phantom``."""
    return Path(os.environ.get("SPINESWEEP_DATA", "data/phantom"))


def ensure_data(data: str | None) -> Path:
    """The data folder to use: `data`, or the default phantom, built on first use.

    Raises:
        UserError: `data` is given and is not a folder.
    """
    if data:
        path = Path(data)
        if not path.is_dir():
            raise UserError(f"--data {data}: folder not found")
        return path
    path = default_data_dir()
    if not (path / "train.csv").exists():
        from trainer.data.phantom import make_phantom

        print(f"building the phantom dataset in {path} ({DEFAULT_PHANTOM['studies']} studies) ...", flush=True)
        make_phantom(path, jobs=os.cpu_count() or 1, **DEFAULT_PHANTOM)
    return path


def check_stores(storage: str | None, tracking_uri: str | None) -> None:
    """Before any trial: the tracking URI is no folder (MLflow 3 refuses its file store), a SQLite
    file given explicitly goes in a folder that exists (a typo is not silently created), and an
    HTTP tracking server answers within seconds.

    Raises:
        UserError: the folder does not exist; `TrackingError` (a UserError): a file-store URI, or a
            server that does not answer.
    """
    from .stores import sqlite_path
    from .tracking import check_tracking_uri, probe_server

    if tracking_uri:
        check_tracking_uri(tracking_uri)
    for flag, url in (("--storage", storage), ("--tracking-uri", tracking_uri)):
        db = sqlite_path(url) if url else None
        if db is not None and not db.parent.is_dir():
            raise UserError(f"{flag} {url}: folder {db.parent} does not exist (create it first)")
    if (tracking_uri or "").startswith(("http://", "https://")):
        probe_server(tracking_uri)

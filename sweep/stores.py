"""Database URLs and store creation that several launchers may do at once.

Creating a fresh store runs schema creation/migrations (Optuna's tables, MLflow's alembic
history). Two processes doing it at the same moment crash on SQLite and can collide on
PostgreSQL, so every creation runs under a lock every launcher sees: a file lock next to a SQLite
file, a PostgreSQL advisory lock on the database itself.
"""
from __future__ import annotations

import contextlib
import importlib.util
import zlib
from pathlib import Path

from trainer.data.cache import file_lock  # noqa: F401  (one file lock for caches and stores)


def normalize_db_url(url: str) -> str:
    """``postgresql://`` (SQLAlchemy's psycopg2 default) -> ``postgresql+psycopg://`` when only
    psycopg 3 is installed (the one this project depends on)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix) and importlib.util.find_spec("psycopg2") is None:
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL (relative, or absolute with a fourth slash), or None
    for any other URL."""
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///"):])
    return None


def missing_sqlite(url: str) -> Path | None:
    """The absolute path of a ``sqlite:///`` URL's database file when that file does not exist (a
    command that only reads must not create it), else None (it exists, or the URL is no SQLite one)."""
    db = sqlite_path(normalize_db_url(url))
    return db.resolve() if db is not None and not db.exists() else None


@contextlib.contextmanager
def advisory_lock(engine, name: str):
    """A PostgreSQL advisory lock: every host connected to the database sees it."""
    from sqlalchemy import text

    key = zlib.crc32(f"spinesweep:{name}".encode())
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            conn.commit()


@contextlib.contextmanager
def creation_lock(url: str, name: str = "init"):
    """Serialise store creation across processes (and hosts, for PostgreSQL)."""
    url = normalize_db_url(url)
    db = sqlite_path(url)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(db.with_name(f".{db.name}.{name}.lock")):
            yield
        return
    if url.startswith("postgresql"):
        from sqlalchemy import create_engine

        engine = create_engine(url, pool_pre_ping=True)
        try:
            with advisory_lock(engine, name):
                yield
        finally:
            engine.dispose()
        return
    yield

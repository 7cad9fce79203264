"""The cache folder and what every on-disk cache shares: its location, atomic writes, a file
lock that processes (and hosts, on a shared file system) see, and the data fingerprint.

What lives there: ``volumes/`` (decoded series, `volumes.py`) and ``folds/`` (saved splits,
`folds.py`).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from pathlib import Path

from .layout import Layout


def default_cache_dir(configured: str = "") -> Path:
    """The cache folder: `configured` if given, else ``$SPINESWEEP_CACHE``, else ``~/.cache/spinesweep``
    (``~`` expanded; nothing is created)."""
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get("SPINESWEEP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "spinesweep"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` (parent folders created) through a temporary file in the same folder
    and a rename, so a reader sees the old file or the whole new one, never a partial write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock on a file (created if missing). The kernel releases it when its holder
    dies, so a crashed process never leaves it taken."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_FINGERPRINTS: dict[tuple, str] = {}


def data_fingerprint(layout: Layout) -> str:
    """Content fingerprint of a data folder: the CSVs' bytes and every image file's path and size
    (not times, so two copies of the same data agree). Walking every file is costly on the real
    data, and every trial asks, so it is remembered per process until a CSV or an image folder's
    listing changes."""
    watched = [layout.root / n for n in ("train.csv", "train_label_coordinates.csv", "train_series_descriptions.csv",
                                         "test_series_descriptions.csv", "train_images", "test_images")]
    key = (str(layout.root.resolve()), *(p.stat().st_mtime_ns if p.exists() else None for p in watched))
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = _compute_fingerprint(layout)
    return _FINGERPRINTS[key]


def _compute_fingerprint(layout: Layout) -> str:
    h = hashlib.sha1()
    for name in ("train.csv", "train_label_coordinates.csv", "train_series_descriptions.csv",
                 "test_series_descriptions.csv"):
        p = layout.root / name
        if p.exists():
            h.update(name.encode() + p.read_bytes())
    for split in ("train_images", "test_images"):
        base = layout.root / split
        if not base.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for f in sorted(filenames):
                p = Path(dirpath) / f
                h.update(f"{p.relative_to(layout.root)}:{p.stat().st_size};".encode())
    return h.hexdigest()[:16]

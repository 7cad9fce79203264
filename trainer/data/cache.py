"""On-disk caches: decoded DICOM volumes and preprocessed samples.

Two levels, so that what changes most often costs least:

- ``volumes/<study>/<series>.npz``: a decoded, sorted, uint8-scaled series with its geometry,
  keyed by its files' names, sizes and modification times. A trial that changes only
  `window_ratio` or `img_size` re-crops from here and decodes no DICOM.
- ``samples/<crop key>/<study>.npy`` + ``.json``: the crops of a study's five levels for one
  `CropSpec`, keyed by the spec and the study's data fingerprint (its series files and labelled
  points). A second trial with the same preprocessing reads only these.

Every write is atomic (a temporary file, then `os.replace`), and the ``.json`` that validates an
entry is written last, so an interrupted or failed write (disk full) leaves no entry that a later
run would trust. An entry that does not load, or whose key does not match, is rebuilt.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .crops import CropSpec, StudyCrops, build_study_crops
from .dicom import DicomWarning, Volume, read_series
from .layout import Layout

VOLUME_VERSION = 1


def default_cache_dir(configured: str = "") -> Path:
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get("SPINESWEEP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "spinesweep"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _files_key(folder: Path) -> str:
    h = hashlib.sha1(str(VOLUME_VERSION).encode())
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.endswith(".dcm"):
            st = entry.stat()
            h.update(f"{entry.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


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


class VolumeCache:
    """Decoded series under ``<root>/volumes``."""

    def __init__(self, root: Path):
        self.root = Path(root) / "volumes"

    def load(self, series_dir: Path, study_id: int, series_id: int) -> Volume:
        series_dir = Path(series_dir)
        if not series_dir.is_dir():
            raise FileNotFoundError(f"{series_dir}: series folder not found")
        key = _files_key(series_dir)
        path = self.root / str(study_id) / f"{series_id}.npz"
        if path.exists():
            try:
                with np.load(path) as z:
                    if str(z["key"]) == key:
                        return Volume.from_arrays(z)
            except Exception as e:  # truncated or corrupt entry: rebuild it
                warnings.warn(f"{path}: corrupt cache entry rebuilt ({e})", DicomWarning, stacklevel=2)
        vol = read_series(series_dir)
        buf = io.BytesIO()
        np.savez(buf, key=np.array(key), **vol.to_arrays())
        try:
            atomic_write_bytes(path, buf.getvalue())
        except OSError as e:  # a volume entry only saves time: go on without it
            warnings.warn(f"{path}: volume not cached ({e})", DicomWarning, stacklevel=2)
        return vol


@dataclass
class BuildReport:
    studies: int = 0
    built: int = 0  # studies whose crops were (re)built
    reused: int = 0  # studies read from the cache
    crops_built: int = 0  # (level, block) crops present
    flags: list[dict] = None

    def __post_init__(self):
        self.flags = self.flags or []


class SampleStore:
    """Crops of every study for one `CropSpec`, built once and read many times."""

    def __init__(self, layout: Layout, spec: CropSpec, cache_root: Path):
        self.layout = layout
        self.spec = spec
        self.cache_root = Path(cache_root)
        self.volumes = VolumeCache(self.cache_root)
        self.dir = self.cache_root / "samples" / spec.key()
        self._coords = None

    def _study_coords(self, study_id: int) -> pd.DataFrame:
        if self._coords is None:
            self._coords = {k: g for k, g in self.layout.coordinates.groupby("study_id")}
        return self._coords.get(study_id, self.layout.coordinates.iloc[:0])

    def study_key(self, study_id: int) -> str:
        h = hashlib.sha1(self.spec.key().encode())
        h.update(pd.util.hash_pandas_object(self._study_coords(study_id), index=False).to_numpy().tobytes())
        for desc, ids in self.layout.series_of(study_id).items():
            for sid in ids:
                folder = self.layout.series_dir(study_id, sid)
                h.update(f"{desc}:{sid}:{_files_key(folder) if folder.is_dir() else 'missing'};".encode())
        return h.hexdigest()

    def _paths(self, study_id: int) -> tuple[Path, Path]:
        return self.dir / f"{study_id}.npy", self.dir / f"{study_id}.json"

    def load(self, study_id: int, key: str | None = None, mmap: bool = True):
        """(images, present, flags) of a cached study, or None when absent, stale or corrupt."""
        npy, meta_path = self._paths(study_id)
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if key is not None and meta["key"] != key:
                return None
            images = np.load(npy, mmap_mode="r" if mmap else None)
            if list(images.shape) != meta["shape"] or images.dtype != np.uint8:
                raise ValueError(f"shape {images.shape} {images.dtype}, expected {meta['shape']} uint8")
            return images, np.asarray(meta["present"], dtype=bool), meta["flags"]
        except Exception as e:
            warnings.warn(f"{npy}: corrupt cache entry, rebuilding ({e})", DicomWarning, stacklevel=2)
            return None

    def build(self, study_id: int) -> StudyCrops:
        series = self.layout.series_of(study_id)
        axial = series["Axial T2"][0] if series["Axial T2"] else None

        def load_volume(series_id: int) -> Volume:
            return self.volumes.load(self.layout.series_dir(study_id, series_id), study_id, series_id)

        return build_study_crops(study_id, self._study_coords(study_id), load_volume, self.spec, axial)

    def ensure(self, study_ids, progress: bool = False) -> BuildReport:
        """Build the crops of every study not cached yet, one study at a time (memory stays flat)."""
        report = BuildReport()
        it = list(study_ids)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc="crops", unit="study", leave=False)
        for sid in it:
            report.studies += 1
            key = self.study_key(sid)
            cached = self.load(sid, key, mmap=True)
            if cached is not None:
                report.reused += 1
                report.crops_built += int(cached[1].sum())
                report.flags += [dict(f, study_id=sid) for f in cached[2]]
                continue
            crops = self.build(sid)
            self._write(sid, key, crops)
            report.built += 1
            report.crops_built += int(crops.present.sum())
            report.flags += [dict(f, study_id=sid) for f in crops.flags]
        return report

    def _write(self, study_id: int, key: str, crops: StudyCrops) -> None:
        """The images, then the meta file that commits them: a write that fails half-way (disk
        full) leaves no meta, so no entry, never images under an old key."""
        npy, meta_path = self._paths(study_id)
        buf = io.BytesIO()
        np.save(buf, crops.images)
        meta = dict(key=key, shape=list(crops.images.shape), present=crops.present.tolist(), flags=crops.flags)
        try:
            meta_path.unlink(missing_ok=True)
            atomic_write_bytes(npy, buf.getvalue())
            atomic_write_bytes(meta_path, json.dumps(meta).encode())
        except OSError as e:
            raise OSError(e.errno, f"crop cache {self.dir}: cannot write study {study_id} ({e.strerror or e}); "
                                   "free some space or point SPINESWEEP_CACHE elsewhere") from e

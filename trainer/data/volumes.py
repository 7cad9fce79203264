"""Decoded series on disk, memory-mapped: the one pixel cache of the data path.

Each series is decoded once (dicomsdl, sorted along its normal, scaled to uint8) into

- ``volumes/<study>/<series>.npy``: every slice, concatenated into one 1-D uint8 array (slices
  of one series may differ in shape), opened with ``mmap_mode="r"`` so a crop touches only the
  pages it reads and DataLoader workers share the page cache;
- ``volumes/<study>/<series>.json``: its geometry, slice shapes and offsets, the key of the DICOM
  files it came from (names, sizes, times), and, as its modification time, when it was last used.

Crops are cut from these on the fly (see `crops.py`), so a trial that changes `window_ratio`,
slice counts or `img_size` adds no bytes to the cache and waits for nothing but its plan.

Guarantees:

- **Atomic**: the ``.npy`` is written to a temporary file and renamed, then the ``.json`` that
  commits it. A builder that dies leaves no entry that is trusted.
- **Built once**: a builder holds ``volumes/<study>/.<series>.lock`` (an OS file lock, released
  by the kernel if the process dies). Processes or hosts sharing the folder that need the same
  entry wait for it and then read it.
- **Bounded**: the cache stays under a byte budget (`cache_budget`). Before an entry is written,
  its bytes are reserved in a ledger under a lock; when the reservation would pass the budget,
  least-recently-used entries are evicted (down to 90 %) and a `CacheWarning` says what went.
  A reader that still maps an evicted entry keeps reading it (POSIX unlink semantics).
- **Parallel**: `prepare` decodes the missing entries of a data folder in worker processes, with
  a progress bar and ETA.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from .cache import atomic_write_bytes, file_lock
from .dicom import DicomWarning, Volume, read_series

VOLUME_VERSION = 5  # bump when the decoded pixels change: it invalidates every entry (4: MONOCHROME1 mirrored, 5: file names)
DEFAULT_BUDGET = 64 * 2**30  # bytes; the real competition set decodes to about 40 GB (README, Scale)
EVICT_TO = 0.9  # an eviction frees down to this fraction of the budget, so it does not run per entry
STALE_SECONDS = 3600  # a temporary file this old belongs to a builder that died


class CacheWarning(UserWarning):
    """The volume cache evicted entries or could not keep one; the message says which and why."""


def parse_size(text: str | float | int) -> int:
    """Bytes from ``64``, ``64GB``, ``500 MB``, ``1.5GiB``, ``2T`` (a plain number is GB)."""
    if isinstance(text, (int, float)):
        return int(float(text) * 2**30)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)i?b?\s*", str(text), re.I)
    if not m:
        raise UserError(f"cache budget {text!r}: expected a size such as 64GB, 500MB or 1.5TB")
    unit = {"": 2**30, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2).lower()]
    return int(float(m.group(1)) * unit)


def cache_budget(configured_gb: float = 0.0) -> int:
    """The cache's budget in bytes: the config's `data.cache_budget_gb` when set, else
    ``$SPINESWEEP_CACHE_BUDGET`` (e.g. ``200GB``), else 64 GiB."""
    if configured_gb:
        return int(configured_gb * 2**30)
    env = os.environ.get("SPINESWEEP_CACHE_BUDGET")
    return parse_size(env) if env else DEFAULT_BUDGET


def files_key(folder: Path) -> str:
    """Names, sizes and modification times of a series folder's DICOM files (and the format
    version): an entry whose key differs is stale."""
    h = hashlib.sha1(str(VOLUME_VERSION).encode())
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.endswith(".dcm"):
            st = entry.stat()
            h.update(f"{entry.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class SeriesRef:
    """One series of one study, and where its DICOM files are."""

    study_id: int
    series_id: int
    folder: Path


@dataclass
class PrepareReport:
    """What `VolumeStore.prepare` did: `series` is how many series it was given; `failed` maps a
    series id to why it has no pixels (its folder is missing, counted nowhere else, or no slice is
    readable); `seconds` is wall-clock time and `jobs` the number of processes that decoded."""

    series: int = 0
    decoded: int = 0  # entries built by this call
    reused: int = 0  # entries already cached (or built meanwhile by another process)
    failed: dict = field(default_factory=dict)  # series_id -> reason (no readable file)
    seconds: float = 0.0
    jobs: int = 1


class VolumeStore:
    """Decoded series under ``<cache_root>/volumes``, within `budget` bytes."""

    def __init__(self, cache_root: Path, budget: int | None = None, clean_old: bool = True):
        self.root = Path(cache_root) / "volumes"
        self.budget = int(budget if budget is not None else cache_budget())
        self._touched: set[tuple[int, int]] = set()
        self._keys: dict[Path, str] = {}  # a series folder's key, listed once per store (one trial)
        if clean_old:
            self._drop_old_caches(Path(cache_root) / "samples")

    def __repr__(self) -> str:
        return f"VolumeStore({self.root}, budget={self.budget / 2**30:.1f} GiB)"

    # ---------------------------------------------------------------- entries
    def paths(self, study_id: int, series_id: int) -> tuple[Path, Path, Path]:
        """(pixels, meta, lock) of one entry."""
        d = self.root / str(study_id)
        return d / f"{series_id}.npy", d / f"{series_id}.json", d / f".{series_id}.lock"

    def _key(self, folder: Path) -> str:
        if folder not in self._keys:
            self._keys[folder] = files_key(folder)
        return self._keys[folder]

    def _meta(self, ref: SeriesRef, key: str) -> dict | None:
        _, meta_path, _ = self.paths(ref.study_id, ref.series_id)
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            warnings.warn(f"{meta_path}: corrupt cache entry rebuilt ({e})", CacheWarning, stacklevel=3)
            return None
        return meta if meta.get("key") == key else None

    def cached(self, ref: SeriesRef) -> bool:
        """Whether the series has an up-to-date committed entry (same DICOM file names, sizes and times,
        same `VOLUME_VERSION`), counting one that remembers that no slice was readable. False when its
        folder is missing."""
        return ref.folder.is_dir() and self._meta(ref, self._key(ref.folder)) is not None

    def ensure(self, ref: SeriesRef) -> bool:
        """Decode the series into the cache unless it is there already; True when this call built
        it. Another process building the same entry is waited for, never duplicated."""
        if not ref.folder.is_dir():
            raise FileNotFoundError(f"{ref.folder}: series folder not found")
        key = self._key(ref.folder)
        if self._meta(ref, key) is not None:
            return False
        npy, meta_path, lock = self.paths(ref.study_id, ref.series_id)
        npy.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(lock):
            if self._meta(ref, key) is not None:
                return False  # built by another process while this one waited
            for tmp in npy.parent.glob(f".{ref.series_id}.*.tmp"):
                tmp.unlink(missing_ok=True)  # left by a builder that died holding this lock
            meta_path.unlink(missing_ok=True)
            try:
                vol = read_series(ref.folder)
            except FileNotFoundError as e:  # no readable slice: remembered, not retried every trial
                self._commit_meta(meta_path, dict(key=key, error=str(e)))
                return True
            pixels = np.concatenate([im.ravel() for im in vol.images]) if vol.images else np.zeros(0, np.uint8)
            buf = io.BytesIO()
            np.save(buf, pixels)
            data = buf.getvalue()
            meta = dict(key=key, shapes=[list(im.shape) for im in vol.images], **_geometry(vol))
            reserved = 0
            try:
                if not self._reserve(len(data) + 4096, keep=(ref.study_id, ref.series_id)):
                    warnings.warn(f"{npy}: not cached: {len(data) / 2**20:.0f} MB does not fit in the cache budget "
                                  f"of {self.budget / 2**20:.0f} MB (raise data.cache_budget_gb or "
                                  "$SPINESWEEP_CACHE_BUDGET)", CacheWarning, stacklevel=2)
                    return True
                reserved = len(data) + 4096
                atomic_write_bytes(npy, data)
                self._commit_meta(meta_path, meta)
            except OSError as e:
                npy.unlink(missing_ok=True)
                if reserved:
                    with contextlib.suppress(OSError):
                        self._release(reserved)
                raise OSError(e.errno, f"volume cache {self.root}: cannot write study {ref.study_id} series "
                                       f"{ref.series_id} ({e.strerror or e}); free some space, lower the cache "
                                       "budget or point SPINESWEEP_CACHE elsewhere") from e
        return True

    @staticmethod
    def _commit_meta(path: Path, meta: dict) -> None:
        atomic_write_bytes(path, json.dumps(meta).encode())

    def open(self, ref: SeriesRef) -> Volume:
        """The cached series as a `Volume` whose images are read-only views of the memory map.
        Decodes it first when missing, stale or corrupt; raises FileNotFoundError for a series
        with no readable slice."""
        for _ in range(2):
            self.ensure(ref)
            meta = self._meta(ref, self._key(ref.folder))
            if meta is None:  # the budget cannot hold it (warned): decode into memory
                return read_series(ref.folder)
            if "error" in meta:
                raise FileNotFoundError(meta["error"])
            npy, meta_path, _ = self.paths(ref.study_id, ref.series_id)
            try:
                flat = np.load(npy, mmap_mode="r")
                vol = _volume(flat, meta)
            except (OSError, ValueError) as e:  # evicted meanwhile, truncated or corrupt
                if npy.exists():
                    warnings.warn(f"{npy}: corrupt cache entry rebuilt ({e})", CacheWarning, stacklevel=2)
                meta_path.unlink(missing_ok=True)
                continue
            if (ref.study_id, ref.series_id) not in self._touched:  # last use, for LRU eviction
                self._touched.add((ref.study_id, ref.series_id))
                try:
                    os.utime(meta_path)
                except OSError:
                    pass
            return vol
        return read_series(ref.folder)

    # ---------------------------------------------------------------- many at once
    def prepare(self, refs: list[SeriesRef], jobs: int = 1, progress: bool | None = None,
                desc: str = "decoding DICOM") -> PrepareReport:
        """Decode every missing entry, in `jobs` worker processes when there is more than one to
        build. `progress`: a tqdm bar with ETA (None: only on a terminal)."""
        t0 = time.perf_counter()
        report = PrepareReport(series=len(refs), jobs=1)
        missing = []
        for ref in refs:
            if not ref.folder.is_dir():
                report.failed[ref.series_id] = f"{ref.folder}: series folder not found"
            elif self.cached(ref):
                report.reused += 1
            else:
                missing.append(ref)
        # processes sharing a cold cache start at different places, so they rarely wait on a lock
        random.Random(os.getpid()).shuffle(missing)
        bar = None
        if missing and progress is not False:
            from tqdm import tqdm

            tqdm.monitor_interval = 0  # no monitor thread: workers can then be forked (below)
            bar = tqdm(total=len(missing), desc=desc, unit="series", disable=None if progress is None else False,
                       leave=False, dynamic_ncols=True)
        try:
            jobs = max(1, min(jobs, len(missing)))
            report.jobs = jobs
            if jobs == 1:
                results = (_build(self.root.parent, self.budget, ref) for ref in missing)
                self._collect(results, missing, report, bar)
            else:
                import multiprocessing as mp
                import threading
                from concurrent.futures import ProcessPoolExecutor

                # fork starts at once, but a caller holding other threads (Optuna's heartbeat,
                # a progress display) could hand a child a lock taken mid-operation: then
                # forkserver, whose server imports this module once and forks the workers
                if threading.active_count() == 1:
                    ctx = mp.get_context("fork")
                else:
                    ctx = mp.get_context("forkserver")
                    ctx.set_forkserver_preload([__name__])
                with ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
                    futures = [pool.submit(_build, self.root.parent, self.budget, ref) for ref in missing]
                    self._collect((f.result() for f in futures), missing, report, bar)
        finally:
            if bar is not None:
                bar.close()
        report.seconds = time.perf_counter() - t0
        return report

    @staticmethod
    def _collect(results, refs, report: PrepareReport, bar) -> None:
        for ref, (built, error, messages) in zip(refs, results):
            for category, message in messages:  # warnings raised in a worker, shown here once
                warnings.warn(message, category, stacklevel=3)
            if error:
                report.failed[ref.series_id] = error
            if built:
                report.decoded += 1
            else:
                report.reused += 1
            if bar is not None:
                bar.update(1)

    # ---------------------------------------------------------------- budget
    def _ledger(self) -> tuple[Path, Path]:
        return self.root / ".usage", self.root / ".usage.lock"

    def usage(self) -> int:
        """Bytes the cache holds now (a scan)."""
        return sum(e.bytes for e in self._entries())

    def _reserve(self, nbytes: int, keep: tuple[int, int]) -> bool:
        """Count `nbytes` into the ledger, evicting least-recently-used entries first when they
        would pass the budget. False when they cannot fit even in an empty cache."""
        if nbytes > self.budget:
            return False
        ledger, lock = self._ledger()
        self.root.mkdir(parents=True, exist_ok=True)
        with file_lock(lock):
            used = _read_int(ledger)
            if used is None or used + nbytes > self.budget:
                used = self.usage()  # the ledger only ever over-counts (a dead builder's bytes): rescan
                if used + nbytes > self.budget:
                    used = self._evict(int(self.budget * EVICT_TO) - nbytes, keep)
            atomic_write_bytes(ledger, str(used + nbytes).encode())
        return True

    def _release(self, nbytes: int) -> None:
        ledger, lock = self._ledger()
        with file_lock(lock):
            used = _read_int(ledger)
            if used is not None:
                atomic_write_bytes(ledger, str(max(0, used - nbytes)).encode())

    def _entries(self) -> list["_Entry"]:
        out = []
        if not self.root.is_dir():
            return out
        now = time.time()
        for study in os.scandir(self.root):
            if not study.is_dir():
                continue
            metas, sizes = {}, {}
            for f in os.scandir(study.path):
                try:
                    st = f.stat()
                except FileNotFoundError:
                    continue
                if f.name.endswith(".json"):
                    metas[f.name[:-5]] = st.st_mtime
                    sizes[f.name[:-5]] = sizes.get(f.name[:-5], 0) + st.st_size
                elif f.name.endswith(".npy"):
                    sizes[f.name[:-4]] = sizes.get(f.name[:-4], 0) + st.st_size
                elif f.name.endswith(".tmp"):  # being written, or left by a dead builder
                    stale = now - st.st_mtime > STALE_SECONDS
                    out.append(_Entry(int(study.name), -1, st.st_size, st.st_mtime, Path(f.path) if stale else None))
            for name, size in sizes.items():
                # an .npy without its .json was never committed (or lost its meta): oldest first
                out.append(_Entry(int(study.name), int(name), size, metas.get(name, 0.0)))
        return out

    def _evict(self, target: int, keep: tuple[int, int]) -> int:
        """Delete least-recently-used entries until at most `target` bytes remain; returns what
        remains. Called under the ledger lock."""
        entries = sorted(self._entries(), key=lambda e: e.last_used)
        used = sum(e.bytes for e in entries)
        gone, freed = [], 0
        for e in entries:
            if used <= target:
                break
            if (e.study_id, e.series_id) == keep:
                continue
            if e.series_id < 0:  # a temporary file: only a dead builder's is removed
                if e.stale_path is None:
                    continue
                e.stale_path.unlink(missing_ok=True)
            else:
                npy, meta, _ = self.paths(e.study_id, e.series_id)
                meta.unlink(missing_ok=True)  # first: nobody trusts the pixels from here on
                npy.unlink(missing_ok=True)
                gone.append(e)
            used -= e.bytes
            freed += e.bytes
        if gone:
            oldest = time.strftime("%Y-%m-%d %H:%M", time.localtime(gone[0].last_used)) if gone[0].last_used else "never"
            warnings.warn(f"volume cache {self.root}: evicted {len(gone)} series ({freed / 2**20:.0f} MB, least "
                          f"recently used first, oldest last used {oldest}; e.g. study {gone[0].study_id} series "
                          f"{gone[0].series_id}) to stay under its budget of {self.budget / 2**30:.2f} GiB",
                          CacheWarning, stacklevel=4)
        return used

    def _drop_old_caches(self, samples: Path) -> None:
        """What earlier spinesweep versions cached is never read any more: the crop cache
        (``samples/``) and ``.npz`` volumes. Free their space once, saying so."""
        import shutil

        old = [f for f in samples.rglob("*") if f.is_file()] if samples.is_dir() else []
        npz = list(self.root.glob("*/*.npz")) if self.root.is_dir() else []
        if not old and not npz:
            return
        size = sum(f.stat().st_size for f in old + npz)
        shutil.rmtree(samples, ignore_errors=True)
        for f in npz:
            f.unlink(missing_ok=True)
        warnings.warn(f"{samples.parent}: removed the caches of an earlier spinesweep ({size / 2**20:.0f} MB: crops "
                      "per spec and .npz volumes); volumes are now memory-mapped and crops cut on the fly",
                      CacheWarning, stacklevel=3)


@dataclass
class _Entry:
    study_id: int
    series_id: int  # -1: a temporary file
    bytes: int
    last_used: float
    stale_path: Path | None = None


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def _geometry(vol: Volume) -> dict:
    return dict(positions=vol.positions.tolist(), orientations=vol.orientations.tolist(),
                spacings=vol.spacings.tolist(), instance_numbers=vol.instance_numbers.tolist(),
                description=vol.description, patient_position=vol.patient_position, skipped=vol.skipped,
                files=vol.files)


def _volume(flat: np.ndarray, meta: dict) -> Volume:
    shapes = [tuple(s) for s in meta["shapes"]]
    sizes = [h * w for h, w in shapes]
    if flat.dtype != np.uint8 or flat.ndim != 1 or flat.size != sum(sizes):
        raise ValueError(f"pixels of {flat.size} {flat.dtype} for slices {shapes}")
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    return Volume(
        images=[flat[o:o + n].reshape(s) for o, n, s in zip(offsets, sizes, shapes)],
        positions=np.asarray(meta["positions"], dtype=np.float64).reshape(-1, 3),
        orientations=np.asarray(meta["orientations"], dtype=np.float64).reshape(-1, 6),
        spacings=np.asarray(meta["spacings"], dtype=np.float64).reshape(-1, 2),
        instance_numbers=np.asarray(meta["instance_numbers"], dtype=np.int64),
        description=meta["description"], patient_position=meta["patient_position"],
        skipped=[tuple(s) for s in meta["skipped"]],
        files=list(meta.get("files", [])),
    )


def _build(cache_root: Path, budget: int, ref: SeriesRef) -> tuple[bool, str | None, list]:
    """One entry, in a worker process: (built here, error, warnings to show in the parent)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = VolumeStore(cache_root, budget, clean_old=False)
        built, error = False, None
        try:
            built = store.ensure(ref)
            meta = store._meta(ref, store._key(ref.folder))
            if meta is not None and "error" in meta:
                error = meta["error"]
        except FileNotFoundError as e:
            error = str(e)
    return built, error, [(w.category, str(w.message)) for w in caught
                          if issubclass(w.category, (DicomWarning, CacheWarning))]

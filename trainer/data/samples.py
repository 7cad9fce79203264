"""`SampleSource`: the crops of (study, level) samples, cut on demand from memory-mapped volumes.

`prepare` does the slow part once per data folder and cache: it decodes the series the studies
need that are not cached yet (in worker processes) and plans every study's crops (geometry only).
`sample` then cuts one level's crops in a few milliseconds, in whichever process asks: a
DataLoader worker opens the volumes it needs as memory maps, so workers share the page cache and
hold no copy. A new `window_ratio`, slice count or `img_size` therefore adds nothing to the cache
and waits only for the plans.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .crops import CropSpec, StudyCrops, StudyPlan, cut_level, plan_study
from .dicom import Volume
from .layout import LEVELS, PLANE_OF_CONDITION, PLANE_OF_SERIES, Layout, LayoutError, read_coordinates
from .volumes import SeriesRef, VolumeStore

_OPEN_MAX = 256  # memory-mapped series kept open per process


@dataclass
class BuildReport:
    """What `SampleSource.prepare` did: `series` is how many distinct series the studies needed,
    `flags` every study's plan flags with its ``study_id``, `seconds` the call's wall-clock time and
    `jobs` the number of processes that decoded."""

    studies: int = 0
    series: int = 0
    decoded: int = 0  # series decoded by this call (the rest came from the cache)
    reused: int = 0
    crops_planned: int = 0  # (level, block) crops that have a point to be cut around
    flags: list[dict] = field(default_factory=list)  # {"study_id", "level", "block", "reason", "detail"}
    seconds: float = 0.0
    jobs: int = 1


class ValPointsError(LayoutError):
    """`data.val_points: oof` cannot be honoured: the points file is not a local CSV of the
    train_label_coordinates.csv form, or it lacks validation studies; the message names the file
    and the studies."""


def fold_coordinates(layout: Layout, val_ids, val_points_file: str | Path, fold: int | None = None) -> pd.DataFrame:
    """The points a fold's crops are cut around with ``data.val_points: oof``: the labelled points
    (`Layout.coordinates`) of every study but the validation ones, and the rows of
    `val_points_file` (a train_label_coordinates.csv-form CSV of a localiser's out-of-fold points)
    for the validation studies `val_ids`; the file's rows of other studies are not used.

    An out-of-fold points file has, whatever the localiser's folds were, this property: each
    study's points come from a localiser that never trained on that study (its fold's model). So
    validation crops cut here are cut as on a test study, and the fold is scored as the leaderboard
    scores it, while the classifier still trains on the labelled points. (A file of points from a
    localiser that trained on the validation studies, e.g. `optuna-run localize --split train`
    with a model trained on every fold, would give optimistic scores: this function cannot tell.)

    A validation study with no row in the file is an error, not a silent fallback: falling back to
    the labelled points would put back the very optimism `oof` removes, and falling back to the
    mean-position guess would mix two measurements in one score. A study whose file rows lack some
    (condition, level) is scored as a test study would be: that crop cannot be built and the
    condition gets the training fold's grade frequencies (the crop builder's flags say why).

    Raises:
        ValPointsError: the file is an MLflow URI (resolve it first), is missing, is not a CSV of
            that form (the message names the file and column), or lacks validation studies (named).
    """
    path = str(val_points_file)
    if "://" in path or path.startswith(("runs:/", "models:/")):
        raise ValPointsError(f"data.val_points_file: {path!r} is a URI; the trainer reads a local CSV only: a study "
                             "downloads a localiser's runs:/ or models:/ points before its trials "
                             "(sweep.localize.oof_points_file); elsewhere pass the file")
    try:
        points = read_coordinates(Path(path))
    except LayoutError as e:
        raise ValPointsError(f"data.val_points_file: {e}") from None
    val = sorted({int(s) for s in val_ids})
    have = set(points["study_id"].astype(int))
    missing = [s for s in val if s not in have]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        where = f"fold {fold}'s" if fold is not None else "the"
        raise ValPointsError(
            f"data.val_points_file: {path}: no points for {len(missing)} of {where} {len(val)} validation studies "
            f"({shown}); an out-of-fold points file must cover every validation study (a localiser trial "
            "evaluated on some folds covers those folds' studies only: promote it on every fold, or use "
            "data.val_points: labelled)")
    labelled = layout.coordinates
    return pd.concat([labelled[~labelled["study_id"].isin(val)], points[points["study_id"].isin(val)]],
                     ignore_index=True)


class SampleSource:
    """Samples of one `CropSpec` over one data folder, from the volumes in `store`. `coordinates`
    replaces the layout's labelled points (the same columns): `fold_coordinates` gives a fold's
    validation studies a localiser's out-of-fold points."""

    def __init__(self, layout: Layout, spec: CropSpec, store: VolumeStore, split: str = "train",
                 coordinates: pd.DataFrame | None = None):
        self.layout, self.spec, self.store, self.split = layout, spec, store, split
        self.coordinates = coordinates
        self.plans: dict[int, StudyPlan] = {}
        self._coords = None
        self._open: dict[tuple[int, int], Volume] = {}

    def __getstate__(self):  # DataLoader workers (spawned) reopen their own memory maps
        return {**self.__dict__, "_open": {}}

    # ---------------------------------------------------------------- what a study needs
    def study_coords(self, study_id: int) -> pd.DataFrame:
        """The study's rows of train_label_coordinates (`Layout.coordinates`'s columns, or those of
        `coordinates` when given); an empty frame on the test split or for a study without points."""
        if self._coords is None:
            coords = self.layout.coordinates if self.coordinates is None else self.coordinates
            coords = coords if self.split == "train" else coords.iloc[:0]
            self._coords = {k: g for k, g in coords.groupby("study_id")}
        return self._coords.get(study_id, self.layout.coordinates.iloc[:0])

    def _axial_series(self, study_id: int) -> int | None:
        axial = self.layout.series_of(study_id, self.split)["Axial T2"]
        return axial[0] if axial else None

    def needed_series(self, study_id: int) -> list[SeriesRef]:
        """The series the spec's planes cut from: those holding the study's labelled points of
        the conditions in use, plus, for the axial fallback, the first Axial T2 and the canal's."""
        planes = set(self.spec.planes)
        wanted = set()
        for r in self.study_coords(study_id).itertuples(index=False):
            plane = PLANE_OF_SERIES[PLANE_OF_CONDITION[r.condition]]
            if plane in planes or ("axial" in planes and plane == "sag_t2"):
                wanted.add(int(r.series_id))
        if "axial" in planes and self._axial_series(study_id) is not None:
            wanted.add(self._axial_series(study_id))
        return [SeriesRef(study_id, sid, self.layout.series_dir(study_id, sid, self.split)) for sid in sorted(wanted)]

    def all_series(self, study_id: int) -> list[SeriesRef]:
        """Every described series of a study (what a cold preprocessing of the folder decodes)."""
        return [SeriesRef(study_id, sid, self.layout.series_dir(study_id, sid, self.split))
                for ids in self.layout.series_of(study_id, self.split).values() for sid in ids]

    # ---------------------------------------------------------------- preparation
    def prepare(self, study_ids, jobs: int = 1, progress: bool | None = None, every_series: bool = False) -> BuildReport:
        """Decode what is missing (in `jobs` processes) and plan every study's crops. By default
        only the series this spec cuts from are decoded; `every_series` decodes all of them
        (a cold preprocessing of the folder, as `data check` does)."""
        t0 = time.perf_counter()
        ids = [int(s) for s in study_ids]
        series_of = self.all_series if every_series else self.needed_series
        refs = list({ref: None for sid in ids for ref in series_of(sid)})
        prep = self.store.prepare(refs, jobs=jobs, progress=progress)
        report = BuildReport(studies=len(ids), series=prep.series, decoded=prep.decoded, reused=prep.reused,
                             jobs=prep.jobs)
        for sid in ids:
            plan = self.plan(sid)
            report.crops_planned += sum(p is not None for ps in plan.blocks.values() for p in ps)
            report.flags += [dict(f, study_id=sid) for f in plan.flags]
        report.seconds = time.perf_counter() - t0
        return report

    def plan(self, study_id: int) -> StudyPlan:
        """The study's crop plan (`plan_study`), made on first use (opening, and decoding if need be, the
        series it locates points in) and then kept in `plans`."""
        if study_id not in self.plans:
            self.plans[study_id] = plan_study(study_id, self.study_coords(study_id), self._loader(study_id),
                                              self.spec.planes, self._axial_series(study_id))
        return self.plans[study_id]

    def _loader(self, study_id: int):
        def load(series_id: int) -> Volume:
            key = (study_id, int(series_id))
            if key not in self._open:
                if len(self._open) >= _OPEN_MAX:
                    self._open.pop(next(iter(self._open)))
                folder = self.layout.series_dir(study_id, series_id, self.split)
                self._open[key] = self.store.open(SeriesRef(study_id, int(series_id), Path(folder)))
            return self._open[key]

        return load

    # ---------------------------------------------------------------- samples
    def sample(self, study_id: int, level: int, jitter=None) -> tuple[np.ndarray, np.ndarray]:
        """(images (slices, size, size) uint8, present per block) of one (study, level)."""
        return cut_level(self.plan(study_id), level, self.spec, self._loader(study_id), jitter)

    def study_crops(self, study_id: int) -> StudyCrops:
        """All five levels of a study at once."""
        levels = [self.sample(study_id, lv) for lv in range(len(LEVELS))]
        return StudyCrops(np.stack([im for im, _ in levels]), np.stack([p for _, p in levels]),
                          self.plan(study_id).flags)


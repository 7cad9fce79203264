"""Point sources without a model: the mean-position guess (`LevelPrior`) and points read from a
file (`PointTable`). Each has ``coordinates(study_id, series, load_volume) -> rows`` (the
train_label_coordinates form, submission spelling), as `locate.Localizer` has, so crops are cut
around whichever source `infer.predict_studies` is given.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.cache import default_cache_dir
from ..data.dicom import DicomWarning
from ..data.layout import CONDITIONS, LEVELS, PLANE_OF_CONDITION, Layout, LayoutError
from ..data.volumes import SeriesRef, VolumeStore


@dataclass
class LevelPrior:
    """Mean relative point positions per (condition, level): slice, x and y fractions."""

    table: dict[tuple[str, str], tuple[float, float, float]]

    @classmethod
    def fit(cls, layout: Layout, cache_root: Path | None = None, max_studies: int = 200,
            study_ids=None) -> "LevelPrior":
        """From the labelled points of `study_ids` (default: every training study), at most
        `max_studies` of them. Raises LayoutError when none of them can be read."""
        volumes = VolumeStore(Path(cache_root or default_cache_dir()))
        coords = layout.coordinates
        ids = sorted(int(s) for s in (layout.study_ids if study_ids is None else study_ids))
        coords = coords[coords["study_id"].isin(ids[:max_studies])]
        rows: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
        for (study_id, series_id), group in coords.groupby(["study_id", "series_id"]):
            try:
                vol = volumes.open(SeriesRef(study_id, series_id, layout.series_dir(study_id, series_id)))
            except Exception as e:  # an unreadable training series teaches nothing; others do
                warnings.warn(f"level prior: study {study_id} series {series_id} skipped ({e})", DicomWarning)
                continue
            n = len(vol)
            for r in group.itertuples(index=False):
                idx = vol.index_of_instance(int(r.instance_number))
                if idx is None:
                    continue
                h, w = vol.images[idx].shape
                rows.setdefault((r.condition, r.level), []).append(
                    (idx / max(n - 1, 1), float(r.x) / w, float(r.y) / h))
        if not rows:
            raise LayoutError(f"{layout.root}: no usable labelled coordinates to learn level positions from")
        return cls({k: tuple(np.mean(v, axis=0)) for k, v in rows.items()})

    def coordinates(self, study_id: int, series: dict[str, list[int]], load_volume,
                    problems: dict[str, str] | None = None) -> pd.DataFrame:
        """Synthetic train_label_coordinates rows for one study (sagittal conditions only: the
        axial block takes the canal point through patient space). A series kind the study lacks,
        or whose series cannot be read, gives no rows; `problems`, when given, receives why, by
        series description."""
        out = []
        problems = {} if problems is None else problems
        for cond in CONDITIONS:
            desc = PLANE_OF_CONDITION[cond]
            if desc == "Axial T2":
                continue
            if not series.get(desc):
                problems[desc] = f"no {desc} series in the series descriptions"
                continue
            series_id = series[desc][0]
            try:
                vol = load_volume(series_id)
            except Exception as e:
                if desc not in problems:
                    warnings.warn(f"study {study_id} series {series_id}: {e}", DicomWarning)
                problems[desc] = f"{desc} series {series_id} unreadable or missing on disk ({str(e)[:160]})"
                continue
            for level in LEVELS:
                if (cond, level) not in self.table:
                    continue
                fz, fx, fy = self.table[(cond, level)]
                idx = int(round(fz * (len(vol) - 1)))
                h, w = vol.images[idx].shape
                out.append(dict(study_id=study_id, series_id=series_id,
                                instance_number=int(vol.instance_numbers[idx]), condition=cond, level=level,
                                x=fx * w, y=fy * h))
        return pd.DataFrame(out, columns=["study_id", "series_id", "instance_number", "condition", "level", "x", "y"])


def watched(series: dict[str, list[int]], load_volume, problems: dict[str, str]):
    """`load_volume` that records in `problems` (by series description) why a series could not be
    read, with the sagittal series kinds the study lacks recorded up front: what a point source
    that reads series itself (`PointTable`, `locate.Localizer`) reports to `infer.predict_studies`."""
    desc_of = {sid: desc for desc, ids in series.items() for sid in ids}
    for desc in ("Sagittal T2/STIR", "Sagittal T1"):
        if not series.get(desc):
            problems[desc] = f"no {desc} series in the series descriptions"

    def load(series_id):
        try:
            return load_volume(series_id)
        except Exception as e:
            desc = desc_of.get(series_id, "series")
            problems[desc] = f"{desc} series {series_id} unreadable or missing on disk ({str(e)[:160]})"
            raise
    return load


@dataclass
class PointTable:
    """Points read from a ``train_label_coordinates.csv``-form file (e.g. `optuna-run localize`'s
    output): the same interface as `LevelPrior`, for a localiser's points computed once."""

    rows: pd.DataFrame  # the layout reader's form: submission spelling

    @classmethod
    def from_csv(cls, path: str | Path) -> "PointTable":
        """Raises LayoutError (naming the file, column and row) for a file not in that form."""
        from ..data.layout import read_coordinates

        return cls(read_coordinates(Path(path)))

    def coordinates(self, study_id: int, series: dict[str, list[int]], load_volume,
                    problems: dict[str, str] | None = None) -> pd.DataFrame:
        """The file's rows of one study (`LevelPrior.coordinates`' interface; `problems` receives
        the sagittal series kinds the study lacks)."""
        watched(series, load_volume, {} if problems is None else problems)
        return self.rows[self.rows["study_id"] == int(study_id)].reset_index(drop=True)

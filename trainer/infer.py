"""Predictions on studies without labelled coordinates (Kaggle's test studies).

Test studies come with images only. Each model still needs its own crops, so the points are
placed from the series geometry with what the training data teaches (`LevelPrior`): for every
(condition, level), the mean position of its labelled points as a fraction of the stack (slice
index / (slices - 1), along the sorted normal) and of the image (x / columns, y / rows). The
canal point sits on the centre slices of Sagittal T2, each foramen on its side of Sagittal T1; the
axial block uses the documented fallback of the crop builder (the canal point carried through
patient space to the nearest Axial T2 slice). Then the crops are built by the model's own
`CropSpec`, exactly as in training.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .data.cache import default_cache_dir
from .data.crops import CropSpec, build_study_crops
from .data.dataset import normalize_stack
from .data.dicom import DicomWarning
from .data.layout import CONDITIONS, LEVELS, PLANE_OF_CONDITION, TARGET_COLUMNS, Layout, row_id
from .data.layout import LayoutError
from .data.volumes import SeriesRef, VolumeStore
from .fit import load_checkpoint


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

    def coordinates(self, study_id: int, series: dict[str, list[int]], load_volume) -> pd.DataFrame:
        """Synthetic train_label_coordinates rows for one study (sagittal conditions only: the
        axial block takes the canal point through patient space)."""
        out = []
        for cond in CONDITIONS:
            desc = PLANE_OF_CONDITION[cond]
            if desc == "Axial T2" or not series.get(desc):
                continue
            series_id = series[desc][0]
            try:
                vol = load_volume(series_id)
            except Exception as e:
                warnings.warn(f"study {study_id} series {series_id}: {e}", DicomWarning)
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


@dataclass
class PointTable:
    """Points read from a ``train_label_coordinates.csv``-form file (e.g. `optuna-run localize`'s
    output): the same interface as `LevelPrior`, for a localiser's points computed once."""

    rows: pd.DataFrame  # the layout reader's form: submission spelling

    @classmethod
    def from_csv(cls, path: str | Path) -> "PointTable":
        """Raises LayoutError (naming the file, column and row) for a file not in that form."""
        from .data.layout import read_coordinates

        return cls(read_coordinates(Path(path)))

    def coordinates(self, study_id: int, series: dict[str, list[int]], load_volume) -> pd.DataFrame:
        return self.rows[self.rows["study_id"] == int(study_id)].reset_index(drop=True)


@torch.no_grad()
def predict_studies(checkpoints: list[str | Path], data_dir: str | Path, study_ids=None, split: str = "test",
                    prior: LevelPrior | None = None, cache_root: Path | None = None,
                    device: str = "cpu", batch_size: int = 16) -> pd.DataFrame:
    """Kaggle-form predictions (row_id + three probabilities) of one model trained on several
    folds: each checkpoint predicts every study's five levels, probabilities are averaged over
    checkpoints. Covers the conditions the model was trained on. `prior` is the point source the
    crops are cut around: anything with `LevelPrior.coordinates`' signature (a `PointTable`, a
    `points.locate.Localizer`); default: the mean-position guess fitted on the training points."""
    layout = Layout(Path(data_dir))
    table = layout.test_series if split == "test" else layout.train_series
    study_ids = sorted(table["study_id"].unique().tolist()) if study_ids is None else list(study_ids)
    prior = prior or LevelPrior.fit(layout, cache_root)
    volumes = VolumeStore(Path(cache_root or default_cache_dir()))
    summed: dict[str, np.ndarray] = {}
    for path in checkpoints:
        model, cfg, ckpt = load_checkpoint(path, device)
        spec = CropSpec.from_config(cfg.data)
        conditions = ckpt["conditions"]
        xs, keys = [], []
        for sid in study_ids:
            series = layout.series_of(sid, split)

            def load_volume(series_id, sid=sid):
                return volumes.open(SeriesRef(sid, series_id, layout.series_dir(sid, series_id, split)))

            coords = prior.coordinates(sid, series, load_volume)
            axial = series["Axial T2"][0] if series["Axial T2"] else None
            crops = build_study_crops(sid, coords, load_volume, spec, axial)
            levels = torch.from_numpy(crops.images.astype(np.float32))  # (levels, slices, H, W)
            xs.append(torch.stack([normalize_stack(x, cfg.data.normalize) for x in levels]))
            keys += [(sid, lv) for lv in LEVELS]
        images = torch.cat(xs) if xs else torch.zeros(0)
        probs = []
        for i in range(0, len(images), batch_size):
            probs.append(torch.softmax(model(images[i:i + batch_size].to(device)).float(), -1).cpu().numpy())
        probs = np.concatenate(probs) if probs else np.zeros((0, len(conditions), 3))
        for (sid, lv), p in zip(keys, probs):
            for c, cond in enumerate(conditions):
                rid = row_id(sid, cond, lv)
                summed[rid] = summed.get(rid, 0) + p[c]
    n = len(checkpoints)
    return pd.DataFrame([(rid, *(v / n)) for rid, v in summed.items()], columns=["row_id", *TARGET_COLUMNS])

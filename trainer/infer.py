"""Predictions on studies without labelled coordinates (Kaggle's test studies).

Test studies come with images only. Each model still needs its own crops, so the points are
placed by a point source: a trained localiser (`points.locate.Localizer`), points read from a
file (`points.prior.PointTable`, e.g. `optuna-run localize`'s output), or by default the mean
position the training data teaches (`points.prior.LevelPrior`): for every
(condition, level), the mean position of its labelled points as a fraction of the stack (slice
index / (slices - 1), along the sorted normal) and of the image (x / columns, y / rows). The
canal point sits on the centre slices of Sagittal T2, each foramen on its side of Sagittal T1; the
axial block uses the documented fallback of the crop builder (the canal point carried through
patient space to the nearest Axial T2 slice). Then the crops are built by the model's own
`CropSpec`, exactly as in training.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .data.cache import default_cache_dir
from .data.crops import CropSpec, build_study_crops
from .data.dataset import normalize_stack
from .data.layout import LEVELS, TARGET_COLUMNS, Layout, row_id
from .data.volumes import SeriesRef, VolumeStore
from .fit import load_checkpoint
from .points.prior import LevelPrior, PointTable  # noqa: F401  (point sources, importable from here as before)


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

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

A level whose crop for a condition cannot be built (its series absent from the descriptions CSV
or from disk, unreadable, or no slice near the point) is never given to the model as blank pixels:
that condition gets the training label frequencies the checkpoint carries (older checkpoints: those
of the data folder's train.csv), and the row's ``fallback`` column says why.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .data.cache import default_cache_dir
from .data.crops import SERIES_OF_BLOCK, CropSpec, build_study_crops, lacking_conditions
from .data.dataset import normalize_stack
from .data.dicom import DicomWarning
from .data.layout import LEVELS, TARGET_COLUMNS, Layout, row_id
from .data.volumes import SeriesRef, VolumeStore
from .fit import load_checkpoint
from .metric import class_prior
from .points.prior import LevelPrior, PointTable  # noqa: F401  (point sources, importable from here as before)


@torch.no_grad()
def predict_studies(checkpoints: list[str | Path], data_dir: str | Path, study_ids=None, split: str = "test",
                    prior: LevelPrior | None = None, cache_root: Path | None = None,
                    device: str = "cpu", batch_size: int = 16) -> pd.DataFrame:
    """Kaggle-form predictions of one model trained on several folds: ``row_id``, the three
    probabilities and ``fallback`` (empty where the model answered; else why the row holds the
    training label frequencies instead: its crop could not be built). Each checkpoint predicts
    every study's five levels, probabilities are averaged over checkpoints. Covers the
    conditions the model was trained on. `prior` is the point source the crops are cut around:
    anything with `LevelPrior.coordinates`' signature (a `PointTable`, a `points.locate.Localizer`);
    default: the mean-position guess fitted on the training points. Raises LayoutError when the
    data folder cannot be read."""
    layout = Layout(Path(data_dir))
    table = layout.test_series if split == "test" else layout.train_series
    study_ids = sorted(table["study_id"].unique().tolist()) if study_ids is None else list(study_ids)
    prior = prior or LevelPrior.fit(layout, cache_root)
    volumes = VolumeStore(Path(cache_root or default_cache_dir()))
    summed: dict[str, np.ndarray] = {}
    reasons: dict[str, str] = {}
    for path in checkpoints:
        model, cfg, ckpt = load_checkpoint(path, device)
        spec = CropSpec.from_config(cfg.data)
        blocks = [b for b, _ in spec.blocks()]
        conditions = ckpt["conditions"]
        frequencies = _label_prior(ckpt, layout, conditions)  # (C, 3)
        xs, keys, lacking = [], [], []
        for sid in study_ids:
            series = layout.series_of(sid, split)

            def load_volume(series_id, sid=sid):
                return volumes.open(SeriesRef(sid, series_id, layout.series_dir(sid, series_id, split)))

            problems: dict[str, str] = {}
            coords = prior.coordinates(sid, series, load_volume, problems)
            axial = series["Axial T2"][0] if series["Axial T2"] else None
            if axial is None:
                problems["Axial T2"] = "no Axial T2 series in the series descriptions"
            with warnings.catch_warnings():  # the reasons are reported per row (`fallback`) instead
                warnings.simplefilter("ignore", DicomWarning)
                crops = build_study_crops(sid, coords, load_volume, spec, axial)
            lack = lacking_conditions(blocks, crops.present, conditions)  # (levels, C)
            for lv, level in enumerate(LEVELS):
                for c, cond in enumerate(conditions):
                    if lack[lv, c]:
                        reasons[row_id(sid, cond, level)] = _why(crops.flags, problems, level, cond)
                if lack[lv].all():  # nothing to show the model: no forward pass on blank pixels
                    continue
                x = torch.from_numpy(crops.images[lv].astype(np.float32))
                xs.append(normalize_stack(x, cfg.data.normalize))
                keys.append((sid, lv))
            lacking.append(lack)
        probs = []
        images = torch.stack(xs) if xs else torch.zeros(0)
        for i in range(0, len(images), batch_size):
            probs.append(torch.softmax(model(images[i:i + batch_size].to(device)).float(), -1).cpu().numpy())
        probs = np.concatenate(probs) if probs else np.zeros((0, len(conditions), 3))
        by_key = dict(zip(keys, probs))
        for sid, lack in zip(study_ids, lacking):
            for lv, level in enumerate(LEVELS):
                p = by_key.get((sid, lv))
                for c, cond in enumerate(conditions):
                    rid = row_id(sid, cond, level)
                    value = frequencies[c] if lack[lv, c] or p is None else p[c]
                    summed[rid] = summed.get(rid, 0) + value
    n = len(checkpoints)
    return pd.DataFrame([(rid, *(v / n), reasons.get(rid, "")) for rid, v in summed.items()],
                        columns=["row_id", *TARGET_COLUMNS, "fallback"])


def _label_prior(ckpt: dict, layout: Layout, conditions) -> np.ndarray:
    """(C, 3) grade frequencies of the model's training labels: the checkpoint's own, else (a
    checkpoint written before it carried them) those of the data folder's train.csv."""
    if ckpt.get("label_prior") is not None:
        return np.asarray(ckpt["label_prior"], dtype=np.float64)
    freq = class_prior(layout.labels, conditions)
    return np.stack([freq[c] for c in conditions])


def _why(flags: list[dict], problems: dict[str, str], level: str, condition: str) -> str:
    """Why a condition's crop at a level could not be built, in words: the series problems of its
    block first (a series kind absent or unreadable), else the crop builder's flag."""
    from .data.crops import BLOCK_OF_CONDITION

    block = BLOCK_OF_CONDITION[condition]
    said = [problems[d] for d in SERIES_OF_BLOCK[block] if d in problems]
    if said:
        return "; ".join(dict.fromkeys(said))
    for f in flags:
        if f["level"] == level and f["block"] == block:
            return f"{f['reason'].replace('_', ' ')} ({f['detail']})"
    return "no crop"

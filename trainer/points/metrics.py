"""How far predicted points are from labelled ones: in patient space (mm), in slices, in levels,
and, for the mean-position guess, in disc spacings (pixels, as DOMAIN.md measures the real set).

Points are rows of the ``train_label_coordinates.csv`` form: ``study_id, series_id,
instance_number, condition, level, x, y`` (condition and level in submission spelling, x and y
pixels of that instance). `with_patient_positions` adds where each row is in patient space
(``patient_x/y/z``, mm, DICOM LPS) and its slice index in the sorted series (``slice``), from
the series geometry; `score_points` compares two such tables without touching a volume again,
so out-of-fold points of several folds are scored together, like the classifier's OOF rows.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from ..data.dicom import DicomWarning
from ..data.geometry import pixel_to_patient
from ..data.layout import CONDITION_NAMES, LEVEL_NAMES, LEVELS, PLANE_OF_CONDITION
from ..metric import ScoreResult

COORD_COLUMNS = ("study_id", "series_id", "instance_number", "condition", "level", "x", "y")
PATIENT_COLUMNS = ("patient_x", "patient_y", "patient_z", "slice")
PLANE_NAMES = {"Sagittal T2/STIR": "sag_t2", "Sagittal T1": "sag_t1", "Axial T2": "axial"}
SCORES = ("p90_mm", "median_mm")  # what a localiser trial may minimise
MISSED_MM = 100.0  # the error of a labelled point without a prediction: beyond any level (discs ~35 mm apart)


def with_patient_positions(rows: pd.DataFrame, load_volume) -> pd.DataFrame:
    """`rows` plus ``patient_x, patient_y, patient_z`` (mm) and ``slice`` (index along the sorted
    series). `load_volume(study_id, series_id)` returns the `Volume` or raises; a row whose series
    cannot be read or whose instance is not in it gets NaN (with a warning naming it)."""
    out = rows.copy()
    pos = np.full((len(rows), 4), np.nan)
    volumes: dict[tuple[int, int], object] = {}
    for i, r in enumerate(rows.itertuples(index=False)):
        key = (int(r.study_id), int(r.series_id))
        if key not in volumes:
            try:
                volumes[key] = load_volume(*key)
            except Exception as e:
                warnings.warn(f"study {key[0]} series {key[1]}: {e}", DicomWarning)
                volumes[key] = None
        vol = volumes[key]
        idx = vol.index_of_instance(int(r.instance_number)) if vol is not None else None
        if idx is None:
            continue
        pos[i, :3] = pixel_to_patient(vol, idx, float(r.x), float(r.y))
        pos[i, 3] = idx
    for k, c in enumerate(PATIENT_COLUMNS):
        out[c] = pos[:, k]
    return out


def point_errors(solution: pd.DataFrame, predicted: pd.DataFrame) -> pd.DataFrame:
    """One row per labelled point with a prediction: ``error_mm`` (patient-space distance),
    ``slice_error`` (slices, when both sit on the same series; else NaN), ``right_level`` (the
    prediction is nearer to this level's labelled point than to any other level's of the same
    condition), ``plane`` (sag_t2, sag_t1, axial). Both tables carry `PATIENT_COLUMNS`."""
    keys = ["study_id", "condition", "level"]
    m = solution.merge(predicted, on=keys, suffixes=("", "_pred"))
    truth = m[["patient_x", "patient_y", "patient_z"]].to_numpy(float)
    pred = m[["patient_x_pred", "patient_y_pred", "patient_z_pred"]].to_numpy(float)
    m["error_mm"] = np.linalg.norm(truth - pred, axis=1)
    same = m["series_id"].to_numpy() == m["series_id_pred"].to_numpy()
    m["slice_error"] = np.where(same, np.abs(m["slice"] - m["slice_pred"]), np.nan)
    # the right level: no other labelled level of the study's condition is nearer to the prediction
    lab = {(s, c): g for (s, c), g in solution.groupby(["study_id", "condition"])}
    right = np.zeros(len(m), dtype=bool)
    for i, r in enumerate(m.itertuples(index=False)):
        if not np.isfinite(pred[i]).all():
            continue
        g = lab[(r.study_id, r.condition)]
        d = np.linalg.norm(g[["patient_x", "patient_y", "patient_z"]].to_numpy(float) - pred[i], axis=1)
        if np.isfinite(d).any():
            right[i] = g["level"].to_numpy()[np.nanargmin(d)] == r.level
    m["right_level"] = right
    m["plane"] = m["condition"].map(lambda c: PLANE_NAMES[PLANE_OF_CONDITION[c]])
    return m[keys + ["plane", "error_mm", "slice_error", "right_level"]]


def summarize_errors(errors: pd.DataFrame, missing: int = 0) -> dict[str, float]:
    """Median and p90 error (mm), level accuracy and mean slice error, overall and per plane
    (``sagittal`` pools sag_t2 and sag_t1). `missing` labelled points without a prediction, and
    predictions that could not be placed in patient space, count as `MISSED_MM` off, so a model
    that places nothing scores 100 mm, not infinity."""
    out: dict[str, float] = {}
    parts = {"all": errors, "sagittal": errors[errors["plane"] != "axial"], "axial": errors[errors["plane"] == "axial"]}
    parts.update({p: errors[errors["plane"] == p] for p in ("sag_t2", "sag_t1")})
    for name, e in parts.items():
        if not len(e):
            continue
        err = e["error_mm"].to_numpy(float)
        if name == "all" and missing:
            err = np.concatenate([err, np.full(missing, MISSED_MM)])
        err = np.where(np.isnan(err), MISSED_MM, err)
        prefix = "" if name == "all" else f"{name}_"
        out[f"{prefix}median_mm"] = float(np.median(err))
        out[f"{prefix}p90_mm"] = float(np.quantile(err, 0.9, method="higher"))
        out[f"{prefix}level_accuracy"] = float(e["right_level"].mean())
        if e["slice_error"].notna().any():
            out[f"{prefix}slice_error"] = float(e["slice_error"].mean())
    return out


def score_points(solution: pd.DataFrame, predicted: pd.DataFrame, score: str = "p90_mm") -> ScoreResult:
    """The localiser's validation score (lower is better): `score` (``p90_mm`` or ``median_mm``,
    over every labelled point) and every summary of `summarize_errors` as groups. A labelled point
    without a prediction counts as `MISSED_MM` off. Raises ValueError for an unknown `score`."""
    if score not in SCORES:
        raise ValueError(f"localiser score {score!r}: expected one of {', '.join(SCORES)}")
    errors = point_errors(solution, predicted)
    summary = summarize_errors(errors, missing=len(solution) - len(errors))
    return ScoreResult(score=summary[score], groups=summary, covered=tuple(sorted(set(errors["plane"]))))


def disc_spacing_px(coords: pd.DataFrame) -> pd.Series:
    """Per study, the median pixel distance between consecutive labelled spinal canal points
    (L1/L2 to L5/S1: up to four gaps), as DOMAIN.md measures the real set."""
    canal = coords[coords["condition"] == "spinal_canal_stenosis"]
    order = {lv: i for i, lv in enumerate(LEVELS)}

    def spacing(g):
        g = g.assign(k=g["level"].map(order)).sort_values("k")
        steps = np.hypot(np.diff(g["x"]), np.diff(g["y"])) / np.diff(g["k"])
        return float(np.median(steps)) if len(steps) else np.nan

    return canal.groupby("study_id").apply(spacing, include_groups=False)


def pixel_miss(labelled: pd.DataFrame, guessed: pd.DataFrame) -> pd.DataFrame:
    """Sagittal points only: per labelled point, the guess's distance in pixels (in the
    labelled instance's image, slices ignored, as the real set's numbers were measured) and in
    the study's disc spacings (``miss``)."""
    keys = ["study_id", "condition", "level"]
    sag = labelled[labelled["condition"].map(PLANE_OF_CONDITION) != "Axial T2"]
    m = sag.merge(guessed[keys + ["x", "y"]], on=keys, suffixes=("", "_guess"))
    m["miss_px"] = np.hypot(m["x"] - m["x_guess"], m["y"] - m["y_guess"])
    m["miss"] = m["miss_px"] / m["study_id"].map(disc_spacing_px(labelled))
    return m


def competition_form(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows in `train_label_coordinates.csv`'s exact columns and spelling ("Spinal Canal Stenosis", "L1/L2")."""
    out = rows[list(COORD_COLUMNS)].copy()
    out["condition"] = out["condition"].map(CONDITION_NAMES)
    out["level"] = out["level"].map(LEVEL_NAMES)
    return out.reset_index(drop=True)

"""Info extractors for the project's own figures: the best trial's run (MLflow) as plain data,
no plotly. The figures Optuna draws itself (history, importances, parallel coordinates, slices,
intermediate values, timeline) take the study directly (`figures.optuna_figure`).

Each function returns lists and dicts of numbers and strings, so the figures can be tested on
data and the data on a run, apart.
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna.trial import TrialState

from sweep.artifacts import OOF, SOLUTION, parse_fold_file
from sweep.tracking import Tracker
from sweep.trials import best_trial, own_trials
from trainer.metric import TARGET_COLUMNS


# ------------------------------------------------------------------ the best trial's run, from MLflow


def best_run_id(study: optuna.Study) -> str | None:
    """The MLflow run id of the study's best trial run here (`best_trial`), or None when none has
    completed or it has no ``mlflow_run_id`` user attribute."""
    best = best_trial(study)
    return best.user_attrs.get("mlflow_run_id") if best else None


def learning_curves(tracker: Tracker, run_id: str) -> dict[str, Any]:
    """A run's per-epoch history (``history.csv``, one per fold): epoch, train/val loss, score."""
    out: dict[str, Any] = {"folds": []}
    files = sorted((n, parsed[1]) for n in tracker.list_artifacts(run_id)
                   if (parsed := parse_fold_file(n)) and parsed[0] == "history")
    for name, number in files:
        path = download(tracker, run_id, name)
        h = pd.read_csv(path)
        fold = "" if number is None else str(number)
        out["folds"].append({"fold": fold, **{k: h[k].tolist() for k in ("epoch", "train_loss", "val_loss", "score")
                                               if k in h}})
    return out


def download(tracker: Tracker, run_id: str, name: str) -> Path | None:
    """One artifact of a run into a temporary folder, or None when it is not there."""
    try:
        if name not in tracker.list_artifacts(run_id):
            return None
        return tracker.download(run_id, name, tempfile.mkdtemp(prefix="spinesweep-dash-"))
    except Exception:
        return None


def confusion(tracker: Tracker, run_id: str) -> dict[str, list[list[int]]]:
    """Per condition: counts, rows = truth, columns = prediction (N/M, moderate, severe)."""
    files = [n for n in tracker.list_artifacts(run_id) if (parsed := parse_fold_file(n)) and parsed[0] == "confusion"]
    total: dict[str, np.ndarray] = {}
    for name in files:
        path = download(tracker, run_id, name)
        for cond, m in json.loads(path.read_text()).items():
            total[cond] = total.get(cond, 0) + np.asarray(m)
    return {k: v.astype(int).tolist() for k, v in total.items()}


def calibration(oof: pd.DataFrame, solution: pd.DataFrame, bins: int = 10) -> dict[str, list]:
    """Reliability of predicted probabilities: for every (row, class) pair, bin the predicted
    probability and compare the bin's mean prediction with how often the class was the truth."""
    if "row_id" not in oof.columns or "row_id" not in solution.columns:  # a localiser's OOF: points, no probabilities
        return {"predicted": [], "observed": [], "count": []}
    merged = oof.merge(solution, on="row_id", suffixes=("_p", "_t"))
    if merged.empty:
        return {"predicted": [], "observed": [], "count": []}
    from sklearn.calibration import calibration_curve

    p = np.concatenate([merged[f"{c}_p"].to_numpy() for c in TARGET_COLUMNS])
    y = np.concatenate([merged[f"{c}_t"].to_numpy() for c in TARGET_COLUMNS])
    observed, predicted = calibration_curve(y, p, n_bins=bins, strategy="uniform")  # non-empty bins only
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, bins + 1)[1:-1], p), minlength=bins)  # its binning
    return {"predicted": predicted.tolist(), "observed": observed.tolist(), "count": counts[counts > 0].tolist()}


def run_frames(tracker: Tracker, run_id: str) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """A run's OOF predictions and the matching solution (labels), when logged."""
    oof_path, sol_path = download(tracker, run_id, OOF), download(tracker, run_id, SOLUTION)
    oof = pd.read_csv(oof_path) if oof_path else None
    sol = pd.read_csv(sol_path) if sol_path else None
    return oof, sol


def against_legacy(study: optuna.Study, tracker: Tracker, experiment: str = "legacy") -> dict[str, Any]:
    """The study's completed values next to the manual log's fold-0 CVs (both when both exist)."""
    exp = tracker.get_experiment(experiment)
    legacy: list[dict] = []
    if exp is not None:
        for r in tracker.search_runs([exp.experiment_id], "tags.source = 'legacy'", max_results=5000):
            v = r.data.metrics.get("cv_fold0")
            if v is not None and math.isfinite(v):
                legacy.append({"entry": r.data.tags.get("legacy.entry", ""), "value": v,
                               "date": r.data.tags.get("date", "")})
    legacy.sort(key=lambda d: (d["date"], d["entry"]))
    study_values = [{"number": t.number, "value": t.value} for t in own_trials(study, (TrialState.COMPLETE,))
                    if t.value is not None]
    return {"legacy": legacy, "study": study_values}


# ------------------------------------------------------------------ every trial, and the best ones' curves


def trial_rows(study: optuna.Study, tracker: Tracker | None = None) -> list[dict[str, Any]]:
    """One row per trial of the study (imported ones left out): number, state, the value Optuna
    holds (a pruned trial's too), its MLflow run, what promotion found (the trial's score over
    every fold, from `promoted_oof_score` on its run) and the points it was scored on
    (``val_points``: ``labelled`` or ``oof``, a localiser's; None without a run or for a localiser)."""
    runs: dict[str, Any] = {}
    if tracker is not None:
        exp = tracker.get_experiment(study.study_name)
        if exp is not None:
            runs = {r.info.run_id: r for r in tracker.search_runs([exp.experiment_id], "tags.trial != ''",
                                                                 max_results=5000)}
    rows = []
    for t in sorted(own_trials(study), key=lambda t: t.number):
        run_id = t.user_attrs.get("mlflow_run_id")
        run = runs.get(run_id)
        promoted = run.data.metrics.get("promoted_oof_score") if run is not None else None
        # the points its validation crops were cut around (data.val_points): labelled, or oof (a localiser's)
        points = (run.data.tags.get("val_points") or run.data.params.get("data.val_points")) if run is not None else None
        rows.append({"trial": t.number, "state": t.state.name, "value": t.value, "run_id": run_id,
                     "experiment_id": run.info.experiment_id if run is not None else None,
                     "promoted_score": promoted, "val_points": points, "error": t.user_attrs.get("error", "")})
    return rows


def condition_losses(study: optuna.Study, tracker: Tracker, k: int = 3) -> list[dict[str, Any]]:
    """The k best completed trials' per-condition-group validation losses by epoch (their first
    fold's ``history*.csv``): where a trial wins or loses, group by group."""
    done = [t for t in own_trials(study, (TrialState.COMPLETE,)) if t.value is not None]
    best = sorted(done, key=lambda t: t.value, reverse=study.direction == optuna.study.StudyDirection.MAXIMIZE)[:k]
    out = []
    for t in best:
        run_id = t.user_attrs.get("mlflow_run_id")
        if not run_id:
            continue
        names = sorted(n for n in tracker.list_artifacts(run_id) if n.startswith("history"))
        path = download(tracker, run_id, names[0]) if names else None
        if path is None:
            continue
        h = pd.read_csv(path)
        losses = {c[len("loss_"):]: h[c].tolist() for c in h.columns if c.startswith("loss_")}
        if losses:
            out.append({"trial": t.number, "value": t.value, "epoch": h["epoch"].tolist(), "losses": losses})
    return out

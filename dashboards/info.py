"""Info extractors: a study (Optuna) and its runs (MLflow) as plain data, no plotly.

Each function returns lists and dicts of numbers and strings, so the figures can be tested on
data and the data on a study, apart.
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

from trainer.metric import TARGET_COLUMNS


def _legacy(t) -> bool:
    return t.user_attrs.get("source") == "legacy"


def _trials(study: optuna.Study, legacy: bool = False) -> list:
    return [t for t in study.get_trials(deepcopy=False) if _legacy(t) == legacy]


def history(study: optuna.Study) -> dict[str, list]:
    """Every finished trial's value in trial order, with the best so far (legacy trials left out)."""
    minimize = study.direction == optuna.study.StudyDirection.MINIMIZE
    out: dict[str, list] = {"number": [], "value": [], "state": [], "best": []}
    best = None
    for t in _trials(study):
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            continue
        value = t.value if t.state == TrialState.COMPLETE else _last(t)
        if value is None:
            continue
        if t.state == TrialState.COMPLETE and (best is None or (value < best if minimize else value > best)):
            best = value
        out["number"].append(t.number)
        out["value"].append(value)
        out["state"].append(t.state.name)
        out["best"].append(best)
    return out


def _last(t) -> float | None:
    if not t.intermediate_values:
        return None
    return t.intermediate_values[max(t.intermediate_values)]


def importances(study: optuna.Study) -> dict[str, float]:
    """Importances (Optuna's default evaluator) over the completed sampled trials; empty when there
    are too few trials or nothing varies."""
    done = [t for t in _trials(study) if t.state == TrialState.COMPLETE]
    if len(done) < 2:
        return {}
    import warnings

    try:
        with warnings.catch_warnings():  # "some regimes have less than 2 trials": small studies are small
            warnings.simplefilter("ignore")
            return dict(_importances_of(study, done))
    except (RuntimeError, ValueError, ZeroDivisionError):
        return {}


def _importances_of(study: optuna.Study, trials: list) -> dict[str, float]:
    """Importances over the given trials only (a study warm-started from the manual log holds
    trials with other parameter sets, and failed or pruned trials say nothing of the value)."""
    sub = optuna.create_study(direction=study.direction)
    sub.add_trials(trials)
    return optuna.importance.get_param_importances(sub)


def param_table(study: optuna.Study) -> dict[str, Any]:
    """Completed trials: their parameters and values (for parallel coordinates and slices).
    Categorical values keep their labels; each column says whether it is numeric and log-scaled."""
    done = [t for t in _trials(study) if t.state == TrialState.COMPLETE]
    names = sorted({k for t in done for k in t.params})
    columns = {}
    for name in names:
        dists = [t.distributions[name] for t in done if name in t.distributions]
        d = dists[0] if dists else None
        categorical = isinstance(d, optuna.distributions.CategoricalDistribution)
        columns[name] = {
            "values": [t.params.get(name) for t in done],
            "categorical": categorical,
            "log": bool(getattr(d, "log", False)),
            "choices": [str(c) for c in d.choices] if categorical else None,
        }
    return {"number": [t.number for t in done], "value": [t.value for t in done], "params": columns}


def intermediate(study: optuna.Study) -> list[dict]:
    """Per trial: its reported steps and values, state and where it was pruned."""
    out = []
    for t in _trials(study):
        if not t.intermediate_values:
            continue
        steps = sorted(t.intermediate_values)
        out.append({"number": t.number, "state": t.state.name, "steps": steps,
                    "values": [t.intermediate_values[s] for s in steps],
                    "pruned_at": steps[-1] if t.state == TrialState.PRUNED else None})
    return out


def timeline(study: optuna.Study) -> list[dict]:
    """Per trial: start, end (ISO strings), state and the worker that ran it."""
    out = []
    for t in _trials(study):
        if t.datetime_start is None:
            continue
        end = t.datetime_complete or t.datetime_start
        out.append({"number": t.number, "state": t.state.name, "worker": str(t.user_attrs.get("worker", "?")),
                    "start": t.datetime_start.isoformat(), "end": end.isoformat(),
                    "seconds": (end - t.datetime_start).total_seconds()})
    return out


# ------------------------------------------------------------------ the best trial's run, from MLflow


def best_run_id(study: optuna.Study) -> str | None:
    done = [t for t in _trials(study) if t.state == TrialState.COMPLETE and t.value is not None]
    if not done:
        return None
    minimize = study.direction == optuna.study.StudyDirection.MINIMIZE
    best = min(done, key=lambda t: t.value if minimize else -t.value)
    return best.user_attrs.get("mlflow_run_id")


def learning_curves(client, run_id: str) -> dict[str, Any]:
    """A run's per-epoch history (``history.csv``, one per fold): epoch, train/val loss, score."""
    out: dict[str, Any] = {"folds": []}
    names = sorted(a.path for a in client.list_artifacts(run_id) if a.path.startswith("history"))
    for name in names:
        path = download(client, run_id, name)
        h = pd.read_csv(path)
        fold = name[len("history_fold"):-len(".csv")] if "_fold" in name else ""
        out["folds"].append({"fold": fold, **{k: h[k].tolist() for k in ("epoch", "train_loss", "val_loss", "score")
                                               if k in h}})
    return out


def download(client, run_id: str, name: str) -> Path | None:
    """One artifact of a run into a temporary folder, or None when it is not there."""
    try:
        names = {a.path for a in client.list_artifacts(run_id)}
        if name not in names:
            return None
        return Path(client.download_artifacts(run_id, name, tempfile.mkdtemp(prefix="spinesweep-dash-")))
    except Exception:
        return None


def confusion(client, run_id: str) -> dict[str, list[list[int]]]:
    """Per condition: counts, rows = truth, columns = prediction (N/M, moderate, severe)."""
    files = [a.path for a in client.list_artifacts(run_id) if a.path.startswith("confusion")]
    total: dict[str, np.ndarray] = {}
    for name in files:
        path = download(client, run_id, name)
        for cond, m in json.loads(path.read_text()).items():
            total[cond] = total.get(cond, 0) + np.asarray(m)
    return {k: v.astype(int).tolist() for k, v in total.items()}


def calibration(oof: pd.DataFrame, solution: pd.DataFrame, bins: int = 10) -> dict[str, list]:
    """Reliability of predicted probabilities: for every (row, class) pair, bin the predicted
    probability and compare the bin's mean prediction with how often the class was the truth."""
    merged = oof.merge(solution, on="row_id", suffixes=("_p", "_t"))
    if merged.empty:
        return {"predicted": [], "observed": [], "count": []}
    p = np.concatenate([merged[f"{c}_p"].to_numpy() for c in TARGET_COLUMNS])
    y = np.concatenate([merged[f"{c}_t"].to_numpy() for c in TARGET_COLUMNS])
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    out = {"predicted": [], "observed": [], "count": []}
    for b in range(bins):
        mask = idx == b
        if mask.any():
            out["predicted"].append(float(p[mask].mean()))
            out["observed"].append(float(y[mask].mean()))
            out["count"].append(int(mask.sum()))
    return out


def run_frames(client, run_id: str) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """A run's OOF predictions and the matching solution (labels), when logged."""
    oof_path, sol_path = download(client, run_id, "oof.csv"), download(client, run_id, "solution.csv")
    oof = pd.read_csv(oof_path) if oof_path else None
    sol = pd.read_csv(sol_path) if sol_path else None
    return oof, sol


def against_legacy(study: optuna.Study, client, experiment: str = "legacy") -> dict[str, Any]:
    """The study's completed values next to the manual log's fold-0 CVs (both when both exist)."""
    exp = client.get_experiment_by_name(experiment)
    legacy: list[dict] = []
    if exp is not None:
        for r in client.search_runs([exp.experiment_id], "tags.source = 'legacy'", max_results=5000):
            v = r.data.metrics.get("cv_fold0")
            if v is not None and math.isfinite(v):
                legacy.append({"entry": r.data.tags.get("legacy.entry", ""), "value": v,
                               "date": r.data.tags.get("date", "")})
    legacy.sort(key=lambda d: (d["date"], d["entry"]))
    study_values = [{"number": t.number, "value": t.value} for t in _trials(study)
                    if t.state == TrialState.COMPLETE and t.value is not None]
    return {"legacy": legacy, "study": study_values}

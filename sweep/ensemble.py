"""Ensembles: the promoted members of an ensemble (registered versions tagged
``ensemble=<name>``), their OOF predictions aligned by row_id; a row is the weighted mean of the
members that cover it, so a spinal-canal model and a foraminal model combine per condition.

Weights: equal, or optimised on OOF and kept only when a cross-fit over studies (weights fitted on
the other studies, scored on these: scikit-learn's GroupKFold) says they beat equal weights and the
best single member out of sample; never worse than the best member on the whole OOF. Logged as a
run of the MLflow experiment ``ensembles``.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from trainer.data.layout import parse_row_ids
from trainer.metric import TARGET_COLUMNS, score_groups

from . import artifacts as names
from .promote import MODEL_PREFIX, PromoteError
from .tracking import Tracker

ENSEMBLE_EXPERIMENT = "ensembles"


@dataclass
class Member:
    """A promoted model version in an ensemble. ``model``/``version``: the registered model and
    version; ``trial``: its ``trial`` tag (``?`` when absent); ``run_id``/``source``: the version's run
    and source URI; ``oof``: its out-of-fold predictions in Kaggle form (``row_id, normal_mild, moderate,
    severe``); ``solution``: the solution frame of the rows it was scored on (`trainer.metric`).
    ``oof`` and ``solution`` are None when read with ``with_frames=False``. ``val_points``: the points its
    validation crops, so its OOF rows and score, were cut around (``labelled``, or ``oof``: a localiser's
    out-of-fold points, as on the leaderboard)."""

    model: str
    version: str
    trial: str
    run_id: str
    source: str
    oof: pd.DataFrame
    solution: pd.DataFrame
    val_points: str = "labelled"  # the points its OOF rows were cropped around: labelled, or oof (a localiser's)

    @property
    def label(self) -> str:
        """``<model> v<version> (trial <trial>)``, for messages and tables."""
        return f"{self.model} v{self.version} (trial {self.trial})"


def members(tracking_uri: str, name: str = "default", with_frames: bool = True) -> list[Member]:
    """The registered versions tagged ``ensemble=name``, with their full OOF and labels (unless
    `with_frames` is False).

    Raises:
        PromoteError: the ensemble has no members yet (promote a trial first).
    """
    tracker = Tracker(tracking_uri)
    out = []
    for v in sorted(tracker.model_versions(MODEL_PREFIX), key=lambda v: (v.name, int(v.version))):
        if v.tags.get("ensemble") != name:
            continue
        oof = sol = None
        if with_frames:
            tmp = Path(tempfile.mkdtemp(prefix="spinesweep-member-"))
            if v.source.rstrip("/").endswith("/model"):  # a logged model: its frames are its artifacts
                from .model import member_frames

                oof, sol = member_frames(v.source, tracking_uri, tmp)
            else:  # promoted before models were logged: the run's promoted/ folder
                oof = pd.read_csv(tracker.download(v.run_id, f"{names.PROMOTED}/{names.OOF}", tmp))
                sol = pd.read_csv(tracker.download(v.run_id, f"{names.PROMOTED}/{names.SOLUTION}", tmp))
            shutil.rmtree(tmp, ignore_errors=True)
        out.append(Member(v.name, v.version, v.tags.get("trial", "?"), v.run_id, v.source, oof, sol,
                          _val_points(tracker, v)))
    if not out:
        raise PromoteError(f"ensemble {name!r} has no members: promote a trial first (optuna-run promote SPACE)")
    return out


def _val_points(tracker: Tracker, version) -> str:
    """The points a member was scored on: its version's ``val_points`` tag, else (promoted before
    the tag existed) its run's ``data.val_points`` param, else ``labelled`` (the only kind then)."""
    if version.tags.get("val_points"):
        return version.tags["val_points"]
    try:
        return tracker.get_run(version.run_id).data.params.get("data.val_points", "labelled")
    except Exception:
        return "labelled"


def combine(frames: list[pd.DataFrame], weights: np.ndarray) -> pd.DataFrame:
    """Row-wise weighted mean of the members' Kaggle-form frames, over the members that have each
    row (weights renormalised per row); rows sorted by `row_id`. A row no member with a positive
    weight has is left out (the caller decides what it gets).

    A mean of probability rows is a probability row, so nothing is renormalised afterwards: with
    one member weighted 1 and the others 0, every value is exactly that member's (``x*1 + 0 = x``,
    ``/1``), so an ensemble that keeps one member scores exactly that member's score."""
    parts = []
    for w, f in zip(weights, frames):
        if w <= 0:
            continue
        g = f[["row_id", *TARGET_COLUMNS]].copy()
        g[list(TARGET_COLUMNS)] = g[list(TARGET_COLUMNS)].to_numpy() * w
        g["_w"] = w
        parts.append(g)
    if not parts:
        return pd.DataFrame(columns=["row_id", *TARGET_COLUMNS])
    s = pd.concat(parts).groupby("row_id", sort=True).sum()
    out = s[list(TARGET_COLUMNS)].div(s["_w"], axis=0)
    return out.reset_index()


def joint_solution(ms: list[Member]) -> pd.DataFrame:
    """Every member's labelled rows once, sorted by row_id (the order every score here sums in,
    so a score over one member's rows is exactly that member's own)."""
    return pd.concat([m.solution for m in ms]).drop_duplicates("row_id").sort_values("row_id", ignore_index=True)


def _scored(sol: pd.DataFrame, pred: pd.DataFrame):
    """The metric over the rows both the solution and the combined prediction have; None when
    they share none (a member trained on other folds than those rows')."""
    pred = pred[pred["row_id"].isin(set(sol["row_id"]))]
    if pred.empty:
        return None
    return score_groups(sol[sol["row_id"].isin(set(pred["row_id"]))], pred)


def weighted_score(sol: pd.DataFrame, frames: list[pd.DataFrame], w: np.ndarray) -> float:
    """The metric of the members' `frames` combined with weights `w` (`combine`), over the rows
    of `sol` (`joint_solution`) that the weighted members cover (inf when they cover none)."""
    scored = _scored(sol, combine(frames, w))
    return math.inf if scored is None else scored.score


def _optimise(sol: pd.DataFrame, frames: list[pd.DataFrame]) -> np.ndarray:
    from scipy.optimize import minimize

    k = len(frames)

    def weights(theta):
        e = np.exp(theta - theta.max())
        return e / e.sum()

    res = minimize(lambda th: weighted_score(sol, frames, weights(th)), np.zeros(k), method="Nelder-Mead",
                   options=dict(maxiter=200 * k, xatol=1e-3, fatol=1e-5))
    return weights(res.x)


@dataclass
class EnsembleResult:
    """A built ensemble. ``method``: how the weights were chosen (``equal``, ``optimized``,
    ``best_member``, or ``best_member (guard)`` when the cross-fit's pick did worse than the best member
    on the whole OOF); ``members``: per member its label, run id, score and group losses; ``weights``:
    one per member, in that order; ``score``/``groups``: the host metric of the combined OOF over the
    rows the weighted members cover; ``held_out``: the cross-fit scores of ``equal``, ``optimized`` and
    ``best_member`` (empty when no cross-fit ran); ``run_id``: its run in the ``ensembles`` experiment."""

    name: str
    method: str
    members: list[dict]
    weights: list[float]
    score: float
    groups: dict[str, float]
    held_out: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None


def choose_weights(sol: pd.DataFrame, frames: list[pd.DataFrame], method: str = "optimize"
                   ) -> tuple[np.ndarray, str, dict[str, float]]:
    """(weights ``[k]``, the method chosen, held-out scores by candidate) for members' OOF `frames`
    over `sol` (`joint_solution`); see `ensemble`. Members may cover different rows (one promoted
    on its evaluated folds only): a candidate that covers none of a part's rows scores inf there."""
    k = len(frames)
    equal = np.full(k, 1.0 / k)
    held_out: dict[str, float] = {}
    weights, chosen = equal, "equal"
    studies = parse_row_ids(sol["row_id"])["study_id"].to_numpy()
    if method == "optimize" and k > 1 and len(set(studies)) > 1:  # a cross-fit needs two studies
        from sklearn.model_selection import GroupKFold

        n_parts = min(5, len(set(studies)))
        preds = {"equal": [], "optimized": [], "best_member": []}
        for fit_idx, test_idx in GroupKFold(n_parts).split(sol, groups=studies):  # whole studies held out
            fit_sol, test_sol = sol.iloc[fit_idx], sol.iloc[test_idx]
            w_opt = _optimise(fit_sol, frames)
            single = np.eye(k)[int(np.argmin([weighted_score(fit_sol, frames, np.eye(k)[i]) for i in range(k)]))]
            for key, w in (("equal", equal), ("optimized", w_opt), ("best_member", single)):
                p = combine(frames, w)
                preds[key].append(p[p["row_id"].isin(set(test_sol["row_id"]))])
        for key, parts in preds.items():
            scored = _scored(sol, pd.concat(parts, ignore_index=True))
            held_out[key] = math.inf if scored is None else scored.score
        chosen = min(held_out, key=held_out.get)
        best_single = np.eye(k)[int(np.argmin([weighted_score(sol, frames, np.eye(k)[i]) for i in range(k)]))]
        if chosen == "optimized":
            weights = _optimise(sol, frames)
        elif chosen == "best_member":
            weights = best_single
        # the members' OOF predictions are out of fold, so their OOF scores are honest: a
        # combination that the cross-fit preferred but that does worse than the best member on the
        # whole OOF is noise of a small cross-fit, and the best member is kept instead
        if chosen != "best_member" and weighted_score(sol, frames, weights) > weighted_score(sol, frames, best_single):
            chosen, weights = "best_member (guard)", best_single
    return weights, chosen, held_out


def ensemble(tracking_uri: str, name: str = "default", method: str = "optimize") -> EnsembleResult:
    """Build and log the ensemble `name` from its promoted members. ``method="optimize"`` fits weights
    (softmax-parametrised, SciPy Nelder-Mead on the host metric) and keeps the candidate (equal,
    optimised, best single member) that scores best on whole studies held out (scikit-learn's
    GroupKFold, up to 5 parts), falling back to the best member when it scores better on the whole OOF;
    any other method, a single member, or a single study gives equal weights.

    Raises:
        PromoteError: when no registered version is tagged ``ensemble=<name>``.
    """
    ms = members(tracking_uri, name)
    sol = joint_solution(ms)
    frames = [m.oof for m in ms]
    member_rows = []
    for m in ms:
        r = score_groups(m.solution.sort_values("row_id", ignore_index=True), m.oof)
        member_rows.append({"member": m.label, "run_id": m.run_id, "points": m.val_points, "score": r.score,
                            **r.groups})
    weights, chosen, held_out = choose_weights(sol, frames, method)
    pred = combine(frames, weights)
    total = _scored(sol, pred)
    result = EnsembleResult(name, chosen, member_rows,
                            [float(w) for w in weights], total.score, total.groups, held_out)
    result.run_id = _log_ensemble(tracking_uri, result, ms, pred)
    return result


def _log_ensemble(tracking_uri: str, result: EnsembleResult, ms: list[Member], pred: pd.DataFrame) -> str:
    tracker = Tracker(tracking_uri)
    exp = tracker.ensure_experiment(ENSEMBLE_EXPERIMENT)
    run_id = tracker.start_run(exp, f"{result.name}-{time.strftime('%Y%m%d-%H%M%S')}", tags={
        "ensemble": result.name, "method": result.method,
        "val_points": ",".join(sorted({m.val_points for m in ms}))})
    members_json = [{"model": m.model, "version": m.version, "trial": m.trial, "run_id": m.run_id,
                     "val_points": m.val_points, "weight": w} for m, w in zip(ms, result.weights)]
    tracker.log_batch(run_id, params={"members": json.dumps([f"{m.model}/{m.version}" for m in ms]),
                                      "weights": json.dumps([round(w, 6) for w in result.weights]),
                                      "method": result.method, "n_members": len(ms)},
                      metrics={"score": result.score, **{f"final_{k}": v for k, v in result.groups.items()},
                               **{f"member{i}_score": r["score"] for i, r in enumerate(result.members)},
                               **{f"held_out_{k}": v for k, v in result.held_out.items()}})
    tmp = Path(tempfile.mkdtemp(prefix="spinesweep-ensemble-"))
    pred.to_csv(tmp / "oof.csv", index=False)
    (tmp / "members.json").write_text(json.dumps(members_json, indent=2))
    tracker.log_artifacts(run_id, tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    tracker.end_run(run_id, "FINISHED")
    return run_id


def ensemble_weights(tracking_uri: str, name: str, ms: list[Member]) -> list[float]:
    """The weights of the latest logged ensemble of that name for these members (equal when the
    ensemble was never built or its members changed since)."""
    tracker = Tracker(tracking_uri)
    exp = tracker.get_experiment(ENSEMBLE_EXPERIMENT)
    equal = [1.0 / len(ms)] * len(ms)
    if exp is None:
        return equal
    runs = tracker.search_runs([exp.experiment_id], f"tags.ensemble = '{name}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return equal
    logged = json.loads(runs[0].data.params.get("members", "[]"))
    if logged != [f"{m.model}/{m.version}" for m in ms]:
        return equal
    return json.loads(runs[0].data.params["weights"])

"""From a study to a Kaggle submission: promotion, ensemble, predict.

- `promote`: a trial (the best by default) trains the folds it was not evaluated on (child runs of
  its MLflow run), so it has OOF predictions for every training study; its checkpoints, config and
  full OOF go under the run's ``promoted/`` artifacts and become a new version of the registered
  model ``spinesweep-<space>``, tagged ``ensemble=<name>`` and aliased ``trial_<n>``.
- `ensemble`: the members of an ensemble (registered versions with that tag), their OOF aligned by
  row_id; a row is the weighted mean of the members that cover it, so a spinal-canal model and a
  foraminal model combine per condition. Weights: equal, or optimised on OOF and kept only when a
  cross-fit over studies (weights fitted on the other studies, scored on these) says they beat
  equal weights and the best single member out of sample; never worse than the best member on the
  whole OOF. Logged as a run of the MLflow experiment ``ensembles``.
- `predict`: every member on the test studies (`trainer.infer`), combined with the ensemble's
  weights, rows the ensemble does not cover filled with the training label frequencies, written in
  the exact ``sample_submission.csv`` form.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd

from trainer.config import TrainConfig
from trainer.metric import TARGET_COLUMNS, score_groups

from .tracking import Tracker, _retry

MODEL_PREFIX = "spinesweep-"
ENSEMBLE_EXPERIMENT = "ensembles"


class PromoteError(ValueError):
    """A trial cannot be promoted or an ensemble built; the message says why."""


def _study_trial(study: optuna.Study, trial: int | None, run_id: str | None):
    trials = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("source") != "legacy"]
    if run_id:
        found = [t for t in trials if t.user_attrs.get("mlflow_run_id") == run_id]
        if not found:
            raise PromoteError(f"no trial of study {study.study_name!r} has MLflow run {run_id}")
        t = found[0]
    elif trial is not None:
        found = [t for t in trials if t.number == trial]
        if not found:
            raise PromoteError(f"study {study.study_name!r} has no trial {trial}")
        t = found[0]
    else:
        done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not done:
            raise PromoteError(f"study {study.study_name!r} has no completed trial to promote")
        minimize = study.direction == optuna.study.StudyDirection.MINIMIZE
        t = min(done, key=lambda t: t.value if minimize else -t.value)
    if t.state != optuna.trial.TrialState.COMPLETE:
        raise PromoteError(f"trial {t.number} is {t.state.name}: only completed trials can be promoted")
    if not t.user_attrs.get("mlflow_run_id"):
        raise PromoteError(f"trial {t.number} has no MLflow run")
    return t


def _download(client, run_id: str, path: str, dst: Path) -> Path:
    return Path(_retry(client.download_artifacts, run_id, path, str(dst)))


def _versions(client, model: str | None = None) -> list:
    names = [model] if model else [m.name for m in _retry(client.search_registered_models, max_results=1000)
                                   if m.name.startswith(MODEL_PREFIX)]
    out = []
    for name in names:
        try:
            out += _retry(client.search_model_versions, f"name='{name}'")
        except Exception:  # a model deleted between the two calls has no versions to offer
            continue
    return out


@dataclass
class Promotion:
    model: str
    version: str
    trial: int
    run_id: str
    folds: list[int]
    trained_folds: list[int]
    oof_score: float
    groups: dict[str, float]
    already: bool = False


def promote(study_name: str, storage_url: str, tracking_uri: str, trial: int | None = None,
            run_id: str | None = None, all_folds: bool = True, data_dir: str | None = None,
            ensemble: str = "default", fit_fn=None, log=print) -> Promotion:
    from .objective import _MlflowCurves
    from .study import make_storage

    if fit_fn is None:
        from trainer.fit import fit as fit_fn
    storage = make_storage(storage_url)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise PromoteError(f"no study {study_name!r} in the storage") from None
    t = _study_trial(study, trial, run_id)
    run_id = t.user_attrs["mlflow_run_id"]
    space = study.user_attrs.get("space", study_name)
    model = f"{MODEL_PREFIX}{study_name}"
    tracker = Tracker(tracking_uri)
    client = tracker.client
    for v in _versions(client, model) if _model_exists(client, model) else []:
        if v.tags.get("trial_run_id") == run_id:
            return Promotion(model, v.version, t.number, run_id, json.loads(v.tags.get("folds", "[]")), [],
                             float(v.tags.get("oof_score", "nan")), {}, already=True)
    run = _retry(client.get_run, run_id)
    cfg = TrainConfig.from_flat(run.data.params)
    if data_dir:
        cfg = cfg.with_overrides({"data.data_dir": data_dir})
    evaluated = [int(f) for f in run.data.tags.get("spinesweep.folds", str(cfg.data.fold)).split(",")]
    wanted = list(range(cfg.data.n_folds)) if all_folds else evaluated
    missing = [f for f in wanted if f not in evaluated]
    work = Path(tempfile.mkdtemp(prefix="spinesweep-promote-"))
    try:
        promoted = work / "promoted"
        promoted.mkdir()
        names = {a.path for a in _retry(client.list_artifacts, run_id)}
        if "oof.csv" not in names or "solution.csv" not in names:
            raise PromoteError(f"run {run_id} has no oof.csv/solution.csv (made before promotion existed?)")
        oofs = [pd.read_csv(_download(client, run_id, "oof.csv", work))]
        sols = [pd.read_csv(_download(client, run_id, "solution.csv", work))]
        for f in evaluated:
            name = f"checkpoint_fold{f}.pt" if len(evaluated) > 1 else "checkpoint.pt"
            if name not in names:
                raise PromoteError(f"run {run_id} has no {name}")
            shutil.move(_download(client, run_id, name, work), promoted / f"checkpoint_fold{f}.pt")
        for f in missing:
            log(f"promote: trial {t.number} trains fold {f} ...")
            child = tracker.start_run(run.info.experiment_id, f"{run.info.run_name}-fold{f}", parent_run_id=run_id,
                                      tags={"promotion_of": run_id, "promoted_trial": t.number, "fold": f,
                                            "study": study_name})
            fold_cfg = cfg.with_overrides({"data.fold": f, "output_dir": str(work / f"fold{f}")})
            try:
                tracker.log_batch(child, params=fold_cfg.to_flat())
                result = fit_fn(fold_cfg, callbacks=[_MlflowCurves(tracker, child, 0, f, 1)])
                art = work / f"art{f}"
                art.mkdir()
                result.oof.to_csv(art / "oof.csv", index=False)
                result.solution.to_csv(art / "solution.csv", index=False)
                pd.DataFrame(result.history).to_csv(art / "history.csv", index=False)
                (art / "confusion.json").write_text(json.dumps(result.confusion))
                tracker.log_artifacts(child, art)
                tracker.log_batch(child, metrics={"score": result.score, "prior_score": result.prior_score})
                tracker.end_run(child, "FINISHED")
            except BaseException as e:
                tracker.set_tags(child, {"error": f"{type(e).__name__}: {e}"[:5000]})
                tracker.end_run(child, "FAILED")
                raise
            shutil.copy(result.checkpoint, promoted / f"checkpoint_fold{f}.pt")
            oofs.append(result.oof)
            sols.append(result.solution)
        oof, sol = pd.concat(oofs, ignore_index=True), pd.concat(sols, ignore_index=True)
        total = score_groups(sol, oof)
        oof.to_csv(promoted / "oof.csv", index=False)
        sol.to_csv(promoted / "solution.csv", index=False)
        (promoted / "config.yaml").write_text(cfg.to_yaml())
        _retry(client.log_artifacts, run_id, str(promoted), "promoted")
        if not _model_exists(client, model):
            _retry(client.create_registered_model, model,
                   description=f"Promoted trials of the spinesweep study {study_name} (space {space}).")
        folds = sorted(evaluated + missing)
        mv = _retry(client.create_model_version, model, source=f"{run.info.artifact_uri}/promoted", run_id=run_id,
                    tags={"ensemble": ensemble, "trial": str(t.number), "trial_run_id": run_id, "study": study_name,
                          "space": space, "folds": json.dumps(folds), "oof_score": f"{total.score:.6f}",
                          "conditions": json.dumps(list(cfg.data.conditions))},
                    description=f"trial {t.number}: OOF score {total.score:.4f} over folds {folds}")
        _retry(client.set_registered_model_alias, model, f"trial_{t.number}", mv.version)
        tracker.set_tags(run_id, {"promoted": f"{model} v{mv.version}"})
        tracker.log_batch(run_id, metrics={"promoted_oof_score": total.score})
        return Promotion(model, mv.version, t.number, run_id, folds, missing, total.score, total.groups)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _model_exists(client, name: str) -> bool:
    try:
        _retry(client.get_registered_model, name)
        return True
    except Exception:
        return False


# ------------------------------------------------------------------ ensemble


@dataclass
class Member:
    model: str
    version: str
    trial: str
    run_id: str
    source: str
    oof: pd.DataFrame
    solution: pd.DataFrame

    @property
    def label(self) -> str:
        return f"{self.model} v{self.version} (trial {self.trial})"


def members(tracking_uri: str, name: str = "default", with_frames: bool = True) -> list[Member]:
    """The registered versions tagged ``ensemble=name``, with their full OOF and labels."""
    client = Tracker(tracking_uri).client
    out = []
    for v in sorted(_versions(client), key=lambda v: (v.name, int(v.version))):
        if v.tags.get("ensemble") != name:
            continue
        oof = sol = None
        if with_frames:
            tmp = Path(tempfile.mkdtemp(prefix="spinesweep-member-"))
            oof = pd.read_csv(_download(client, v.run_id, "promoted/oof.csv", tmp))
            sol = pd.read_csv(_download(client, v.run_id, "promoted/solution.csv", tmp))
            shutil.rmtree(tmp, ignore_errors=True)
        out.append(Member(v.name, v.version, v.tags.get("trial", "?"), v.run_id, v.source, oof, sol))
    return out


def combine(frames: list[pd.DataFrame], weights: np.ndarray) -> pd.DataFrame:
    """Row-wise weighted mean over the members that have each row (weights renormalised per row)."""
    parts = []
    for w, f in zip(weights, frames):
        g = f[["row_id", *TARGET_COLUMNS]].copy()
        g[list(TARGET_COLUMNS)] = g[list(TARGET_COLUMNS)].to_numpy() * w
        g["_w"] = w
        parts.append(g)
    s = pd.concat(parts).groupby("row_id", sort=True).sum()
    denom = s["_w"].where(s["_w"] > 0, np.nan)
    out = s[list(TARGET_COLUMNS)].div(denom, axis=0)
    out = out.fillna(1.0 / 3)
    out = out.div(out.sum(axis=1), axis=0)
    return out.reset_index()


def _solution(ms: list[Member]) -> pd.DataFrame:
    return pd.concat([m.solution for m in ms]).drop_duplicates("row_id").reset_index(drop=True)


def _score(sol: pd.DataFrame, frames, w) -> float:
    pred = combine(frames, w)
    pred = pred[pred["row_id"].isin(set(sol["row_id"]))]
    return score_groups(sol[sol["row_id"].isin(set(pred["row_id"]))], pred).score


def _optimise(sol: pd.DataFrame, frames: list[pd.DataFrame]) -> np.ndarray:
    from scipy.optimize import minimize

    k = len(frames)

    def weights(theta):
        e = np.exp(theta - theta.max())
        return e / e.sum()

    res = minimize(lambda th: _score(sol, frames, weights(th)), np.zeros(k), method="Nelder-Mead",
                   options=dict(maxiter=200 * k, xatol=1e-3, fatol=1e-5))
    return weights(res.x)


def _study_folds(row_ids: pd.Series, k: int) -> np.ndarray:
    """A fixed split of the studies in k parts (crc32 of the study id), for the cross-fit."""
    return np.array([zlib.crc32(r.split("_")[0].encode()) % k for r in row_ids])


@dataclass
class EnsembleResult:
    name: str
    method: str
    members: list[dict]
    weights: list[float]
    score: float
    groups: dict[str, float]
    held_out: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None


def ensemble(tracking_uri: str, name: str = "default", method: str = "optimize") -> EnsembleResult:
    ms = members(tracking_uri, name)
    if not ms:
        raise PromoteError(f"ensemble {name!r} has no members: promote a trial first (optuna-run promote SPACE)")
    sol = _solution(ms)
    frames = [m.oof for m in ms]
    k = len(ms)
    member_rows = []
    for m in ms:
        r = score_groups(m.solution, m.oof)
        member_rows.append({"member": m.label, "run_id": m.run_id, "score": r.score, **r.groups})
    equal = np.full(k, 1.0 / k)
    held_out: dict[str, float] = {}
    weights, chosen = equal, "equal"
    if method == "optimize" and k > 1:
        n_studies = sol["row_id"].str.split("_").str[0].nunique()
        n_parts = max(2, min(5, n_studies))
        part = _study_folds(sol["row_id"], n_parts)
        preds = {"equal": [], "optimized": [], "best_member": []}
        for h in range(n_parts):
            fit_sol, test_sol = sol[part != h], sol[part == h]
            if fit_sol.empty or test_sol.empty:
                continue
            w_opt = _optimise(fit_sol, frames)
            single = np.eye(k)[int(np.argmin([_score(fit_sol, frames, np.eye(k)[i]) for i in range(k)]))]
            for key, w in (("equal", equal), ("optimized", w_opt), ("best_member", single)):
                p = combine(frames, w)
                preds[key].append(p[p["row_id"].isin(set(test_sol["row_id"]))])
        for key, parts in preds.items():
            p = pd.concat(parts, ignore_index=True)
            held_out[key] = score_groups(sol[sol["row_id"].isin(set(p["row_id"]))], p).score
        chosen = min(held_out, key=held_out.get)
        best_single = np.eye(k)[int(np.argmin([_score(sol, frames, np.eye(k)[i]) for i in range(k)]))]
        if chosen == "optimized":
            weights = _optimise(sol, frames)
        elif chosen == "best_member":
            weights = best_single
        # the members' OOF predictions are out of fold, so their OOF scores are honest: a
        # combination that the cross-fit preferred but that does worse than the best member on the
        # whole OOF is noise of a small cross-fit, and the best member is kept instead
        if chosen != "best_member" and _score(sol, frames, weights) > _score(sol, frames, best_single):
            chosen, weights = "best_member (guard)", best_single
    pred = combine(frames, weights)
    total = score_groups(sol, pred[pred["row_id"].isin(set(sol["row_id"]))])
    result = EnsembleResult(name, chosen, member_rows,
                            [float(w) for w in weights], total.score, total.groups, held_out)
    result.run_id = _log_ensemble(tracking_uri, result, ms, pred)
    return result


def _log_ensemble(tracking_uri: str, result: EnsembleResult, ms: list[Member], pred: pd.DataFrame) -> str:
    tracker = Tracker(tracking_uri)
    exp = tracker.ensure_experiment(ENSEMBLE_EXPERIMENT)
    run_id = tracker.start_run(exp, f"{result.name}-{time.strftime('%Y%m%d-%H%M%S')}", tags={
        "ensemble": result.name, "method": result.method})
    members_json = [{"model": m.model, "version": m.version, "trial": m.trial, "run_id": m.run_id,
                     "weight": w} for m, w in zip(ms, result.weights)]
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
    client = Tracker(tracking_uri).client
    exp = client.get_experiment_by_name(ENSEMBLE_EXPERIMENT)
    equal = [1.0 / len(ms)] * len(ms)
    if exp is None:
        return equal
    runs = client.search_runs([exp.experiment_id], f"tags.ensemble = '{name}'", order_by=["attributes.start_time DESC"],
                              max_results=1)
    if not runs:
        return equal
    logged = json.loads(runs[0].data.params.get("members", "[]"))
    if logged != [f"{m.model}/{m.version}" for m in ms]:
        return equal
    return json.loads(runs[0].data.params["weights"])


# ------------------------------------------------------------------ predict


def predict(data_dir: str, out: str | Path, tracking_uri: str, name: str = "default", device: str = "cpu",
            log=print) -> dict[str, Any]:
    from trainer.data.layout import CONDITIONS, LEVELS, Layout, row_id
    from trainer.infer import LevelPrior, label_prior, predict_studies

    ms = members(tracking_uri, name, with_frames=False)
    if not ms:
        raise PromoteError(f"ensemble {name!r} has no members: promote a trial first (optuna-run promote SPACE)")
    weights = ensemble_weights(tracking_uri, name, ms)
    layout = Layout(Path(data_dir))
    study_ids = sorted(layout.test_series["study_id"].unique().tolist())
    if not study_ids:
        raise PromoteError(f"{data_dir}: test_series_descriptions.csv lists no study")
    prior = LevelPrior.fit(layout)
    client = Tracker(tracking_uri).client
    frames, used = [], []
    for m, w in zip(ms, weights):
        if w <= 0:
            log(f"predict: {m.label} has weight 0 in the ensemble: skipped")
            continue
        used.append(w)
        tmp = Path(tempfile.mkdtemp(prefix="spinesweep-predict-"))
        names = [a.path for a in _retry(client.list_artifacts, m.run_id, "promoted")]
        ckpts = [_download(client, m.run_id, n, tmp) for n in names if n.endswith(".pt")]
        log(f"predict: {m.label} on {len(study_ids)} test studies ({len(ckpts)} fold checkpoints)")
        frames.append(predict_studies(ckpts, data_dir, study_ids, prior=prior, device=device))
        shutil.rmtree(tmp, ignore_errors=True)
    pred = combine(frames, np.asarray(used)).set_index("row_id")
    fallback = label_prior(layout)
    sample = layout.root / "sample_submission.csv"
    ids = [row_id(s, c, lv) for s in study_ids for c in CONDITIONS for lv in LEVELS]
    if sample.exists():
        listed = pd.read_csv(sample)["row_id"].tolist()
        if set(listed) == set(ids):
            ids = listed  # the exact order of the sample
    rows, filled = [], set()
    for rid in ids:
        if rid in pred.index:
            rows.append([rid, *pred.loc[rid, list(TARGET_COLUMNS)].to_numpy(dtype=float)])
        else:
            cond = next(c for c in CONDITIONS if f"_{c}_" in f"_{rid}_")
            filled.add(cond)
            rows.append([rid, *fallback[cond]])
    sub = pd.DataFrame(rows, columns=["row_id", *TARGET_COLUMNS])
    vals = sub[list(TARGET_COLUMNS)].to_numpy()
    vals = np.clip(np.nan_to_num(vals, nan=1.0 / 3), 1e-7, 1.0)
    sub[list(TARGET_COLUMNS)] = vals / vals.sum(1, keepdims=True)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sub.to_csv(out, index=False)
    return {"path": str(out), "rows": len(sub), "studies": len(study_ids), "members": [m.label for m in ms],
            "weights": weights, "filled_with_label_prior": sorted(filled)}

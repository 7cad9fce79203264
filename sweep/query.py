"""Questions answered from MLflow: a study's trials as a table, and re-running a logged trial."""
from __future__ import annotations

import tempfile

import pandas as pd

from trainer.config import TrainConfig
from trainer.metric import score_groups

from .tracking import Tracker

STATE = {"FINISHED": "COMPLETE", "KILLED": "PRUNED", "FAILED": "FAILED", "RUNNING": "RUNNING"}


def runs_table(experiment: str, tracking_uri: str | None = None, top: int | None = None) -> list[dict]:
    """One row per trial run of an experiment (a study), best score first, unscored last."""
    tracker = Tracker(tracking_uri)
    exp = tracker.client.get_experiment_by_name(experiment)
    if exp is None:
        from .cli import UserError

        names = [e.name for e in tracker.client.search_experiments()]
        raise UserError(f"no MLflow experiment {experiment!r} (have: {', '.join(names) or 'none'})")
    runs = tracker.client.search_runs([exp.experiment_id], "tags.trial != ''", max_results=5000)
    rows = []
    for r in runs:
        row = dict(trial=int(r.data.tags["trial"]), state=STATE.get(r.info.status, r.info.status),
                   score=r.data.metrics.get("score") if r.info.status == "FINISHED" else None)
        for k, v in sorted(r.data.tags.items()):
            if k.startswith("optuna."):
                row[f"param:{k[7:]}"] = v
        row["run_id"] = r.info.run_id
        rows.append(row)
    keys = sorted({k for r in rows for k in r if k.startswith("param:")})
    rows = [{**{k: r.get(k, "-") for k in ("trial", "state", "score")}, **{k: r.get(k, "-") for k in keys},
             "run_id": r["run_id"]} for r in rows]
    rows.sort(key=lambda r: (r["score"] is None, r["score"] if r["score"] is not None else 0, r["trial"]))
    return rows[:top] if top else rows


def reproduce(run_id: str, tracking_uri: str | None = None, data_dir: str | None = None, fit_fn=None) -> dict:
    """Re-run a trial from its logged params alone (every TrainConfig field is a param) on the
    folds it evaluated; returns the logged and the reproduced score."""
    if fit_fn is None:
        from trainer.fit import fit as fit_fn
    tracker = Tracker(tracking_uri)
    run = tracker.get_run(run_id)
    cfg = TrainConfig.from_flat(run.data.params)
    if data_dir:
        cfg = cfg.with_overrides({"data.data_dir": data_dir})
    folds = [int(f) for f in run.data.tags.get("spinesweep.folds", str(cfg.data.fold)).split(",")]
    oofs, sols = [], []
    for fold in folds:
        r = fit_fn(cfg.with_overrides({"data.fold": fold, "output_dir": tempfile.mkdtemp(prefix="spinesweep-repro-")}))
        oofs.append(r.oof)
        sols.append(r.solution)
    result = score_groups(pd.concat(sols, ignore_index=True), pd.concat(oofs, ignore_index=True))
    return dict(run_id=run_id, logged_score=run.data.metrics.get("score"), score=result.score,
                groups=result.groups, folds=folds)

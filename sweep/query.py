"""Questions answered from MLflow: a study's trials as a table, and re-running a logged trial."""
from __future__ import annotations

from trainer.config import TrainConfig
from trainer.errors import UserError

from .evaluate import evaluate_folds
from .tracking import Tracker

# a trial run ends KILLED when it was pruned (tagged pruned) or interrupted (Ctrl-C: Optuna holds it
# FAILED, marked interrupted, and --resume runs its parameters again)
STATE = {"FINISHED": "COMPLETE", "KILLED": "INTERRUPTED", "FAILED": "FAILED", "RUNNING": "RUNNING"}


def _experiment(tracker: Tracker, name: str):
    exp = tracker.get_experiment(name)
    if exp is None:
        names = tracker.experiment_names()
        hint = "; the manual log becomes it with optuna-run import-log" if name == "legacy" else (
            f"; a study makes it: optuna-run {name.removesuffix('-smoke')}" + (" --smoke" if name.endswith("-smoke") else ""))
        raise UserError(f"no MLflow experiment {name!r} (have: {', '.join(names) or 'none'}){hint}")
    return exp


def _search(tracker: Tracker, exp, base: str, where: str | None, order_by: list[str] | None = None,
            max_results: int | None = None):
    from mlflow.exceptions import MlflowException

    query = f"{base} and {where}" if where else base
    try:
        return tracker.search_runs([exp.experiment_id], query, order_by=order_by, max_results=max_results or 50000)
    except MlflowException as e:
        raise UserError(f"--where {where!r}: {e.message.splitlines()[0]}") from None


def runs_table(experiment: str, tracking_uri: str | None = None, top: int | None = None,
               where: str | None = None) -> list[dict]:
    """One row per trial run of an experiment (a study), best score first, unscored last.
    `where` is an MLflow search filter, e.g. ``params.`model.head` = 'gru'``. The experiment of
    an imported manual log gets a table of its entries instead (`legacy_table`)."""
    tracker = Tracker(tracking_uri)
    exp = _experiment(tracker, experiment)
    if exp.tags.get("spinesweep.kind") == "legacy":
        return legacy_table(experiment, tracking_uri, top, where)
    # sorted and limited by the store: scored (finished) runs by score, then the others by trial
    runs = _search(tracker, exp, "tags.trial != '' and attributes.status = 'FINISHED'", where,
                   order_by=["metrics.score ASC"], max_results=top)
    if top is None or len(runs) < top:
        others = _search(tracker, exp, "tags.trial != '' and attributes.status != 'FINISHED'", where)
        runs += sorted(others, key=lambda r: int(r.data.tags["trial"]))[:None if top is None else top - len(runs)]
    rows = []
    for r in runs:
        # a pruned trial shows the value Optuna keeps for it (its best score when it was stopped)
        scored = r.info.status == "FINISHED" or r.data.tags.get("pruned") == "true"
        state = "PRUNED" if r.data.tags.get("pruned") == "true" else STATE.get(r.info.status, r.info.status)
        row = dict(trial=int(r.data.tags["trial"]), state=state,
                   score=r.data.metrics.get("score") if scored else None)
        for k, v in sorted(r.data.tags.items()):
            if k.startswith("optuna."):
                row[f"param:{k[7:]}"] = v
        row["run_id"] = r.info.run_id
        rows.append(row)
    keys = sorted({k for r in rows for k in r if k.startswith("param:")})
    return [{**{k: r.get(k, "-") for k in ("trial", "state", "score")}, **{k: r.get(k, "-") for k in keys},
             "run_id": r["run_id"]} for r in rows]


def run_config(tracker: Tracker, run) -> TrainConfig:
    """A trial's whole config: its ``config.yaml`` artifact, never its params (a param longer
    than MLflow's limit is logged cut). A run without the artifact (logged by an older version)
    falls back on its params when none of them was cut.

    Raises:
        UserError: neither the artifact nor whole params (the message names the run and the keys).
    """
    import tempfile

    from . import artifacts as names
    from .tracking import PARAMS_CUT

    if names.CONFIG in tracker.list_artifacts(run.info.run_id):
        with tempfile.TemporaryDirectory(prefix="spinesweep-config-") as tmp:
            return TrainConfig.from_yaml(tracker.download(run.info.run_id, names.CONFIG, tmp))
    cut = run.data.tags.get(PARAMS_CUT)
    if cut:
        raise UserError(f"run {run.info.run_id} has no {names.CONFIG} artifact and its param(s) {cut} were cut "
                        f"at MLflow's limit: its whole config is not stored")
    if not run.data.params:
        raise UserError(f"run {run.info.run_id} is not a trial's run (no {names.CONFIG}, no params): a study's "
                        f"parent run? `optuna-run runs STUDY` lists the trial runs")
    return TrainConfig.from_flat(run.data.params)


def reproduce(run_id: str, tracking_uri: str | None = None, data_dir: str | None = None, log=print,
              fit_fn=None) -> dict:
    """Re-run a trial from its logged config (`run_config`: its ``config.yaml`` artifact) on the
    folds it evaluated; returns the logged and the reproduced score.

    Raises:
        TrackingError: no run of that id.
        UserError: the run's config cannot be had whole (`run_config`)."""
    tracker = Tracker(tracking_uri)
    run = tracker.get_run(run_id)
    cfg = run_config(tracker, run)
    if data_dir:
        cfg = cfg.with_overrides({"data.data_dir": data_dir})
    from .localize import local_val_points
    from .progress import ProgressFolds

    cfg = local_val_points(cfg, run, tracker.uri)  # a points file from MLflow, fetched again if not here
    folds = [int(f) for f in run.data.tags.get("spinesweep.folds", str(cfg.data.fold)).split(",")]

    hooks = ProgressFolds(f"reproduce {run_id[:12]}", cfg.optim.epochs, len(folds), log=log)
    try:
        result = evaluate_folds(cfg, folds, hooks, fit_fn=fit_fn, prefix="spinesweep-repro-").score()
    finally:
        hooks.close()
    return dict(run_id=run_id, logged_score=run.data.metrics.get("score"), score=result.score,
                groups=result.groups, folds=folds)


# ------------------------------------------------------------------ the imported manual log

LEGACY_COLUMNS = (("cv_fold0", "metric"), ("cv_oof", "metric"), ("lb", "metric"), ("model.backbone", "param"),
                  ("model.head", "param"), ("optim.lr", "param"), ("optim.epochs", "param"),
                  ("data.window_ratio", "param"), ("based_on", "tag"), ("keep", "tag"))


def _legacy_row(r) -> dict:
    t, m, p = r.data.tags, r.data.metrics, r.data.params
    row = {"entry": t.get("legacy.entry"), "date": t.get("date", "")}
    for key, kind in LEGACY_COLUMNS:
        row[key] = m.get(key) if kind == "metric" else (p if kind == "param" else t).get(key, "-")
    row["run_id"] = r.info.run_id
    return row


def legacy_table(experiment: str = "legacy", tracking_uri: str | None = None, top: int | None = None,
                 where: str | None = None) -> list[dict]:
    """The manual log's entries, best fold-0 CV first (entries without one last, in log order)."""
    tracker = Tracker(tracking_uri)
    exp = _experiment(tracker, experiment)
    rows = [_legacy_row(r) for r in _search(tracker, exp, "tags.source = 'legacy'", where)]
    number = {r["entry"]: i for i, r in enumerate(sorted(rows, key=lambda r: (r["date"], r["entry"])))}
    rows.sort(key=lambda r: (r["cv_fold0"] is None, r["cv_fold0"] or 0.0, number[r["entry"]]))
    return rows[:top] if top else rows


def lineage(entry: str, experiment: str = "legacy", tracking_uri: str | None = None) -> list[dict]:
    """An entry and its ancestors through `based:` (or the entry before it where the log names
    no base), newest first, with what each one changed."""
    tracker = Tracker(tracking_uri)
    exp = _experiment(tracker, experiment)
    runs = {r.data.tags.get("legacy.entry"): r for r in _search(tracker, exp, "tags.source = 'legacy'", None)}
    if entry not in runs:
        raise UserError(f"no entry {entry!r} in experiment {experiment!r}")
    chain, seen = [], set()
    name = entry
    while name and name in runs and name not in seen:
        seen.add(name)
        r = runs[name]
        row = _legacy_row(r)
        row["inherits_from"] = r.data.tags.get("inherits_from", "")
        row["changed"] = r.data.tags.get("legacy.changed", "").replace("\n", "; ")
        chain.append(row)
        name = row["inherits_from"].split(" ")[0]
    return chain

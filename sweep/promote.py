"""Promotion: a trial (the best by default) becomes a registered model version.

It trains the folds it was not evaluated on (child runs of its MLflow run, through the same
`evaluate_folds` a trial uses), so it has OOF predictions for every training study; its
checkpoints, config and full OOF go under the run's ``promoted/`` artifacts and become a new
version of a registered model:
- a classifier's: ``spinesweep-<study>``, tagged ``ensemble=<name>`` and aliased ``trial_<n>``, an
  ensemble member; `ensemble.py` combines the members, `predict.py` writes the submission;
- a localiser's (``task: localize``, any study): ``spinesweep-localizer`` (one model for every
  localiser study), aliased ``study_<study>_trial_<n>`` and ``champion`` (moved to the newest
  version), with its OOF points over every training study (``oof_coordinates.csv``, the
  ``train_label_coordinates.csv`` form) kept with the model. `predict` and the classifier's model
  cut their crops around its points (`sweep.localize`).
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pandas as pd

from trainer.config import TrainConfig
from trainer.errors import UserError

from . import artifacts as names
from .evaluate import FoldHooks, evaluate_folds
from .localize import CHAMPION, LOCALIZER_MODEL, local_val_points
from .model import save as save_model
from .progress import ProgressFolds
from .query import run_config
from .trials import best_trial, own_trials
from .tracking import MlflowCurves, Tracker

MODEL_PREFIX = "spinesweep-"


class PromoteError(UserError):
    """A trial cannot be promoted or an ensemble built; the message says why."""


def _study_trial(study: optuna.Study, trial: int | None, run_id: str | None):
    trials = own_trials(study)
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
        t = best_trial(study)
        if t is None:
            raise PromoteError(f"study {study.study_name!r} has no completed trial to promote")
    if t.state != optuna.trial.TrialState.COMPLETE:
        raise PromoteError(f"trial {t.number} is {t.state.name}: only completed trials can be promoted")
    if not t.user_attrs.get("mlflow_run_id"):
        raise PromoteError(f"trial {t.number} has no MLflow run")
    return t


@dataclass
class Promotion:
    """What `promote` did: the registered model and version, the trial and its run, every fold the
    version covers (`folds`) and those trained now (`trained_folds`), the OOF score over all of them
    with its per-group losses; `already`: the trial was registered before (nothing trained, no groups)."""

    model: str
    version: str
    trial: int
    run_id: str
    folds: list[int]
    trained_folds: list[int]
    oof_score: float
    groups: dict[str, float]
    already: bool = False
    task: str = "classify"  # localize: a localiser, registered as spinesweep-localizer
    aliases: list[str] = field(default_factory=list)  # the aliases set on the version


class PromotionFolds(FoldHooks):
    """Each missing fold as a child run of the trial's run: params, curves, artifacts, score;
    its checkpoint kept under ``promoted/``."""

    def __init__(self, tracker: Tracker, run, cfg: TrainConfig, trial: int, study_name: str, promoted: Path,
                 work: Path, log):
        self.tracker, self.run, self.cfg, self.trial, self.study_name = tracker, run, cfg, trial, study_name
        self.promoted, self.work, self.log = promoted, work, log
        self.child: str | None = None

    def callbacks(self, i: int, fold: int) -> list:
        """Start the fold's child run and log its params; its callback logs curves into it."""
        self.log(f"promote: trial {self.trial} trains fold {fold} ...")
        self.child = self.tracker.start_run(
            self.run.info.experiment_id, f"{self.run.info.run_name}-fold{fold}", parent_run_id=self.run.info.run_id,
            tags={"promotion_of": self.run.info.run_id, "promoted_trial": self.trial, "fold": fold,
                  "study": self.study_name})
        self.tracker.log_batch(self.child, params=self.cfg.with_overrides({"data.fold": fold}).to_flat())
        return [MlflowCurves(self.tracker, self.child)]

    def done(self, i: int, fold: int, result) -> bool:
        """Log the fold's OOF, solution, history, confusion and score to its child run, finish the run and
        keep the checkpoint under ``promoted/``; never stops the loop."""
        art = self.work / f"art{fold}"
        art.mkdir()
        result.oof.to_csv(art / names.OOF, index=False)
        result.solution.to_csv(art / names.SOLUTION, index=False)
        pd.DataFrame(result.history).to_csv(art / "history.csv", index=False)
        (art / names.fold_file("confusion", fold, 1)).write_text(json.dumps(result.confusion))
        for name, table in result.tables.items():  # the task's own per-fold tables (a localiser's points)
            table.to_csv(art / names.fold_table(name, fold), index=False)
        self.tracker.log_artifacts(self.child, art)
        # after every epoch's step: MLflow's latest `score` (the UI column, search filters) is the fold's score
        self.tracker.log_batch(self.child, metrics={"score": result.score, "prior_score": result.prior_score},
                               step=len(result.history) + 1)
        self.tracker.end_run(self.child, "FINISHED")
        shutil.copy(result.checkpoint, self.promoted / names.fold_file("checkpoint", fold))
        return False

    def failed(self, i: int, fold: int, error: BaseException) -> None:
        """Mark the fold's child run FAILED with the error."""
        if self.child:
            self.tracker.fail_run(self.child, f"{type(error).__name__}: {error}")


def _input_example(cfg: TrainConfig) -> pd.DataFrame:
    """One test study of the trial's data folder (a training study when it has none)."""
    from trainer.data.layout import Layout

    layout = Layout(Path(cfg.data.data_dir))
    tests = layout.test_series["study_id"].tolist() if (layout.root / "test_series_descriptions.csv").exists() else []
    study = int(tests[0]) if tests else int(layout.study_ids[0])
    return pd.DataFrame({"data_dir": [str(layout.root.resolve())], "study_id": [study]})


def version_aliases(study_name: str, trial: int, task: str) -> list[str]:
    """The aliases a promoted version gets: ``trial_<n>`` for a classifier (its model is its study's);
    ``study_<study>_trial_<n>`` (characters MLflow refuses in an alias as ``-``) and `CHAMPION`
    for a localiser, whose model holds every localiser study's versions."""
    if task != "localize":
        return [f"trial_{trial}"]
    safe = re.sub(r"[^\w-]", "-", study_name)
    return [f"study_{safe}_trial_{trial}", CHAMPION]


def promote(study_name: str, storage_url: str, tracking_uri: str, trial: int | None = None,
            run_id: str | None = None, all_folds: bool = True, data_dir: str | None = None,
            ensemble: str = "default", log=print) -> Promotion:
    """Promote a trial of `study_name` (by `trial` number, by MLflow `run_id`, else the best one): train
    the folds it was not evaluated on (all of ``data.n_folds`` with `all_folds`), and register a new
    version: a classifier's of ``spinesweep-<study>`` tagged ``ensemble=<ensemble>``, aliased
    ``trial_<n>``; a localiser's of ``spinesweep-localizer``, aliased ``study_<study>_trial_<n>`` and
    ``champion`` (module doc). A trial registered already is returned as is (``already=True``).
    `data_dir` overrides the run's data folder.

    Raises:
        PromoteError: no such trial or run, the trial is not COMPLETE or has no MLflow run, its run
            lacks the OOF, solution or fold checkpoints, or a classifier study is named like the
            localiser's model."""
    from .storage import open_study

    study = open_study(storage_url, study_name)
    t = _study_trial(study, trial, run_id)
    run_id = t.user_attrs["mlflow_run_id"]
    space = study.user_attrs.get("space", study_name)
    tracker = Tracker(tracking_uri)
    run = tracker.get_run(run_id)
    cfg = run_config(tracker, run)
    localiser = cfg.task == "localize"
    model = LOCALIZER_MODEL if localiser else f"{MODEL_PREFIX}{study_name}"
    if not localiser and model == LOCALIZER_MODEL:
        raise PromoteError(f"study {study_name!r} holds classifier trials, but {LOCALIZER_MODEL} is the registered "
                           "model of promoted localisers: run the classifier study under another name (--study-name)")
    for v in tracker.model_versions(MODEL_PREFIX, model):
        if v.tags.get("trial_run_id") == run_id:
            return Promotion(model, v.version, t.number, run_id, json.loads(v.tags.get("folds", "[]")), [],
                             float(v.tags.get("oof_score", "nan")), {}, already=True, task=cfg.task,
                             aliases=list(getattr(v, "aliases", []) or []))
    if data_dir:
        cfg = cfg.with_overrides({"data.data_dir": data_dir})
    cfg = local_val_points(cfg, run, tracking_uri)
    evaluated = [int(f) for f in run.data.tags.get("spinesweep.folds", str(cfg.data.fold)).split(",")]
    wanted = list(range(cfg.data.n_folds)) if all_folds else evaluated
    missing = [f for f in wanted if f not in evaluated]
    work = Path(tempfile.mkdtemp(prefix="spinesweep-promote-"))
    try:
        promoted = work / names.PROMOTED
        promoted.mkdir()
        logged = set(tracker.list_artifacts(run_id))
        if names.OOF not in logged or names.SOLUTION not in logged:
            raise PromoteError(f"run {run_id} has no {names.OOF}/{names.SOLUTION} (made before promotion existed?)")
        for f in evaluated:
            name = names.fold_file("checkpoint", f, len(evaluated))
            if name not in logged:
                raise PromoteError(f"run {run_id} has no {name}")
            shutil.move(tracker.download(run_id, name, work), promoted / names.fold_file("checkpoint", f))
        hooks = ProgressFolds(f"promote trial {t.number}", cfg.optim.epochs, len(missing), log=log,
                              inner=PromotionFolds(tracker, run, cfg, t.number, study_name, promoted, work, log))
        try:
            folds = evaluate_folds(cfg, missing, hooks, prefix="spinesweep-promote-")
        finally:
            hooks.close()
        folds.extra_oof = [pd.read_csv(tracker.download(run_id, names.OOF, work))]
        folds.extra_solution = [pd.read_csv(tracker.download(run_id, names.SOLUTION, work))]
        total = folds.score()
        folds.oof.to_csv(promoted / names.OOF, index=False)
        folds.solution.to_csv(promoted / names.SOLUTION, index=False)
        points = None
        if localiser:  # the OOF points over every training study, as train_label_coordinates.csv
            from trainer.points.metrics import competition_form

            points = promoted / names.OOF_POINTS
            competition_form(folds.oof).to_csv(points, index=False)
        (promoted / names.CONFIG).write_text(cfg.to_yaml())
        # the registered model: a pyfunc holding every fold's checkpoint (promoted/model)
        checkpoints = work / "checkpoints"
        checkpoints.mkdir()
        for ckpt in promoted.glob("checkpoint_fold*.pt"):
            shutil.move(ckpt, checkpoints / ckpt.name)
        log(f"promote: trial {t.number}: saving the MLflow model (signature, input example) ...")
        save_model(promoted / "model", checkpoints, _input_example(cfg), promoted / names.OOF, promoted / names.SOLUTION,
                   task=cfg.task, points=points)
        tracker.log_artifacts(run_id, promoted, names.PROMOTED)
        if not tracker.registered_model_exists(model):
            tracker.create_registered_model(model, (
                "Promoted localisers (task: localize) of every spinesweep localiser study; alias champion: the "
                "newest." if localiser else f"Promoted trials of the spinesweep study {study_name} (space {space})."))
        all_done = sorted(evaluated + missing)
        tags = {"trial": str(t.number), "trial_run_id": run_id, "study": study_name, "space": space,
                "task": cfg.task, "folds": json.dumps(all_done), "oof_score": f"{total.score:.6f}",
                "conditions": json.dumps(list(cfg.data.conditions))}
        if not localiser:  # a localiser is no ensemble member: it places the members' points
            tags["ensemble"] = ensemble
            tags["val_points"] = cfg.data.val_points  # the points its OOF score was measured on
            if "val_points_source" in run.data.tags:
                tags["val_points_source"] = run.data.tags["val_points_source"]
        what = f"{cfg.localizer.score} {total.score:.2f} mm" if localiser else f"score {total.score:.4f}"
        mv = tracker.create_model_version(
            model, source=f"{run.info.artifact_uri}/{names.PROMOTED}/model", run_id=run_id, tags=tags,
            description=f"study {study_name}, trial {t.number}: OOF {what} over folds {all_done}")
        aliases = version_aliases(study_name, t.number, cfg.task)
        for alias in aliases:
            tracker.set_model_alias(model, alias, mv.version)
        tracker.set_tags(run_id, {"promoted": f"{model} v{mv.version}"})
        tracker.log_batch(run_id, metrics={"promoted_oof_score": total.score})
        return Promotion(model, mv.version, t.number, run_id, all_done, missing, total.score, total.groups,
                         task=cfg.task, aliases=aliases)
    finally:
        shutil.rmtree(work, ignore_errors=True)

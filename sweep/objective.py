"""One trial: sample a config, train the space's folds with `trainer.fit`, report to Optuna every
epoch (or every fold for fold-wise pruners), log everything to the trial's MLflow child run.

The trainer stays ignorant of both: this module hands it two plain callbacks (through
`evaluate.evaluate_folds`, the fold loop a trial shares with `reproduce` and `promote`).
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import optuna
import pandas as pd

from . import artifacts as names
from .evaluate import FoldHooks, evaluate_folds
from .progress import TrialProgress
from .space import SearchSpace, Settings
from .tracking import MlflowCurves, Tracker


@dataclass
class TrialContext:
    """What every trial of one invocation shares (picklable: workers receive it)."""

    space_path: str
    study_name: str
    storage_url: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    settings: Settings  # data folder, --smoke, --set values, the worker's device
    tags: dict  # invocation-wide tags: git commit, data fingerprint, versions, space hash
    fit_fn: Callable | None = None  # `trainer.fit.fit` unless a caller hands another (tests, benchmarks)


class Reporter:
    """fit callback: report to Optuna at a global step and ask the pruner.

    The value reported is the fold's best score so far: what the trial would be worth if it
    stopped now (the best epoch is kept), and far less noisy than one epoch's score, so the pruner
    can decide early. Nothing is pruned at the trial's last step, where stopping saves nothing."""

    __name__ = "optuna_pruner"

    def __init__(self, trial: optuna.Trial, offset: int, last_step: int, direction: str):
        self.trial, self.offset, self.last_step = trial, offset, last_step
        self.better = min if direction == "minimize" else max
        self.best: float | None = None
        self.pruned_at: int | None = None

    def __call__(self, epoch: int, metrics: dict) -> bool:
        step = self.offset + epoch
        self.best = metrics["score"] if self.best is None else self.better(self.best, metrics["score"])
        self.trial.report(self.best, step)
        if step < self.last_step and self.trial.should_prune():
            self.pruned_at = step
            return True
        return False


class TrialFolds(FoldHooks):
    """A trial's folds: curves into its MLflow run, reports to Optuna every epoch (or, for a
    fold-wise pruner, every fold), fold artifacts into the run's folder."""

    def __init__(self, trial: optuna.Trial, space: SearchSpace, tracker: Tracker, run_id: str, epochs: int,
                 artifacts: Path, progress: TrialProgress | None = None):
        self.trial, self.space, self.tracker, self.run_id = trial, space, tracker, run_id
        self.epochs, self.artifacts, self.progress = epochs, artifacts, progress
        self.n = len(space.folds)
        self.pruned_at: int | None = None
        self.reporter: Reporter | None = None
        self.steps = 0  # the last global step whose metrics are in the run
        self.reported: float | None = None  # the last value reported to Optuna: a pruned trial's value

    def callbacks(self, i: int, fold: int) -> list:
        """The i-th fold's callbacks: curves into the run at global steps after ``i * epochs``, the progress
        bar, and (unless the pruner is fold-wise) a `Reporter`."""
        offset = i * self.epochs
        out = [MlflowCurves(self.tracker, self.run_id, offset, fold, self.n)]
        if self.progress is not None:
            out.append(self.progress.at(offset))
        self.reporter = None
        if not self.space.fold_wise:
            self.reporter = Reporter(self.trial, offset, self.n * self.epochs, self.space.direction)
            out.append(self.reporter)
        return out

    def done(self, i: int, fold: int, result) -> bool:
        """Log the fold's artifacts, record the last step and the value reported, report the fold's score
        to a fold-wise pruner; True when the trial is pruned (`pruned_at` says where)."""
        _fold_artifacts(self.artifacts, result, fold, self.n)
        self.steps = i * self.epochs + len(result.history)
        if self.reporter is not None:
            self.reported = self.reporter.best
        if self.reporter is not None and self.reporter.pruned_at is not None:
            self.pruned_at = self.reporter.pruned_at
        elif self.space.fold_wise:  # Wilcoxon: one value per fold, compared fold by fold
            self.reported = result.score
            self.trial.report(result.score, fold)
            if self.trial.should_prune():
                self.pruned_at = fold
        return self.pruned_at is not None


def _device_tag(worker: dict, device: str) -> str:
    """Where the trial runs, by the machine's own GPU ids (a pinned worker sees its GPU as cuda:0)."""
    if worker.get("gpu") is not None:
        return f"cuda:{worker['gpu']}"
    if device == "auto":
        from trainer.fit import resolve_device

        return str(resolve_device(device))
    return device


def run_trial(trial: optuna.Trial, space: SearchSpace, ctx: TrialContext, tracker: Tracker,
              worker: dict, sampled: dict, retry_of: int | None = None) -> tuple[optuna.trial.TrialState, float | None, str]:
    """Run one trial whose values were sampled already (`sampled`, from `space.suggest`: the
    worker's loop checks them against the study first); returns (state, value, message) for
    `study.tell`. Never raises for a trial's own failure: it is recorded as FAILED in both Optuna
    and MLflow and the study goes on. `retry_of`: the number of the trial this one retries (its
    worker died).

    Raises:
        optuna.exceptions.UpdateFinishedTrialError: the trial was finished by someone else
            meanwhile (its heartbeat went stale); the caller closes its run (`loop._taken_over`).

    MLflow calls are few on purpose (each is a store transaction): the run with its tags, one batch
    of params and sampled values, one batch of metrics per epoch, the artifacts folder once at the
    end (pruned and failed runs included), one final batch."""
    base = space.config(ctx.settings)
    run_name = f"{space.name}-t{trial.number}"
    run_id = tracker.start_run(ctx.experiment_id, run_name, parent_run_id=ctx.parent_run_id, tags={
        **ctx.tags, "study": ctx.study_name, "trial": trial.number, "worker": worker.get("name", "0"),
        "device": _device_tag(worker, base.device), "spinesweep.folds": ",".join(map(str, space.folds)),
        **({"smoke": "true"} if ctx.settings.smoke else {}),
        **({"retry_of": retry_of} if retry_of is not None else {}),
    })
    trial.set_user_attr("mlflow_run_id", run_id)
    trial.set_user_attr("worker", worker.get("name", "0"))
    tracker.start_system_metrics(run_id)  # stopped by tracker.end_run, whatever the trial's end
    t0 = time.perf_counter()
    progress = None
    artifacts = Path(tempfile.mkdtemp(prefix=f"spinesweep-t{trial.number}-artifacts-"))
    try:
        cfg = space.config(ctx.settings, sampled)
        # val_points: which points the validation crops (so every score of the run) were cut around:
        # labelled, or a localiser's out-of-fold points (data.val_points_file; its URI in val_points_source)
        tracker.log_batch(run_id, params=cfg.to_flat(), tags={**{f"optuna.{k}": v for k, v in trial.params.items()},
                                                              **_points_tag(cfg)})
        (artifacts / names.CONFIG).write_text(cfg.to_yaml())
        progress = TrialProgress(f"[{worker.get('name', '0')}] trial {trial.number}",
                                 len(space.folds) * cfg.optim.epochs, position=int(worker.get("index", 0)),
                                 direction=space.direction)
        hooks = TrialFolds(trial, space, tracker, run_id, cfg.optim.epochs, artifacts, progress)
        folds = evaluate_folds(cfg, space.folds, hooks, fit_fn=ctx.fit_fn, prefix=f"spinesweep-t{trial.number}-")
        if folds.stopped:
            return _pruned(trial, tracker, run_id, hooks, artifacts)
        total = folds.score()
        if not math.isfinite(total.score):
            raise FloatingPointError(f"final score is {total.score}")
        prior = folds.prior_score
        results = folds.results
        final = {"score": total.score, "prior_score": prior, "score_to_prior": total.score / prior,
                 **{f"final_{k}": v for k, v in total.groups.items()},
                 "best_epoch": results[-1].best_epoch, "trial_seconds": time.perf_counter() - t0}
        folds.oof.to_csv(artifacts / names.OOF, index=False)
        folds.solution.to_csv(artifacts / names.SOLUTION, index=False)  # the labels: calibration, ensembles
        tracker.log_artifacts(run_id, artifacts)
        # one step after every epoch's: MLflow's latest `score` is the trial's (the runs table, filters)
        tracker.log_batch(run_id, metrics=final, step=len(space.folds) * cfg.optim.epochs + 1, tags={
            "pretrained_loaded": results[0].pretrained_loaded,
            "environment.device_name": results[0].environment["device_name"],
            "environment.amp": results[0].environment["amp"],
            "environment.cpu": results[0].environment.get("cpu", ""),
            "environment.cpu_capability": results[0].environment.get("cpu_capability", "")})
        trial.set_user_attr("prior_score", prior)
        tracker.end_run(run_id, "FINISHED")
        return optuna.trial.TrialState.COMPLETE, total.score, f"score {total.score:.4f}"
    except optuna.exceptions.UpdateFinishedTrialError:
        raise  # finished elsewhere: not this trial's failure (nothing may be written to it now)
    except Exception as e:
        reason = f"{type(e).__name__}: {e}"
        trial.set_user_attr("error", reason[:2000])
        try:
            (artifacts / "error.txt").write_text(traceback.format_exc())
            tracker.log_artifacts(run_id, artifacts)
            tracker.fail_run(run_id, reason)
        except Exception:
            pass  # the tracking store itself failed: Optuna still records the reason
        return optuna.trial.TrialState.FAIL, None, reason
    finally:
        if progress is not None:
            progress.close()
        shutil.rmtree(artifacts, ignore_errors=True)


def _points_tag(cfg) -> dict:
    """A classifier run's ``val_points`` tag (``labelled`` or ``oof``); none for a localiser."""
    return {"val_points": cfg.data.val_points} if cfg.task == "classify" else {}


def _pruned(trial, tracker: Tracker, run_id: str, hooks: TrialFolds, artifacts: Path):
    """A pruned trial's run carries the value Optuna keeps for it (its last report: the best score
    so far) as its `score`, one step after its last epoch, tagged pruned."""
    step = hooks.pruned_at
    trial.set_user_attr("pruned_at_step", step)
    tracker.log_artifacts(run_id, artifacts)  # what the pruned trial did is kept
    tracker.log_batch(run_id, metrics={"score": hooks.reported}, step=hooks.steps + 1,
                      tags={"pruned_at_step": step, "pruned": "true"})
    tracker.end_run(run_id, "KILLED")
    return optuna.trial.TrialState.PRUNED, None, f"pruned at step {step}"


def _fold_artifacts(folder: Path, result, fold: int, n_folds: int) -> None:
    (folder / names.fold_file("confusion", fold, n_folds)).write_text(json.dumps(result.confusion, indent=2))
    pd.DataFrame(result.history).to_csv(folder / names.fold_file("history", fold, n_folds), index=False)
    (folder / names.AUGMENT).write_text(json.dumps(result.augment_pipeline, indent=2, default=str))
    for name, table in result.tables.items():  # the task's own per-fold tables (a localiser's points)
        table.to_csv(folder / names.fold_table(name, fold), index=False)
    if result.checkpoint and Path(result.checkpoint).exists():
        shutil.move(result.checkpoint, folder / names.fold_file("checkpoint", fold, n_folds))

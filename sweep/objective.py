"""One trial: sample a config, train the space's folds with `trainer.fit`, report to Optuna every
epoch (or every fold for fold-wise pruners), log everything to the trial's MLflow child run.

The trainer stays ignorant of both: this module hands it two plain callbacks.
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

import optuna
import pandas as pd

from trainer.config import TrainConfig
from trainer.metric import score_groups

from .space import SearchSpace
from .tracking import Tracker


@dataclass
class TrialContext:
    """What every trial of one invocation shares (picklable: workers receive it)."""

    space_path: str
    study_name: str
    storage_url: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    base_overrides: dict  # fixed values + smoke caps + --set + data_dir, applied over the space
    smoke: bool
    caps: dict  # --smoke caps and --set values: applied after sampling, and never sampled
    tags: dict  # invocation-wide tags: git commit, data fingerprint, versions, space hash


class _Reporter:
    """fit callback: report to Optuna at a global step and ask the pruner.

    The value reported is the fold's best score so far: what the trial would be worth if it
    stopped now (the best epoch is kept), and far less noisy than one epoch's score, so the pruner
    can decide early. Nothing is pruned at the trial's last step, where stopping saves nothing."""

    __name__ = "optuna_pruner"

    def __init__(self, trial: optuna.Trial, offset: int, per_epoch: bool, last_step: int, direction: str):
        self.trial, self.offset, self.per_epoch, self.last_step = trial, offset, per_epoch, last_step
        self.better = min if direction == "minimize" else max
        self.best: float | None = None
        self.pruned_at: int | None = None

    def __call__(self, epoch: int, metrics: dict) -> bool:
        if not self.per_epoch:
            return False
        step = self.offset + epoch
        self.best = metrics["score"] if self.best is None else self.better(self.best, metrics["score"])
        self.trial.report(self.best, step)
        if step < self.last_step and self.trial.should_prune():
            self.pruned_at = step
            return True
        return False


class _MlflowCurves:
    """fit callback: per-epoch metrics into the child run, at the same global step."""

    __name__ = "mlflow_curves"

    def __init__(self, tracker: Tracker, run_id: str, offset: int, fold: int, n_folds: int):
        self.tracker, self.run_id, self.offset, self.fold, self.n_folds = tracker, run_id, offset, fold, n_folds

    def __call__(self, epoch: int, metrics: dict) -> None:
        m = {k: v for k, v in metrics.items() if k != "epoch"}
        if self.n_folds > 1:
            m.update({f"fold{self.fold}_{k}": v for k, v in list(m.items())})
        self.tracker.log_metrics(self.run_id, m, step=self.offset + epoch)


def _device_tag(worker: dict, device: str) -> str:
    """Where the trial runs, by the machine's own GPU ids (a pinned worker sees its GPU as cuda:0)."""
    if worker.get("gpu") is not None:
        return f"cuda:{worker['gpu']}"
    if device == "auto":
        from trainer.fit import resolve_device

        return str(resolve_device(device))
    return device


def run_trial(trial: optuna.Trial, space: SearchSpace, ctx: TrialContext, tracker: Tracker,
              worker: dict, fit_fn=None) -> tuple[optuna.trial.TrialState, float | None, str]:
    """Run one trial; returns (state, value, message) for `study.tell`. Never raises for a trial's
    own failure: it is recorded as FAILED in both Optuna and MLflow and the study goes on.

    MLflow calls are few on purpose (each is a store transaction): the run with its tags, one batch
    of params and sampled values, one batch of metrics per epoch, the artifacts folder once at the
    end (pruned and failed runs included), one final batch."""
    if fit_fn is None:
        from trainer.fit import fit as fit_fn

    base = TrainConfig().with_overrides(ctx.base_overrides)
    system_attrs = trial.study._storage.get_trial_system_attrs(trial._trial_id)
    run_name = f"{space.name}-t{trial.number}"
    run_id = tracker.start_run(ctx.experiment_id, run_name, parent_run_id=ctx.parent_run_id, tags={
        **ctx.tags, "study": ctx.study_name, "trial": trial.number, "worker": worker.get("name", "0"),
        "device": _device_tag(worker, base.device), "spinesweep.folds": ",".join(map(str, space.folds)),
        **({"smoke": "true"} if ctx.smoke else {}),
        **({"retry_of": system_attrs["failed_trial"]} if "failed_trial" in system_attrs else {}),
    })
    trial.set_user_attr("mlflow_run_id", run_id)
    trial.set_user_attr("worker", worker.get("name", "0"))
    tracker.start_system_metrics(run_id)  # stopped by tracker.end_run, whatever the trial's end
    t0 = time.perf_counter()
    artifacts = Path(tempfile.mkdtemp(prefix=f"spinesweep-t{trial.number}-artifacts-"))
    try:
        sampled = space.suggest(trial, base, pinned=set(ctx.caps))
        cfg = base.with_overrides(sampled).with_overrides(ctx.caps)
        tracker.log_batch(run_id, params=cfg.to_flat(), tags={f"optuna.{k}": v for k, v in trial.params.items()})
        (artifacts / "config.yaml").write_text(cfg.to_yaml())
        oofs, solutions, results = [], [], []
        for i, fold in enumerate(space.folds):
            fold_cfg = cfg.with_overrides({"data.fold": fold,
                                           "output_dir": tempfile.mkdtemp(prefix=f"spinesweep-t{trial.number}-")})
            offset = i * cfg.optim.epochs
            reporter = _Reporter(trial, offset, per_epoch=not space.fold_wise,
                                 last_step=len(space.folds) * cfg.optim.epochs, direction=space.direction)
            curves = _MlflowCurves(tracker, run_id, offset, fold, len(space.folds))
            result = fit_fn(fold_cfg, callbacks=[curves, reporter])
            results.append(result)
            oofs.append(result.oof)
            solutions.append(result.solution)
            _fold_artifacts(artifacts, result, fold, len(space.folds))
            shutil.rmtree(fold_cfg.output_dir, ignore_errors=True)
            if reporter.pruned_at is not None:
                return _pruned(trial, tracker, run_id, reporter.pruned_at, artifacts)
            if space.fold_wise:  # Wilcoxon: one value per fold, compared fold by fold
                trial.report(result.score, fold)
                if trial.should_prune():
                    return _pruned(trial, tracker, run_id, fold, artifacts)
        oof, solution = pd.concat(oofs, ignore_index=True), pd.concat(solutions, ignore_index=True)
        total = score_groups(solution, oof)
        if not math.isfinite(total.score):
            raise FloatingPointError(f"final score is {total.score}")
        prior = sum(r.prior_score for r in results) / len(results)
        final = {"score": total.score, "prior_score": prior, "score_to_prior": total.score / prior,
                 **{f"final_{k}": v for k, v in total.groups.items()},
                 "best_epoch": results[-1].best_epoch, "trial_seconds": time.perf_counter() - t0}
        oof.to_csv(artifacts / "oof.csv", index=False)
        solution.to_csv(artifacts / "solution.csv", index=False)  # the labels: calibration, ensembles
        tracker.log_artifacts(run_id, artifacts)
        tracker.log_batch(run_id, metrics=final, step=len(space.folds) * cfg.optim.epochs, tags={
            "pretrained_loaded": results[0].pretrained_loaded,
            "environment.device_name": results[0].environment["device_name"],
            "environment.amp": results[0].environment["amp"]})
        trial.set_user_attr("prior_score", prior)
        tracker.end_run(run_id, "FINISHED")
        return optuna.trial.TrialState.COMPLETE, total.score, f"score {total.score:.4f}"
    except Exception as e:
        reason = f"{type(e).__name__}: {e}"
        trial.set_user_attr("error", reason[:2000])
        try:
            (artifacts / "error.txt").write_text(traceback.format_exc())
            tracker.log_artifacts(run_id, artifacts)
            tracker.set_tags(run_id, {"error": reason[:5000]})
            tracker.end_run(run_id, "FAILED")
        except Exception:
            pass  # the tracking store itself failed: Optuna still records the reason
        return optuna.trial.TrialState.FAIL, None, reason
    finally:
        shutil.rmtree(artifacts, ignore_errors=True)


def _pruned(trial, tracker: Tracker, run_id: str, step: int, artifacts: Path):
    trial.set_user_attr("pruned_at_step", step)
    tracker.log_artifacts(run_id, artifacts)  # what the pruned trial did is kept
    tracker.set_tags(run_id, {"pruned_at_step": step})
    tracker.end_run(run_id, "KILLED")
    return optuna.trial.TrialState.PRUNED, None, f"pruned at step {step}"


def _fold_artifacts(folder: Path, result, fold: int, n_folds: int) -> None:
    suffix = f"_fold{fold}" if n_folds > 1 else ""
    (folder / f"confusion{suffix}.json").write_text(json.dumps(result.confusion, indent=2))
    pd.DataFrame(result.history).to_csv(folder / f"history{suffix}.csv", index=False)
    (folder / "augment_pipeline.json").write_text(json.dumps(result.augment_pipeline, indent=2, default=str))
    if result.checkpoint and Path(result.checkpoint).exists():
        shutil.move(result.checkpoint, folder / f"checkpoint{suffix}.pt")

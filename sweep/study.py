"""A study, end to end: `run_study` checks everything a user can get wrong before any trial,
then `launch` creates the Optuna study, the MLflow experiment and this invocation's parent run
once and starts workers that only attach (`workers.py`, each running `loop.py`). When the workers
have stopped, the launcher closes what they left RUNNING; before it starts, it closes the parent
runs of dead invocations of the study (`heartbeat.close_dead_parents`).

Modules by concept: `storage.py` (opening the Optuna storage), `quota.py` (N is the study's
total), `heartbeat.py`, `loop.py` (the ask/tell loop), `workers.py` (planning and starting
worker processes), this module (the launcher).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import sys
import time
from dataclasses import dataclass
from typing import Callable

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from .heartbeat import close_dead_parents, launcher_tags, parent_heartbeat
from .loop import worker_loop, worker_main
from .objective import TrialContext
from .quota import TrialQuota
from .sampling import DUPLICATE_OF
from .space import SearchSpace, Settings, load_space
from .storage import HEARTBEAT_INTERVAL, StudyError, make_storage
from .tracking import VIEW_TAG, Tracker, redact, runs_view
from .trials import is_legacy
from .workers import WorkerJob, WorkerSpec, plan_workers, run_processes

__all__ = ["StudyOutcome", "launch", "run_study"]


def run_study(space: str | SearchSpace, n_trials: int | None = None, *, data: str | None = None,
              study_name: str | None = None, storage: str | None = None, tracking_uri: str | None = None,
              workers: int | None = None, gpus: str | None = None, trials_per_gpu: int | None = None,
              smoke: bool = False, pinned: dict[str, str] | None = None, resume: bool = False,
              timeout: float | None = None, heartbeat: int | None = None, fit_fn: Callable | None = None,
              log: Callable[[str], None] = print) -> "StudyOutcome":
    """Run (or resume, or join) an Optuna study of a search space: what `optuna-run SPACE` does,
    as a library call (`bench/study.py` and the tests call it too).

    Everything a user can get wrong is checked before the first trial, in this order: the space
    file, the worker flags, the `pinned` (``--set``) keys, the data folder (the default phantom is
    built on first use) and its label CSVs, the study name, the stores.

    Args:
        space: a name in ``search_spaces/``, a YAML path, or a loaded `SearchSpace`.
        n_trials: the study's total number of trials (default: the space's `n_trials`).
        data: the RSNA-format data folder (default: ``$SPINESWEEP_DATA`` or ``data/phantom``).
        study_name: default the space's name (``SPACE-smoke`` with `smoke`).
        storage, tracking_uri: Optuna storage URL and MLflow tracking URI (default: the working
            folder's, `workspace.resolve_storage` / `resolve_tracking_uri`).
        workers, gpus, trials_per_gpu: the worker processes (`workers.plan_workers`).
        smoke: cap every trial (1 epoch, 32 px, 8 studies, timm's test_efficientnet).
        pinned: config values pinned as ``{"optim.lr": "3e-4"}`` (never sampled).
        resume: add to an existing study (N stays the study's total).
        timeout: seconds after which no new trial is asked for (default: the space's).
        heartbeat: the storage heartbeat interval in seconds (default ``$SPINESWEEP_HEARTBEAT`` or 20).
        fit_fn: what trains a fold (default `trainer.fit.fit`; same signature and `FitResult`).
        log: where the one header line goes.

    Returns:
        The `StudyOutcome` (the study, its parent run, trial counts, seconds).
    Raises:
        UserError: any of the checks above (its message names the file, flag, key or value).
    """
    from trainer.data.cache import data_fingerprint
    from trainer.data.layout import Layout

    from .tracking import git_commit, package_versions
    from .workspace import check_stores, check_study_name, ensure_data, resolve_storage, resolve_tracking_uri

    for flag, value in (("--n-trials", n_trials), ("--timeout", timeout)):
        if value is not None and not value > 0:
            raise StudyError(f"{flag} must be positive (got {value:g})")
    space = space if isinstance(space, SearchSpace) else load_space(space)  # validates before any trial
    plan = plan_workers(gpus, workers, trials_per_gpu)
    settings = Settings(smoke=smoke, pinned=dict(pinned or {}))
    space.config(settings)  # validates the pinned keys before any trial starts
    _check_weights(space, settings, log)
    study_name = check_study_name(study_name or (f"{space.name}-smoke" if smoke else space.name))
    check_stores(storage, tracking_uri)  # before the data: building the phantom takes seconds
    data_dir = ensure_data(data)
    settings = dataclasses.replace(settings, data_dir=str(data_dir))
    n_trials = n_trials if n_trials is not None else space.n_trials
    layout = Layout(data_dir)
    layout.validate()  # the label CSVs, once: no trial starts on data `data check` rejects
    tags = {"git_commit": git_commit(), "data_fingerprint": data_fingerprint(layout),
            "space_file": space.path.name, "space_file_hash": space.file_hash,
            **{f"version.{k}": v for k, v in package_versions().items()}}
    settings, points_tags = resolve_val_points(space, settings, layout, resolve_tracking_uri(tracking_uri), log)
    tags.update(points_tags)
    log(f"study {study_name}: space {space.name} ({space.path}), {n_trials} trials, "
        f"{len(plan)} worker(s) [{', '.join(w.name for w in plan)}], data {data_dir}")
    return launch(space, n_trials, study_name=study_name, storage_url=resolve_storage(storage),
                  tracking_uri=resolve_tracking_uri(tracking_uri), settings=settings, resume=resume, workers=plan,
                  timeout=timeout or space.timeout, tags=tags, heartbeat=heartbeat, fit_fn=fit_fn)


def resolve_val_points(space: SearchSpace, settings: Settings, layout, tracking_uri: str,
                       log: Callable[[str], None] = print) -> tuple[Settings, dict]:
    """``data.val_points: oof`` made ready before the first trial, once per invocation: a
    ``runs:/`` or ``models:/`` value of ``data.val_points_file`` (a localiser trial or a registered
    localiser) is downloaded here (`localize.oof_points_file`, into the cache folder's
    ``val_points/``) and pinned as that local file, so workers read a file and never MLflow; then
    the file is checked to hold every validation study of the space's folds. Returns the settings
    (with the local file pinned) and the tags every trial's run gets (``val_points_source``: the URI).

    Raises:
        UserError: the URI cannot be resolved, or the file is unreadable or lacks validation
            studies (`trainer.data.samples.ValPointsError`, naming them)."""
    from trainer.data.cache import data_fingerprint, default_cache_dir
    from trainer.data.samples import fold_coordinates
    from trainer.training import train_val_split

    from .localize import is_points_uri, oof_points_file

    base = space.config(settings)
    value = base.data.val_points_file
    tags: dict = {}
    if value and is_points_uri(value):
        local = oof_points_file(value, tracking_uri, default_cache_dir(base.data.cache_dir) / "val_points")
        log(f"data.val_points_file: {value} -> {local}")
        settings = dataclasses.replace(settings, pinned={**settings.pinned, "data.val_points_file": str(local)})
        tags["val_points_source"] = value
        base = space.config(settings)
    may_be_oof = base.data.val_points == "oof" or any(
        p.key == "data.val_points" and "oof" in p.choices for p in space.params
        if p.key not in settings.never_sampled(space))
    if may_be_oof and base.data.val_points_file:
        cache, fingerprint = default_cache_dir(base.data.cache_dir), data_fingerprint(layout)
        for fold in space.folds:
            cfg = base.with_overrides({"data.fold": fold})
            _, val_ids = train_val_split(layout, cfg, cache, fingerprint)
            fold_coordinates(layout, val_ids, cfg.data.val_points_file, fold)
    return settings, tags


def _check_weights(space: SearchSpace, settings: Settings, log: Callable[[str], None]) -> None:
    """Pretrained weights for every backbone the space can sample, found once before the first
    trial (`trainer.models.weights`): no trial downloads, or fails for want of them.

    Raises:
        PretrainedUnavailable: `model.pretrained` is true and a backbone has no weights (one line
            listing them and the ways to provide them).
    """
    from trainer.models.weights import check_pretrained

    base = space.config(settings)
    sampled = {p.key: p for p in space.params if p.key not in settings.never_sampled(space)}
    backbones = sampled["model.backbone"].choices if "model.backbone" in sampled else (base.model.backbone,)
    pretrained = sampled["model.pretrained"].choices if "model.pretrained" in sampled else (base.model.pretrained,)
    check_pretrained(backbones, pretrained, base.model.weights_dir, warn=log)  # auto: said once, here


@dataclass
class StudyOutcome:
    """What a study invocation leaves: the study, this invocation's MLflow parent run (None when
    nothing was run: the study already held its N trials), its experiment, the tracking store,
    the trials per state (``LEGACY``: imported from the manual log) and the wall time in seconds."""

    study: optuna.Study
    parent_run_id: str | None  # None: nothing was run (the study already held its trials)
    experiment_id: str
    tracking_uri: str
    counts: dict
    seconds: float


def launch(space: SearchSpace, n_trials: int, *, study_name: str, storage_url: str, tracking_uri: str,
           settings: Settings, resume: bool, workers: list[WorkerSpec],
           timeout: float | None, tags: dict, heartbeat: int | None = None,
           fit_fn: Callable | None = None) -> StudyOutcome:
    """Create (or load, with `resume`) the study, its MLflow experiment and this invocation's
    parent run, once, then run `workers` until the study holds `n_trials` counted trials or
    `timeout` seconds pass. Inputs are taken as checked (`run_study` checks them).

    Raises:
        StudyError: the study exists and `resume` is not set, or the storage cannot be opened.
        KeyboardInterrupt: Ctrl-C (the parent run ends KILLED; running trials are failed).
    """
    started = time.time()
    storage = make_storage(storage_url, tracking_uri, heartbeat)
    try:
        study = optuna.create_study(study_name=study_name, storage=storage, direction=space.direction,
                                    sampler=space.make_sampler(), pruner=space.make_pruner(),
                                    load_if_exists=resume or _only_legacy(storage, study_name))
    except optuna.exceptions.DuplicatedStudyError:
        raise StudyError(f"study {study_name!r} already exists in {redact(storage_url)}: pass --resume to add to it "
                         f"(N is the study's total), or choose another --study-name") from None
    _check_distributions(space, study, settings)
    study.set_user_attr("space", space.name)
    study.set_user_attr("space_file_hash", space.file_hash)
    tracker = Tracker(tracking_uri, create=True)
    experiment_id = tracker.ensure_experiment(study_name)
    close_dead_parents(tracker, experiment_id, study_name, log=lambda line: print(line, flush=True))
    with contextlib.suppress(Exception):  # a convenience of the UI: never a reason to stop a study
        tracker.set_experiment_tag(experiment_id, VIEW_TAG, json.dumps(
            runs_view([p.key for p in space.params], space.direction)))
    trials = study.get_trials(deepcopy=False)
    if TrialQuota(storage_url, study_name, n_trials).full(trials) and not any(
            t.state == TrialState.RUNNING for t in trials):
        # a no-op resume: the study already holds its N trials; no empty parent run in MLflow
        held = len(TrialQuota.counted(trials))
        print(f"study {study_name} already holds {held} counted trial{'s' * (held != 1)} (--n-trials {n_trials} is "
              f"the study's total, not a number to add): nothing to run; a --n-trials above {held} adds to it",
              flush=True)
        return StudyOutcome(study, None, experiment_id, tracking_uri, _counts(trials), time.time() - started)
    beat = heartbeat or HEARTBEAT_INTERVAL
    parent = tracker.start_run(experiment_id, f"{study_name}-{time.strftime('%Y%m%d-%H%M%S')}", tags={
        **tags, **launcher_tags(beat), "study": study_name, "space": space.name, "n_trials": n_trials, "storage": redact(storage_url),
        "workers": ",".join(w.name for w in workers), "command": redact(" ".join(sys.argv)),
        **({"smoke": "true"} if settings.smoke else {}),
    })
    ctx = TrialContext(space_path=str(space.path), study_name=study_name, storage_url=storage_url,
                       tracking_uri=tracking_uri, experiment_id=experiment_id, parent_run_id=parent,
                       settings=settings, tags=tags, fit_fn=fit_fn)
    deadline = started + timeout if timeout else None
    status = "FINISHED"
    try:
        jobs = [WorkerJob(ctx, n_trials, deadline, w, started, heartbeat) for w in workers]
        alive = functools.partial(parent_heartbeat, tracker, parent, beat)  # a later launcher sees it live
        if len(jobs) == 1 and jobs[0].spec.gpu is None:
            with alive():
                worker_loop(jobs[0])
        else:
            run_processes(jobs, worker_main, while_running=alive)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except Exception:
        status = "FAILED"
        raise
    finally:
        with contextlib.suppress(Exception):  # never mask why the study stopped
            _close_orphan_runs(tracker, experiment_id, parent, study, storage)
        with contextlib.suppress(Exception):
            tracker.end_run(parent, status)
    return StudyOutcome(study, parent, experiment_id, tracking_uri, _counts(study.get_trials(deepcopy=False)),
                        time.time() - started)


def _counts(trials) -> dict:
    """Trials per state; ``SKIPPED``: sampled duplicates (failed, not run), ``LEGACY``: imported."""
    skipped = [DUPLICATE_OF in t.user_attrs for t in trials]
    counts = {s.name: sum(t.state == s and not is_legacy(t) and not d for t, d in zip(trials, skipped))
              for s in TrialState}
    counts["SKIPPED"] = sum(skipped)
    counts["LEGACY"] = sum(is_legacy(t) for t in trials)
    return counts


def _check_distributions(space: SearchSpace, study: optuna.Study, settings: Settings) -> None:
    """A resumed (or joined) study must sample every parameter from the distribution its trials
    were drawn from: Optuna fails every new trial of a changed categorical (choices added or
    removed), a changed kind or a changed log scale. Checked once, before any trial; a changed
    range of a float or int is allowed (Optuna accepts it).

    Raises:
        StudyError: one line naming the parameter, the stored and the new distribution, and what to do.
    """
    never = settings.never_sampled(space)
    new = {p.key: p.distribution() for p in space.params if p.key not in never}
    stored: dict[str, optuna.distributions.BaseDistribution] = {}
    for t in study.get_trials(deepcopy=False):
        stored.update({k: d for k, d in t.distributions.items() if k in new})
    for key, old in stored.items():
        try:
            optuna.distributions.check_distribution_compatibility(old, new[key])
        except ValueError:
            raise StudyError(
                f"search space {space.path.name} changed under study {study.study_name!r}: {key}: the study holds "
                f"{old}, the space now says {new[key]}; a study's distributions cannot change (every new trial "
                f"would fail): start a new study (--study-name NEW) or restore the space") from None


def _only_legacy(storage: RDBStorage, study_name: str) -> bool:
    """A study that holds nothing but trials imported from the manual log (a warm start), or
    nothing at all, is continued without --resume."""
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return False
    trials = study.get_trials(deepcopy=False)
    return all(is_legacy(t) for t in trials)


def _close_orphan_runs(tracker: Tracker, experiment_id: str, parent: str, study: optuna.Study,
                      storage: RDBStorage | None = None) -> None:
    """Once this invocation's workers have all stopped, none of its trials or child runs stays
    RUNNING: a worker killed mid-trial (a native crash, the out-of-memory killer) leaves both
    behind. Its trial is failed, saying so, and its run closed. Trials of other launchers on the
    same study have other parent runs and are left alone (their heartbeats cover them)."""
    runs = tracker.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent}' "
                               "and attributes.status = 'RUNNING'", max_results=1000)
    if not runs:
        return
    try:
        trials = {t.number: t for t in study.get_trials(deepcopy=False)}
        study_id = storage.get_study_id_from_name(study.study_name) if storage else None
    except Exception:  # the storage is gone: close the runs at least
        trials, study_id = {}, None
    for r in runs:
        number = r.data.tags.get("trial")
        trial = trials.get(int(number)) if number and number.isdigit() else None
        if trial is not None and trial.state == TrialState.RUNNING and study_id is not None:
            error = f"its worker ({r.data.tags.get('worker', '?')}) died during the trial"
            with contextlib.suppress(Exception):
                trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
                storage.set_trial_user_attr(trial_id, "error", error)
                storage.set_trial_user_attr(trial_id, "worker_died", True)  # not counted: --resume replaces it
                storage.set_trial_state_values(trial_id, TrialState.FAIL)
        else:
            error = "closed by the launcher: its trial had ended"
        tracker.fail_run(r.info.run_id, error)

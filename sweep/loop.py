"""A worker's ask/tell loop: ask for a trial under the quota, run it with its heartbeat, tell the
result, print one line, until the study holds its N trials or the deadline passes.

It stands in for `Study.optimize`, whose `n_trials` counts per process (see `quota.py`). Two ends
are handled here because only the worker sees them: Ctrl-C mid-trial (the trial is failed, not
counted, and its parameters enqueued again) and a storage that stops answering (the trial's run is
closed and the study stops with one line).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import time
import warnings

import optuna
from optuna.storages import fail_stale_trials
from optuna.trial import TrialState

from .heartbeat import heartbeat
from .objective import run_trial
from .progress import say
from .quota import TrialQuota
from .sampling import DUPLICATE_OF, SAMPLER_SEED, Exhaustion, duplicate_of, next_stream, stream_seed
from .space import load_space
from .storage import STORAGE_ERRORS, StudyError, make_storage, unreachable
from .tracking import Tracker
from .trials import best_trial
from .workers import WorkerJob

__all__ = ["worker_loop", "worker_main"]

# this loop records heartbeats itself (heartbeat.py); Optuna warns regardless
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def worker_loop(job: WorkerJob) -> int:
    """Ask, run, tell until the study holds `job.n_trials` counted trials (or the deadline passes).

    Returns:
        The number of trials this worker ran.
    Raises:
        StudyError: the storage stopped answering (the message says to --resume later).
        KeyboardInterrupt: Ctrl-C (the running trial was failed and its parameters enqueued again).
    """
    spec, ctx = job.spec, job.ctx
    if spec.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = spec.gpu
    import torch

    torch.set_num_threads(max(1, spec.threads))
    space = load_space(ctx.space_path)
    storage = make_storage(ctx.storage_url, ctx.tracking_uri, job.heartbeat)
    quota = TrialQuota(ctx.storage_url, ctx.study_name, job.n_trials)
    tracker = Tracker(ctx.tracking_uri)
    if spec.device != "auto":  # the worker's device (--set device=... still wins)
        ctx = dataclasses.replace(ctx, settings=dataclasses.replace(ctx.settings, device=spec.device))
    worker = {"name": spec.name, "gpu": spec.gpu, "index": spec.index}
    never = ctx.settings.never_sampled(space)
    base = space.config(ctx.settings)
    exhaustion = Exhaustion(space, never)
    ran = 0
    try:
        study_id = storage.get_study_id_from_name(ctx.study_name)
        with quota.lock(storage):  # this process's own seed stream (sampling.py): no host repeats another
            seed = stream_seed(space.sampler.get("seed"), next_stream(storage, study_id))
        study = optuna.load_study(study_name=ctx.study_name, storage=storage, sampler=space.make_sampler(seed),
                                  pruner=space.make_pruner())
        while job.deadline is None or time.time() < job.deadline:
            fail_stale_trials(study)
            trial = quota.ask(study, storage)
            if trial is None:
                # a trial still running elsewhere may belong to a dead worker: wait until its
                # heartbeat goes stale (it is then failed and retried) or it finishes
                if any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False)):
                    time.sleep(min(5.0, storage.get_heartbeat_interval() or 5))
                    continue
                break
            try:
                # through the storage's public API (an Optuna Trial keeps its id private)
                trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
                asked = storage.get_trial(trial_id)
                retry_of = asked.system_attrs.get("failed_trial")
                sampled = space.suggest(trial, base, never=never)
                trial.set_user_attr(SAMPLER_SEED, seed)
                if not _enqueued(asked):  # a retry, a re-run or a warm start repeats on purpose
                    same = duplicate_of(trial.number, trial.params, study.get_trials(deepcopy=False))
                    if same is not None:
                        trial.set_user_attr(DUPLICATE_OF, same.number)
                        study.tell(trial, state=TrialState.FAIL)
                        say(f"trial {trial.number:>3} skipped: its parameters repeat trial {same.number} "
                            f"({same.state.name.lower()}); not counted, sampling again  [{spec.name}]")
                        why = exhaustion.reason(study.get_trials(deepcopy=False))
                        if why:
                            say(f"[{spec.name}] stops sampling: {why}")
                            break
                        continue
                exhaustion.reset()
                with heartbeat(storage, trial_id):
                    state, value, message = run_trial(trial, space, ctx, tracker, worker, sampled, retry_of=retry_of)
                told = study.tell(trial, value if state == TrialState.COMPLETE else None,
                                  state=None if state == TrialState.COMPLETE else state, skip_if_finished=True)
                if told.state != state:  # someone finished it first (see _taken_over)
                    raise optuna.exceptions.UpdateFinishedTrialError(f"trial {trial.number} is {told.state.name}")
            except KeyboardInterrupt:
                _interrupted(study, trial, tracker)
                raise
            except optuna.exceptions.UpdateFinishedTrialError:
                _taken_over(trial, tracker, spec.name)
                continue
            except STORAGE_ERRORS as e:  # the storage went away: nothing can be recorded
                _storage_lost(trial, tracker, ctx.storage_url, e)
            ran += 1
            _progress(study, trial.number, state, value, message, spec.name, job.started)
    except STORAGE_ERRORS as e:  # between trials (ask, count, tell)
        raise StudyError(unreachable(ctx.storage_url, e)) from None
    return ran


def _enqueued(trial: optuna.trial.FrozenTrial) -> bool:
    """A trial whose parameters were given (`enqueue_trial`: a heartbeat retry, an interrupted
    trial's re-run, a warm start), not sampled: never a duplicate."""
    return "fixed_params" in trial.system_attrs


def _taken_over(trial: optuna.Trial, tracker: Tracker, worker: str) -> None:
    """The trial was finished by someone else while this worker ran it: its heartbeat went stale
    (the worker was stopped, e.g. SIGSTOP, or cut off from the storage longer than the grace
    period) and another worker or host failed it and enqueued its retry. Its result is dropped,
    its MLflow run closed FAILED saying why, and the worker takes the next trial: nothing here
    failed for real, so nothing changes the launcher's exit code."""
    reason = (f"trial {trial.number} was finished elsewhere while this worker ran it (its heartbeat went "
              f"stale: the worker was stopped or cut off past the grace period; it was failed and retried); "
              f"its result is dropped")
    say(f"trial {trial.number:>3} taken over: {reason}  [{worker}]")
    run_id = None
    with contextlib.suppress(Exception):
        run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id:
        with contextlib.suppress(Exception):
            tracker.fail_run(run_id, reason)


def worker_main(job: WorkerJob) -> None:
    """A worker process's entry point: `worker_loop`, with Ctrl-C as exit code 130 and a
    `StudyError` as one line on stderr and exit code 2."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        worker_loop(job)
    except KeyboardInterrupt:
        sys.exit(130)
    except StudyError as e:
        print(f"optuna-run: error: [{job.spec.name}] {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def _storage_lost(trial: optuna.Trial, tracker: Tracker, url: str, error: Exception):
    """The Optuna storage stopped answering mid-study: close the trial's MLflow run and stop with
    one clear line (the trial itself is failed by the heartbeat once the storage is back, and
    retried by --resume)."""
    reason = unreachable(url, error)
    run_id = None
    with contextlib.suppress(Exception):
        run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id is None:  # the storage cannot say: find the run by its tags
        with contextlib.suppress(Exception):
            runs = tracker.search_runs([tracker.get_experiment(trial.study.study_name).experiment_id],
                                       f"tags.trial = '{trial.number}' and attributes.status = 'RUNNING'",
                                       max_results=1)
            run_id = runs[0].info.run_id if runs else None
    if run_id:
        with contextlib.suppress(Exception):
            tracker.fail_run(run_id, reason)
    raise StudyError(reason) from None


def _interrupted(study: optuna.Study, trial: optuna.Trial, tracker: Tracker) -> None:
    """Ctrl-C mid-trial: the trial is FAILED (marked `interrupted`, so it does not count towards
    N), its parameters are enqueued again so that `--resume` runs them first, and its MLflow run
    is closed as KILLED."""
    with contextlib.suppress(Exception):
        trial.set_user_attr("interrupted", True)
        study.tell(trial, state=TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"retry_of_interrupted": trial.number})
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id:
        with contextlib.suppress(Exception):
            tracker.fail_run(run_id, "interrupted (Ctrl-C); its parameters were enqueued again", "KILLED")


def _fmt_elapsed(s: float) -> str:
    m, s = divmod(int(s), 60)
    return f"{m}m{s:02d}s"


def _progress(study, number, state, value, message, worker, started) -> None:
    best = best_trial(study)  # the study's own trials: an imported log entry is never "best" here
    best_s = "best -" if best is None else f"best {best.value:.4f} (t{best.number})"
    score = f"score {value:.4f}" if value is not None else message[:80]
    line = (f"trial {number:>3} {state.name:<8} {score:<28} {best_s:<22} {_fmt_elapsed(time.time() - started)}"
            f"  [{worker}]")
    say(line)

"""Studies: the launcher and its workers.

The launcher creates the Optuna study, the MLflow experiment and this invocation's parent run
once, then starts workers that only attach: one process per GPU (pinned with
CUDA_VISIBLE_DEVICES), or K CPU processes with the cores split between them, or the launcher's
own process when there is one worker.

`n_trials` is the study's total, exactly, however many workers or hosts share it: a worker takes a
lock, counts the trials, and asks for a new one only while the count is below N. A trial whose
worker died is failed by the RDB heartbeat and retried (its retry takes its place in the count),
and its MLflow run is closed as FAILED.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
import sqlalchemy.exc
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import TrialState

from trainer.errors import UserError

from .objective import TrialContext, run_trial
from .progress import say, share_lock
from .space import SearchSpace, Settings, load_space
from .tracking import VIEW_TAG, Tracker, redact, runs_view
from .trials import is_legacy

DEFAULT_STORAGE = "sqlite:///studies.db"
# this loop records heartbeats itself (see _heartbeat); Optuna warns regardless
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# what the storage raises when its database goes away (Optuna wraps some commit failures)
STORAGE_ERRORS = (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError)
HEARTBEAT_INTERVAL = int(os.environ.get("SPINESWEEP_HEARTBEAT", "20"))  # seconds


class StudyError(UserError):
    """The study cannot start (storage, GPUs, existing study...); the message says why."""


# ---------------------------------------------------------------- storage


def make_storage(url: str, tracking_uri: str | None = None, heartbeat: int | None = None) -> RDBStorage:
    """An RDB storage with a busy timeout for SQLite and a heartbeat whose stale trials are retried
    and have their MLflow runs closed."""
    from .stores import creation_lock, normalize_db_url

    shown = redact(url)
    url = normalize_db_url(url)
    engine_kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    interval = heartbeat or HEARTBEAT_INTERVAL
    retry = RetryHeartbeatStaleTrialCallback(max_retry=3)

    def on_stale(study, trial):
        retry(study, trial)
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id and tracking_uri:
            with contextlib.suppress(Exception):
                t = Tracker(tracking_uri)
                t.set_tags(run_id, {"error": "worker died (Optuna heartbeat went stale); the trial was retried"})
                t.end_run(run_id, "FAILED")

    try:
        with creation_lock(url, "optuna"):  # launchers on a fresh storage create its tables one at a time
            return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=interval,
                              grace_period=interval * 3, heartbeat_stale_trial_callback=on_stale)
    except Exception as e:
        first = redact(str(e).splitlines()[0] if str(e) else "")
        raise StudyError(f"storage {shown} cannot be opened: {type(e).__name__}: {first}") from None


class TrialQuota:
    """Counts a study's trials (a stale trial that was retried is replaced by its retry) and
    serialises "count, then ask" across processes."""

    def __init__(self, storage_url: str, study_name: str):
        from .stores import normalize_db_url, sqlite_path

        self.url, self.study_name = normalize_db_url(storage_url), study_name
        db = sqlite_path(storage_url)
        self.lock_path = db.with_name(f".{db.name}.{study_name}.lock") if db else Path(f".spinesweep.{study_name}.lock")

    @contextlib.contextmanager
    def lock(self, storage: RDBStorage | None = None):
        from .stores import advisory_lock, file_lock

        if self.url.startswith("postgresql") and storage is not None:
            with advisory_lock(storage.engine, self.study_name):  # every host sharing the database sees it
                yield
            return
        with file_lock(self.lock_path):
            yield

    @staticmethod
    def counted(trials) -> list:
        """Trials that count towards N: not those replaced by a retry (a dead worker's, or an
        interrupted one's), not those whose worker died (failed by the launcher), not imported
        legacy ones."""
        retried = {t.system_attrs.get("failed_trial") for t in trials}
        return [t for t in trials if t.number not in retried and not is_legacy(t)
                and not t.user_attrs.get("interrupted") and not t.user_attrs.get("worker_died")]

    def used(self, study: optuna.Study) -> tuple[int, int]:
        """(trials that count towards N, of which waiting to be run)."""
        trials = self.counted(study.get_trials(deepcopy=False))
        return len(trials), sum(t.state == TrialState.WAITING for t in trials)


# ---------------------------------------------------------------- workers


@dataclass
class WorkerSpec:
    index: int
    name: str
    device: str  # the trainer's device: "cuda" (pinned GPU), "cpu" (--workers), "auto" (neither flag)
    gpu: str | None  # the id for CUDA_VISIBLE_DEVICES
    threads: int


def _fmt_elapsed(s: float) -> str:
    m, s = divmod(int(s), 60)
    return f"{m}m{s:02d}s"


def worker_loop(ctx: TrialContext, n_trials: int, deadline: float | None, spec: WorkerSpec, started: float,
                heartbeat: int | None = None) -> int:
    """Ask, run, tell until the study holds n_trials counted trials. Returns trials run here."""
    if spec.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = spec.gpu
    import torch

    torch.set_num_threads(max(1, spec.threads))
    space = load_space(ctx.space_path)
    storage = make_storage(ctx.storage_url, ctx.tracking_uri, heartbeat)
    sampler = space.make_sampler(seed_offset=spec.index)  # one seed per worker, reproducible
    study = optuna.load_study(study_name=ctx.study_name, storage=storage, sampler=sampler,
                              pruner=space.make_pruner())
    quota = TrialQuota(ctx.storage_url, ctx.study_name)
    tracker = Tracker(ctx.tracking_uri)
    if spec.device != "auto":  # the worker's device (--set device=... still wins)
        ctx = dataclasses.replace(ctx, settings=dataclasses.replace(ctx.settings, device=spec.device))
    worker = {"name": spec.name, "gpu": spec.gpu, "index": spec.index}
    try:
        return _loop(study, storage, quota, tracker, space, ctx, worker, n_trials, deadline, spec, started)
    except STORAGE_ERRORS as e:  # between trials (ask, count, tell)
        raise StudyError(_unreachable(ctx.storage_url, e)) from None


def _unreachable(url: str, error: Exception) -> str:
    return (f"storage {redact(url)} unreachable: {type(error).__name__}: {redact(str(error).splitlines()[0])}; "
            "the study stopped (resume it with --resume once the storage is back)")


@contextlib.contextmanager
def _heartbeat(storage: RDBStorage, trial_id: int):
    """Record the trial's heartbeat every interval while it runs, as Study.optimize does, except
    that an unreachable storage is not a traceback from a background thread: the beat is skipped
    (and resumed if the storage comes back); the trial's own next write meets the same outage and
    stops the study with one clear line."""
    interval = storage.get_heartbeat_interval()
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat():
        while True:
            with contextlib.suppress(*STORAGE_ERRORS):
                storage.record_heartbeat(trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"optuna-heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _loop(study, storage, quota, tracker, space, ctx, worker, n_trials, deadline, spec, started) -> int:
    ran = 0
    study_id = storage.get_study_id_from_name(study.study_name)
    while deadline is None or time.time() < deadline:
        fail_stale_trials(study)
        with quota.lock(storage):
            used, waiting = quota.used(study)
            full = used >= n_trials and not waiting
            if not full:
                trial = study.ask()
        if full:
            # a trial still running elsewhere may belong to a dead worker: wait until its heartbeat
            # goes stale (it is then failed and retried) or it finishes
            if any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False)):
                time.sleep(min(5.0, storage.get_heartbeat_interval() or 5))
                continue
            break
        try:
            # through the storage's public API (an Optuna Trial keeps its id private)
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            retry_of = storage.get_trial(trial_id).system_attrs.get("failed_trial")
            with _heartbeat(storage, trial_id):
                state, value, message = run_trial(trial, space, ctx, tracker, worker, retry_of=retry_of)
            if state == TrialState.COMPLETE:
                study.tell(trial, value)
            else:
                study.tell(trial, state=state)
        except KeyboardInterrupt:
            _interrupted(study, trial, tracker)
            raise
        except STORAGE_ERRORS as e:  # the storage went away: nothing can be recorded
            _storage_lost(trial, tracker, ctx.storage_url, e)
        ran += 1
        _progress(study, trial.number, state, value, message, spec.name, started)
    return ran


def _storage_lost(trial: optuna.Trial, tracker: Tracker, url: str, error: Exception):
    """The Optuna storage stopped answering mid-study: close the trial's MLflow run and stop with
    one clear line (the trial itself is failed by the heartbeat once the storage is back, and
    retried by --resume)."""
    reason = _unreachable(url, error)
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
            tracker.set_tags(run_id, {"error": reason[:5000]})
            tracker.end_run(run_id, "FAILED")
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
            tracker.set_tags(run_id, {"error": "interrupted (Ctrl-C); its parameters were enqueued again"})
            tracker.end_run(run_id, "KILLED")


def _progress(study, number, state, value, message, worker, started) -> None:
    try:
        best = study.best_trial
        best_s = f"best {best.value:.4f} (t{best.number})"
    except ValueError:
        best_s = "best -"
    score = f"score {value:.4f}" if value is not None else message[:80]
    line = (f"trial {number:>3} {state.name:<8} {score:<28} {best_s:<22} {_fmt_elapsed(time.time() - started)}"
            f"  [{worker}]")
    say(line)


def _worker_entry(*args) -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        worker_loop(*args)
    except KeyboardInterrupt:
        sys.exit(130)
    except StudyError as e:
        print(f"optuna-run: error: [{args[3].name}] {e}", file=sys.stderr, flush=True)
        sys.exit(2)


# ---------------------------------------------------------------- launcher


def gpu_ids_available() -> list[str]:
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return []
    r = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True)
    return [line.strip() for line in r.stdout.splitlines() if line.strip()] if r.returncode == 0 else []


def plan_workers(gpus: str | None, workers: int | None, trials_per_gpu: int | None = None,
                 available: list[str] | None = None) -> list[WorkerSpec]:
    """The worker processes of a study. `--gpus 0,1` one per GPU; `--trials-per-gpu K` K on each
    (every visible GPU when --gpus is not given), as does repeating an id (`--gpus 0,0,1,1`);
    `--workers K` K CPU processes; none of them one worker in this process. Cores are split
    evenly between workers (their torch threads, which also size their DataLoaders)."""
    if workers is not None and (gpus or trials_per_gpu):
        raise StudyError("--workers (CPU processes) and --gpus/--trials-per-gpu exclude each other")
    if trials_per_gpu is not None and trials_per_gpu < 1:
        raise StudyError(f"--trials-per-gpu must be >= 1, got {trials_per_gpu}")
    have = gpu_ids_available() if available is None else available
    if trials_per_gpu and not gpus:
        if not have:
            raise StudyError(f"--trials-per-gpu {trials_per_gpu}: this machine has no GPU (nvidia-smi finds none); "
                             "for several trials at once on the CPU use --workers K")
        gpus = ",".join(have)
    cores = len(os.sched_getaffinity(0))
    if gpus:
        wanted = [g.strip() for g in gpus.split(",") if g.strip()]
        missing = sorted({g for g in wanted if g not in have})
        if missing:
            raise StudyError(f"--gpus {gpus}: no GPU with id {', '.join(missing)} on this machine "
                             f"(found: {', '.join(have) or 'none'})")
        slots = [g for g in wanted for _ in range(trials_per_gpu or 1)]
        threads = max(1, cores // len(slots))
        seen: dict[str, int] = {}
        specs = []
        for i, g in enumerate(slots):
            seen[g] = seen.get(g, 0) + 1
            shared = slots.count(g) > 1
            specs.append(WorkerSpec(i, f"gpu{g}" + (f".{seen[g]}" if shared else ""), "cuda", g, threads))
        return specs
    if workers is None:  # one worker in this process, on the GPU if one is visible (TrainConfig.device)
        return [WorkerSpec(0, "main", "auto", None, cores)]
    if workers < 1:
        raise StudyError(f"--workers must be >= 1, got {workers}")
    threads = max(1, cores // workers)
    return [WorkerSpec(i, f"cpu{i}", "cpu", None, threads) for i in range(workers)]


@dataclass
class StudyOutcome:
    study: optuna.Study
    parent_run_id: str | None  # None: nothing was run (the study already held its trials)
    experiment_id: str
    tracking_uri: str
    counts: dict
    seconds: float


def launch(space: SearchSpace, n_trials: int, *, study_name: str, storage_url: str, tracking_uri: str,
           settings: Settings, resume: bool, workers: list[WorkerSpec],
           timeout: float | None, tags: dict, heartbeat: int | None = None) -> StudyOutcome:
    started = time.time()
    storage = make_storage(storage_url, tracking_uri, heartbeat)
    try:
        study = optuna.create_study(study_name=study_name, storage=storage, direction=space.direction,
                                    sampler=space.make_sampler(), pruner=space.make_pruner(),
                                    load_if_exists=resume or _only_legacy(storage, study_name))
    except optuna.exceptions.DuplicatedStudyError:
        raise StudyError(f"study {study_name!r} already exists in {redact(storage_url)}: pass --resume to add to it "
                         f"(N is the study's total), or choose another --study-name") from None
    study.set_user_attr("space", space.name)
    study.set_user_attr("space_file_hash", space.file_hash)
    tracker = Tracker(tracking_uri)
    experiment_id = tracker.ensure_experiment(study_name)
    with contextlib.suppress(Exception):  # a convenience of the UI: never a reason to stop a study
        tracker.set_experiment_tag(experiment_id, VIEW_TAG, json.dumps(
            runs_view([p.key for p in space.params], space.direction)))
    trials = study.get_trials(deepcopy=False)
    if len(TrialQuota.counted(trials)) >= n_trials and not any(
            t.state in (TrialState.WAITING, TrialState.RUNNING) for t in trials):
        # a no-op resume: the study already holds its N trials; no empty parent run in MLflow
        print(f"study {study_name} already holds its {n_trials} trials: nothing to run "
              f"(a larger --n-trials adds to it)", flush=True)
        return StudyOutcome(study, None, experiment_id, tracking_uri, _counts(trials), time.time() - started)
    parent = tracker.start_run(experiment_id, f"{study_name}-{time.strftime('%Y%m%d-%H%M%S')}", tags={
        **tags, "study": study_name, "space": space.name, "n_trials": n_trials, "storage": redact(storage_url),
        "workers": ",".join(w.name for w in workers), "command": redact(" ".join(sys.argv)),
        **({"smoke": "true"} if settings.smoke else {}),
    })
    ctx = TrialContext(space_path=str(space.path), study_name=study_name, storage_url=storage_url,
                       tracking_uri=tracking_uri, experiment_id=experiment_id, parent_run_id=parent,
                       settings=settings, tags=tags)
    deadline = started + timeout if timeout else None
    status = "FINISHED"
    try:
        if len(workers) == 1 and workers[0].gpu is None:
            worker_loop(ctx, n_trials, deadline, workers[0], started, heartbeat)
        else:
            _run_processes(ctx, n_trials, deadline, workers, started, heartbeat)
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
    counts = {s.name: sum(t.state == s and not is_legacy(t) for t in trials) for s in TrialState}
    counts["LEGACY"] = sum(is_legacy(t) for t in trials)
    return counts


def _only_legacy(storage: RDBStorage, study_name: str) -> bool:
    """A study that holds nothing but trials imported from the manual log (a warm start), or
    nothing at all, is continued without --resume."""
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return False
    trials = study.get_trials(deepcopy=False)
    return all(is_legacy(t) for t in trials)


def _run_processes(ctx, n_trials, deadline, workers, started, heartbeat) -> None:
    import multiprocessing as mp

    import torch

    # fork: workers start at once (no re-import). A process that already initialised CUDA (a
    # notebook or test that trained on the GPU before launching) cannot fork a CUDA user: spawn.
    method = "spawn" if torch.cuda.is_initialized() else "fork"
    share_lock()  # the workers' progress bars draw under one lock
    procs = [mp.get_context(method).Process(target=_worker_entry, name=w.name,
                                            args=(ctx, n_trials, deadline, w, started, heartbeat))
             for w in workers]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        for p in procs:  # they got the same SIGINT from the terminal; give them a moment
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
        raise
    if any(p.exitcode in (130, -signal.SIGINT) for p in procs):
        raise KeyboardInterrupt  # Ctrl-C reached the workers before (or instead of) the launcher
    crashed = [f"{p.name} {exit_reason(p.exitcode)}" for p in procs if p.exitcode not in (0, None)]
    if crashed and len(crashed) == len(procs):
        raise StudyError(f"every worker stopped with an error: {'; '.join(crashed)} (their trials are marked "
                         f"failed; `optuna-run runs {ctx.study_name}` shows each trial's error)")
    if crashed:
        print(f"warning: worker(s) {'; '.join(crashed)}; the others finished the study",
              file=sys.stderr, flush=True)


def exit_reason(code: int) -> str:
    """A worker's exit code in words: a negative code is the signal that killed it."""
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        native = " (a crash in native code)" if name in ("SIGSEGV", "SIGBUS", "SIGABRT", "SIGILL", "SIGFPE") else ""
        return f"was killed by {name}{native}"
    return f"exited with code {code}"


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
            tracker.set_tags(r.info.run_id, {"error": error})
        else:
            tracker.set_tags(r.info.run_id, {"error": "closed by the launcher: its trial had ended"})
        tracker.end_run(r.info.run_id, "FAILED")

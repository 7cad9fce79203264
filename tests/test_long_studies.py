"""Long studies that are stopped, resumed and joined (issue 22): no repeated trials, a changed
space refused before any trial, a trial taken over elsewhere skipped cleanly, one best trial, and
runs whose config is longer than MLflow's param limit reproduced exactly. Trained by
`tests/fakes.quick_fit` (these are lifecycle tests: real training adds nothing here)."""
from __future__ import annotations

import argparse
import threading
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from fakes import quick_fit
from sweep.study import StudyOutcome, run_study
from sweep.tracking import default_tracking_uri

SPACE = """\
direction: minimize
fixed:
  data.conditions: [spinal_canal_stenosis]
  optim.epochs: 2
  model.pretrained: false
params:
  optim.lr: {{type: float, low: 1.0e-4, high: 1.0e-2, log: {log}}}
  model.head: {{type: categorical, choices: [{heads}]}}
sampler: {sampler}
pruner: {{name: none}}
folds: [0]
n_trials: 4
"""


def write_space(folder: Path, name: str = "long", heads: str = "linear, attention", log: str = "true",
                sampler: str = "{name: random, seed: 0}", extra: str = "") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(SPACE.format(heads=heads, log=log, sampler=sampler) + extra)
    return path


@pytest.fixture
def workdir(quick_copy):
    """A working folder whose stores exist already (a copy of the session's quick study): a new
    study in it costs its trials, not the creation of MLflow's schema."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return quick_copy


def quiet(**kw):
    return dict(log=lambda line: None, fit_fn=quick_fit, **kw)


def load(name: str = "long") -> optuna.Study:
    return optuna.load_study(study_name=name, storage="sqlite:///studies.db")


def runs(experiment: str = "long"):
    client = MlflowClient(default_tracking_uri())
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=1000)


def distinct_params(study: optuna.Study) -> list[dict]:
    """The parameter sets of the trials that ran (not those skipped as duplicates)."""
    ran = [t for t in study.trials if "duplicate_of" not in t.user_attrs]
    keys = [tuple(sorted(t.params.items())) for t in ran]
    assert len(keys) == len(set(keys)), [(t.number, t.params) for t in ran]
    return [t.params for t in ran]


# ------------------------------------------------------------------ 6. one best trial


def test_the_summary_and_progress_lines_name_the_study_s_own_best_trial(quick_copy, phantom_dir, capsys):
    """A warm start's imported entry scores better than every trial run here: the summary, the
    progress lines and promote all name the study's own best (trial 3), the entry is shown as
    imported."""
    from spinesweep.cli import _print_summary
    from sweep.promote import _study_trial

    s = load("quick")
    s.add_trial(optuna.trial.create_trial(
        params={"optim.lr": 1e-3, "model.head": "linear"}, value=0.01,
        distributions={"optim.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
                       "model.head": optuna.distributions.CategoricalDistribution(["linear", "attention", "lstm"])},
        user_attrs={"source": "legacy", "legacy_entry": "exp127"}))
    outcome = run_study(str(quick_copy / "quick.yaml"), 5, data=str(phantom_dir), resume=True, **quiet())
    progress = capsys.readouterr().out
    line = [x for x in progress.splitlines() if x.startswith("trial   5")][0]
    assert "(t3)" in line and "0.0100" not in line
    _print_summary(outcome, argparse.Namespace(tracking_uri=None))
    out = capsys.readouterr().out
    assert "best trial 3: score" in out
    assert "imported from the manual log" in out and "exp127" in out and "best trial 4" not in out
    assert _study_trial(load("quick"), None, None).number == 3  # promote's pick


# ------------------------------------------------------------------ 7. long params


def long_ops(n: int = 80) -> str:
    op = ("{name: CoarseDropout, p: 0.0, num_holes_range: [1, 2], hole_height_range: [0.05, 0.1], "
          "hole_width_range: [0.05, 0.1], fill: 0}")
    return "  augment.ops: [" + ", ".join([op] * n) + "]\n"


def test_a_run_whose_config_passes_the_param_limit_reproduces(workdir, phantom_dir):
    """The flat `augment.ops` is over 6,000 characters: the param is cut and marked, the run's
    config.yaml artifact holds it whole, and reproduce reads that (quick_fit: the same score exactly)."""
    from sweep.query import reproduce

    path = write_space(workdir, heads="linear")
    path.write_text(path.read_text().replace("  optim.epochs: 2\n", "  optim.epochs: 2\n" + long_ops()))
    run_study(str(path), 1, data=str(phantom_dir), **quiet())
    trial = load().trials[0]
    run = MlflowClient(default_tracking_uri()).get_run(trial.user_attrs["mlflow_run_id"])
    assert len(run.data.params["augment.ops"]) == 6000
    assert run.data.tags["spinesweep.params_cut"] == "augment.ops"
    out = reproduce(run.info.run_id, log=lambda line: None, fit_fn=quick_fit)
    assert out["score"] == out["logged_score"] == trial.value


@pytest.mark.slow
def test_a_long_config_run_reproduces_with_real_training(workdir, phantom_dir):
    from spinesweep.cli import main
    from sweep.query import reproduce

    path = write_space(workdir, heads="linear")
    path.write_text(path.read_text().replace("  optim.epochs: 2\n", "  optim.epochs: 2\n" + long_ops()))
    assert main([str(path), "--smoke", "--n-trials", "1", "--data", str(phantom_dir)]) == 0
    trial = load("long-smoke").trials[0]
    out = reproduce(trial.user_attrs["mlflow_run_id"], log=lambda line: None)
    assert abs(out["score"] - out["logged_score"]) < 1e-6


# ------------------------------------------------------------------ 1. no repeated trials

SAMPLERS = {"random": "{name: random, seed: 0}", "tpe": "{name: tpe, seed: 0, n_startup_trials: 8}"}


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_resume_never_repeats_a_trial(sampler, workdir, phantom_dir):
    """`--n-trials 2`, then `--n-trials 4 --resume`: a seeded sampler in a new process must not
    restart its stream; every trial records the seed that drew it."""
    path = write_space(workdir, sampler=SAMPLERS[sampler])
    run_study(str(path), 2, data=str(phantom_dir), **quiet())
    run_study(str(path), 4, data=str(phantom_dir), resume=True, **quiet())
    s = load()
    assert len(distinct_params(s)) == 4
    seeds = [t.user_attrs["sampler_seed"] for t in s.trials]
    assert seeds[:2] == [0, 0] and len(set(seeds[2:])) == 1 and seeds[2] != 0  # one stream per process
    assert QUOTA_COUNTED(s) == 4


def QUOTA_COUNTED(study):
    from sweep.quota import TrialQuota

    return len(TrialQuota.counted(study.get_trials()))


def _launcher(path, data, workers):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    run_study(str(path), 6, data=data, workers=workers, resume=True, **quiet())


@pytest.mark.slow  # about 11 s on 2 shared cores: two launchers of two worker processes each
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_two_launchers_at_once_never_repeat_each_other(sampler, workdir, phantom_dir):
    """Two launchers (as on two hosts) of two worker processes each, started at once on one
    storage (`--workers 2 --resume --n-trials 6` twice): both have a worker 0 and 1, and still no
    two trials share parameters; the study holds exactly 6."""
    import multiprocessing as mp

    path = write_space(workdir, sampler=SAMPLERS[sampler])
    run_study(str(path), 1, data=str(phantom_dir), **quiet())  # the study exists: the launchers join it
    procs = [mp.get_context("fork").Process(target=_launcher, args=(path, str(phantom_dir), 2))
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    s = load()
    assert QUOTA_COUNTED(s) == 6 and len(distinct_params(s)) == 6
    assert 0 not in [t.user_attrs["sampler_seed"] for t in s.trials[1:]]  # the launchers drew from new streams


def test_a_sampled_duplicate_is_skipped_not_run_and_not_counted(workdir, phantom_dir, capsys):
    """A parameter set the study already holds is skipped (one line, no MLflow run, not counted
    towards N); an enqueued trial with the same parameters is run (a retry is no duplicate); a
    space with nothing left to sample stops the study instead of looping."""
    path = write_space(workdir, heads="linear, attention")
    path.write_text(path.read_text().replace("  optim.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n",
                                             ""))  # two parameter sets in all
    s = optuna.create_study(study_name="long", storage="sqlite:///studies.db")
    s.enqueue_trial({"model.head": "linear"})
    s.enqueue_trial({"model.head": "linear"})  # enqueued: run although it repeats trial 0
    outcome = run_study(str(path), 5, data=str(phantom_dir), resume=True, log=print, fit_fn=quick_fit)
    out = capsys.readouterr().out
    s = load()
    ran = [t for t in s.trials if "duplicate_of" not in t.user_attrs]
    skipped = [t for t in s.trials if "duplicate_of" in t.user_attrs]
    assert [t.params["model.head"] for t in ran] == ["linear", "linear", "attention"]
    assert skipped and all(t.state == optuna.trial.TrialState.FAIL for t in skipped)
    assert QUOTA_COUNTED(s) == 3 and outcome.counts["SKIPPED"] == len(skipped)
    assert f"trial {skipped[0].number:>3} skipped: its parameters repeat trial" in out
    assert "every parameter set of the space is in the study" in out
    mlflow_trials = {r.data.tags.get("trial") for r in runs() if "trial" in r.data.tags}
    assert mlflow_trials == {str(t.number) for t in ran}


# ------------------------------------------------------------------ 2. a changed space


@pytest.mark.parametrize("change,message", [
    (dict(heads="linear, attention, gru"), "model.head: the study holds CategoricalDistribution(choices=('linear', "
                                           "'attention')), the space now says CategoricalDistribution(choices=("
                                           "'linear', 'attention', 'gru'))"),
    (dict(log="false"), "optim.lr: the study holds FloatDistribution(high=0.01, log=True, low=0.0001, step=None), "
                        "the space now says FloatDistribution(high=0.01, log=False, low=0.0001, step=None)"),
])
def test_resume_with_a_changed_distribution_is_refused_before_any_trial(change, message, workdir, phantom_dir,
                                                                          capsys):
    from spinesweep.cli import main

    path = write_space(workdir)
    run_study(str(path), 2, data=str(phantom_dir), **quiet())
    before = len(runs())
    write_space(workdir, **change)
    assert main([str(path), "--n-trials", "4", "--resume", "--data", str(phantom_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "--study-name" in err[0] and "restore" in err[0], err
    assert len(load().trials) == 2 and len(runs()) == before  # no trial, no parent run


# ------------------------------------------------------------------ 3. a trial finished elsewhere


def stalling_fit(storage_url: str, study_name: str, marker: Path):
    """quick_fit, but the first trial stalls after its first epoch past the heartbeat's grace
    period, and meanwhile another connection does what another worker or host does then: Optuna's
    `fail_stale_trials` fails it and enqueues its retry. The stalled trial then goes on and
    reports, as a worker continued after SIGSTOP does."""
    import time

    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials

    def other_host(epoch, metrics):
        if epoch == 1 and not marker.exists():
            marker.touch()
            other = RDBStorage(storage_url, heartbeat_interval=1, grace_period=1,
                               heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback())
            study = optuna.load_study(study_name=study_name, storage=other)
            deadline = time.time() + 60
            # no heartbeat for longer than the other side's 1 s grace period (the worker beats every
            # 60 s): it fails the trial as soon as it sees it stale, however loaded the machine
            while study.trials[0].state == optuna.trial.TrialState.RUNNING and time.time() < deadline:
                time.sleep(0.1)
                fail_stale_trials(study)

    def fit(cfg, callbacks=(), progress=None):
        return quick_fit(cfg, callbacks=[other_host, *callbacks])

    return fit


def test_a_trial_finished_elsewhere_is_closed_and_the_worker_goes_on(workdir, phantom_dir, capsys):
    path = write_space(workdir, heads="linear")
    fit = stalling_fit("sqlite:///studies.db", "long", workdir / "stalled")
    outcome = run_study(str(path), 2, data=str(phantom_dir), heartbeat=60, log=print, fit_fn=fit)
    out = capsys.readouterr().out
    s = load()
    assert [t.state.name for t in s.trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert s.trials[1].system_attrs.get("failed_trial") == 0 and s.trials[1].params == s.trials[0].params
    assert "trial   0 taken over: trial 0 was finished elsewhere" in out and "Traceback" not in out
    run = MlflowClient(default_tracking_uri()).get_run(s.trials[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and "finished elsewhere" in run.data.tags["error"]
    parent = MlflowClient(default_tracking_uri()).get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"  # nothing failed for real


# ------------------------------------------------------------------ 5. parent runs of dead invocations


def test_a_launcher_closes_the_parent_runs_of_dead_invocations(workdir, phantom_dir, capsys):
    """Parent runs left RUNNING by launchers that died: one on another host whose heartbeat is
    stale, one on this host whose process is gone; a live one on another host is left alone."""
    import os
    import socket
    import time

    from sweep.heartbeat import launcher_tags
    from sweep.tracking import Tracker

    path = write_space(workdir, heads="linear")
    run_study(str(path), 1, data=str(phantom_dir), **quiet())
    tracker = Tracker()
    exp = tracker.get_experiment("long").experiment_id
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)  # a pid that ran on this host and is gone
    here = {**launcher_tags(2), "spinesweep.pid": str(child)}
    elsewhere = {**launcher_tags(2), "spinesweep.host": "gpu-host-7", "spinesweep.pid": "4242"}
    dead = {"here": {**here}, "stale": {**elsewhere, "spinesweep.heartbeat": f"{time.time() - 60:.0f}"}}
    live = {**elsewhere, "spinesweep.heartbeat": f"{time.time():.0f}"}
    ids = {k: tracker.start_run(exp, k, tags={"study": "long", "n_trials": 2, **t}) for k, t in
           {**dead, "live": live}.items()}
    run_study(str(path), 2, data=str(phantom_dir), resume=True, log=print, fit_fn=quick_fit)
    out = capsys.readouterr().out
    for k in dead:
        r = tracker.get_run(ids[k])
        assert r.info.status == "KILLED" and "invocation ended without closing its run" in r.data.tags["error"]
        assert f"closed the parent run {ids[k]} of a dead invocation" in out
    assert "pid 4242 on gpu-host-7) sent no heartbeat for 6" in tracker.get_run(ids["stale"]).data.tags["error"]
    assert f"(pid {child} on this host, {socket.gethostname()}) is gone" in tracker.get_run(ids["here"]).data.tags["error"]
    assert tracker.get_run(ids["live"]).info.status == "RUNNING"

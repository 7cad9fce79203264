"""Workers and launchers that die or are stopped: SIGKILL of a worker mid-trial (SQLite and
PostgreSQL), Ctrl-C of the launcher and --resume, launchers racing on a fresh storage."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest
from mlflow.tracking import MlflowClient

from sweep.tracking import default_tracking_uri

REPO = Path(__file__).resolve().parents[2]
DONE = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def start(args, cwd, **kw):
    env = dict(os.environ, SPINESWEEP_HEARTBEAT="2", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "spinesweep", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def unpruned_demo(workdir) -> str:
    """The demo space without its pruner, as a file in `workdir` (its study is still demo-smoke):
    a trial the test means to kill or interrupt mid-way must not end early, pruned, before the
    signal (on a fast machine a pruned trial ends within a second of its first epoch)."""
    text = (REPO / "search_spaces" / "demo.yaml").read_text()
    text = re.sub(r"^pruner: .*$", "pruner: {name: none}", text, flags=re.M)
    path = workdir / "demo.yaml"
    path.write_text(text)
    return str(path)


def sqlalchemy_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://")


def wait_for_running(proc, storage: str, name: str, k: int, timeout: float = 240) -> list:
    """Until k trials run with their MLflow run started; returns the launcher's worker processes."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[0]
        try:
            running = [t for t in optuna.load_study(study_name=name, storage=sqlalchemy_url(storage)).trials
                       if t.state == optuna.trial.TrialState.RUNNING and "mlflow_run_id" in t.user_attrs]
        except Exception:
            continue
        kids = psutil.Process(proc.pid).children()
        if len(running) >= k and len(kids) >= (2 if k > 1 else 0):
            return kids
    raise AssertionError("the trials did not start in time")


def child_runs(experiment, uri=None):
    client = MlflowClient(uri or default_tracking_uri())
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], "tags.trial != ''", max_results=1000)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_sigkill_of_a_worker_mid_trial(engine, phantom_dir, workdir, request):
    """The killed worker's trial is failed by the heartbeat and retried; the study still ends with
    N finished trials, and its MLflow run is closed as FAILED."""
    storage = "sqlite:///studies.db"
    if engine == "postgresql":
        storage = request.getfixturevalue("postgres").create_db("optuna_kill")
    proc = start([unpruned_demo(workdir), "--smoke", "--n-trials", "4", "--workers", "2", "--storage", storage,
                  "--data", str(phantom_dir), "--set", "optim.epochs=8", "--set", "data.max_studies=40"], workdir)
    # both workers mid-trial with their MLflow runs started, so the one killed has a run to close
    # (one killed between ask and its run has none: a race of the test, not a fault to check)
    kids = wait_for_running(proc, storage, "demo-smoke", 2)
    kids[0].send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out
    s = optuna.load_study(study_name="demo-smoke", storage=sqlalchemy_url(storage))
    finished = [t for t in s.trials if t.state in DONE]
    failed = [t for t in s.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(finished) == 4 and len(failed) == 1, [(t.number, t.state) for t in s.trials]
    assert [t.system_attrs.get("failed_trial") for t in s.trials].count(failed[0].number) == 1  # retried once
    runs = child_runs("demo-smoke")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    dead = [r for r in runs if r.info.run_id == failed[0].user_attrs["mlflow_run_id"]][0]
    assert dead.info.status == "FAILED" and "heartbeat" in dead.data.tags["error"]
    assert "was killed by SIGKILL; the others finished the study" in out


@pytest.mark.slow
def test_every_worker_killed_says_why_and_leaves_nothing_running(phantom_dir, workdir):
    """No heartbeat is left to notice: the launcher fails the dead workers' trials (not counted
    towards N) and closes their runs, says which signal killed them, and --resume finishes."""
    space = unpruned_demo(workdir)
    proc = start([space, "--smoke", "--n-trials", "3", "--workers", "2", "--data", str(phantom_dir),
                  "--set", "optim.epochs=100", "--set", "data.max_studies=40"], workdir)
    kids = wait_for_running(proc, "sqlite:///studies.db", "demo-smoke", 2)
    for k in kids:
        k.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("optuna-run: error: every worker stopped with an error: cpu") and last.count("was killed by SIGKILL") == 2
    assert "Traceback" not in out
    s = optuna.load_study(study_name="demo-smoke", storage="sqlite:///studies.db")
    died = [t for t in s.trials if t.user_attrs.get("worker_died")]
    assert len(died) == 2 and all(t.state == optuna.trial.TrialState.FAIL for t in died)
    assert all("died during the trial" in t.user_attrs["error"] for t in died)
    assert not [t for t in s.trials if t.state == optuna.trial.TrialState.RUNNING]
    runs = child_runs("demo-smoke")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert {r.info.run_id for r in runs if r.info.status == "FAILED"} >= {t.user_attrs["mlflow_run_id"] for t in died}
    # the dead trials do not count: --resume runs three more
    proc = start([space, "--smoke", "--n-trials", "3", "--resume", "--data", str(phantom_dir)], workdir)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out
    s = optuna.load_study(study_name="demo-smoke", storage="sqlite:///studies.db")
    assert len([t for t in s.trials if t.state in DONE]) == 3


@pytest.mark.slow
def test_ctrl_c_of_the_launcher_then_resume(phantom_dir, workdir):
    """Ctrl-C reaches the launcher and its workers (one process group, as from a terminal): the
    running trials are FAILED and marked interrupted, their parameters enqueued again, their runs
    closed KILLED; --resume then finishes the study where it was."""
    space = unpruned_demo(workdir)  # trials that cannot end before the Ctrl-C
    proc = start([space, "--smoke", "--n-trials", "3", "--workers", "2", "--data", str(phantom_dir),
                  "--set", "optim.epochs=100", "--set", "data.max_studies=40"], workdir, start_new_session=True)
    wait_for_running(proc, "sqlite:///studies.db", "demo-smoke", 2)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    s = optuna.load_study(study_name="demo-smoke", storage="sqlite:///studies.db")
    interrupted = [t for t in s.trials if t.user_attrs.get("interrupted")]
    waiting = [t for t in s.trials if t.state == optuna.trial.TrialState.WAITING]
    assert len(interrupted) == 2 and all(t.state == optuna.trial.TrialState.FAIL for t in interrupted), \
        ([(t.number, t.state.name, t.user_attrs) for t in s.trials], out)
    assert sorted(t.user_attrs["retry_of_interrupted"] for t in waiting) == sorted(t.number for t in interrupted)
    runs = child_runs("demo-smoke")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert {r.info.status for r in runs if r.info.run_id in {t.user_attrs["mlflow_run_id"] for t in interrupted}} \
        == {"KILLED"}

    again = start([space, "--smoke", "--n-trials", "3", "--resume", "--data", str(phantom_dir),
                   "--set", "optim.epochs=2", "--set", "data.max_studies=40"], workdir)
    out, _ = again.communicate(timeout=400)
    assert again.returncode == 0, out
    s = optuna.load_study(study_name="demo-smoke", storage="sqlite:///studies.db")
    finished = [t for t in s.trials if t.state in DONE]
    assert len(finished) == 3
    retried = {t.user_attrs.get("retry_of_interrupted"): t for t in finished if "retry_of_interrupted" in t.user_attrs}
    for t in interrupted:  # the interrupted parameter sets were run again, first
        assert retried[t.number].params == t.params


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_concurrent_launchers_on_a_fresh_storage(engine, phantom_dir, workdir, request):
    """Three launchers started at once on stores that do not exist yet: no schema-creation race,
    and the study holds exactly N trials."""
    if engine == "sqlite":
        storage, tracking = "sqlite:///studies.db", None
    else:
        pg = request.getfixturevalue("postgres")
        storage, tracking = pg.create_db("optuna_race"), pg.create_db("mlflow_race")
    extra = ["--tracking-uri", tracking] if tracking else []
    procs = [start(["demo", "--smoke", "--n-trials", "3", "--resume", "--storage", storage, *extra,
                    "--data", str(phantom_dir), "--set", "optim.epochs=1"], workdir) for _ in range(3)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n\n".join(outs)
    s = optuna.load_study(study_name="demo-smoke", storage=sqlalchemy_url(storage))
    assert len(s.trials) == 3 and all(t.state in DONE for t in s.trials)
    runs = child_runs("demo-smoke", sqlalchemy_url(tracking) if tracking else None)
    assert len(runs) == 3


@pytest.mark.slow
def test_sigkill_of_a_single_process_launcher_then_resume(phantom_dir, workdir):
    """The killed invocation's parent run does not stay RUNNING: the resumed launcher finds its
    process gone (the same host) and closes it KILLED with the reason; the trial it was running is
    failed by the heartbeat and retried, its run closed."""
    proc = start(["demo", "--smoke", "--n-trials", "2", "--data", str(phantom_dir),
                  "--set", "optim.epochs=8", "--set", "data.max_studies=40"], workdir, start_new_session=True)
    wait_for_running(proc, "sqlite:///studies.db", "demo-smoke", 1)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and any helper process it forked (cache decoders)
    proc.communicate(timeout=60)
    again = start(["demo", "--smoke", "--n-trials", "2", "--resume", "--data", str(phantom_dir),
                   "--set", "optim.epochs=1"], workdir)
    out, _ = again.communicate(timeout=400)
    assert again.returncode == 0, out
    client = MlflowClient(default_tracking_uri())
    exp = client.get_experiment_by_name("demo-smoke")
    every = client.search_runs([exp.experiment_id], max_results=1000)
    assert not [r.info.run_name for r in every if r.info.status == "RUNNING"]
    parents = [r for r in every if "n_trials" in r.data.tags]
    killed = [r for r in parents if r.info.status == "KILLED"]
    assert len(parents) == 2 and len(killed) == 1, [(r.info.run_name, r.info.status) for r in parents]
    assert "invocation ended without closing its run: its launcher (pid" in killed[0].data.tags["error"]
    assert f"closed the parent run {killed[0].info.run_id} of a dead invocation" in out

"""Shared fixtures: one small phantom dataset per session, a private cache folder."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# no usage telemetry from test runs (MLflow would try to send it, from every process the tests start)
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# test processes share the cores (pytest-xdist workers, the studies' worker processes): OpenMP
# threads that spin while they wait (libgomp's default) then burn the cores the others need; set
# before torch is imported anywhere, inherited by every process a test starts
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from filelock import FileLock  # noqa: E402

from trainer.data.layout import Layout  # noqa: E402
from trainer.data.phantom import make_phantom  # noqa: E402


def shared_once(tmp_path_factory, name: str, build) -> Path:
    """The folder ``name``, filled by ``build(folder)`` once per test run and shared by every
    pytest-xdist worker process (each worker would otherwise build its own copy of every session
    fixture). The first worker to ask builds it under a file lock; the others wait, then read it.
    Callers treat the folder as read-only. A build that raised is retried by the next asker."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above every worker's own
    out = root / name
    done = out / ".built"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            build(out)
            done.touch()
    return out


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Never touch the user's ~/.cache/spinesweep from tests: one private cache per test run."""
    old = os.environ.get("SPINESWEEP_CACHE")
    # one per run, shared by the xdist workers like the studies' worker processes share theirs
    os.environ["SPINESWEEP_CACHE"] = str(shared_once(tmp_path_factory, "cache", lambda out: None))
    yield
    if old is None:
        os.environ.pop("SPINESWEEP_CACHE", None)
    else:
        os.environ["SPINESWEEP_CACHE"] = old


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """A small phantom (10 train + 2 test studies), built once per session. Read-only: copy it
    (`phantom_copy`) before breaking anything."""
    return shared_once(tmp_path_factory, "phantom",
                       lambda out: make_phantom(out, studies=10, test_studies=2, seed=7, jobs=2))


@pytest.fixture
def phantom_copy(phantom_dir, tmp_path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(phantom_dir, dst)
    return dst


@pytest.fixture(scope="session")
def layout(phantom_dir) -> Layout:
    return Layout(phantom_dir)


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """An empty working folder (the default stores go here)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An empty MLflow tracking DB, created (schema migrated) once per session: creating one costs
    seconds, and most tests that run a study only need one to be there."""
    from sweep.tracking import Tracker

    folder = shared_once(tmp_path_factory, "mlflow_template",
                         lambda out: Tracker(f"sqlite:///{out / 'mlflow.db'}", create=True))
    return folder / "mlflow.db"


@pytest.fixture
def stores(workdir, mlflow_template) -> Path:
    """`workdir` with an empty MLflow store in place (``mlruns/mlflow.db``, the default)."""
    (workdir / "mlruns").mkdir()
    shutil.copy(mlflow_template, workdir / "mlruns" / "mlflow.db")
    return workdir


QUICK_SPACE = """\
# the session's shared study (tests/conftest.py quick_study): trained by tests/fakes.quick_fit
direction: minimize
fixed:
  data.conditions: [spinal_canal_stenosis]
  optim.epochs: 3
  model.pretrained: false   # quick_fit builds no model
params:
  optim.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
  model.head: {type: categorical, choices: [linear, attention, lstm]}
sampler: {name: random, seed: 0}
pruner: {name: median, n_startup_trials: 1, n_warmup_steps: 0}
folds: [0]
n_trials: 4
"""
# trial 0 completes, 1 is pruned at its first epoch (far worse than 0), 2 fails (quick_fit's lstm
# raises), 3 completes with the better score
QUICK_TRIALS = [{"model.head": "linear", "optim.lr": 1e-3}, {"model.head": "attention", "optim.lr": 1e-3},
                {"model.head": "lstm", "optim.lr": 1e-3}, {"model.head": "linear", "optim.lr": 3e-3}]


@pytest.fixture(scope="session")
def quick_study(phantom_dir, mlflow_template, tmp_path_factory) -> Path:
    """A folder holding one finished study, ``quick``, made once per session through the real
    launcher (`sweep.study.run_study`) with `tests/fakes.quick_fit` in place of training: its
    ``studies.db`` and ``mlruns/`` hold a complete, a pruned, a failed and a complete trial (in
    that order, `QUICK_TRIALS`). Read-only: tests take a copy (`quick_copy`)."""
    import optuna

    from fakes import quick_fit
    from sweep.study import run_study

    def build(root: Path) -> None:
        (root / "quick.yaml").write_text(QUICK_SPACE)
        (root / "mlruns").mkdir()
        shutil.copy(mlflow_template, root / "mlruns" / "mlflow.db")
        old = os.getcwd()
        os.chdir(root)
        try:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            study = optuna.create_study(study_name="quick", storage="sqlite:///studies.db", direction="minimize")
            for params in QUICK_TRIALS:
                study.enqueue_trial(params)
            run_study(str(root / "quick.yaml"), data=str(phantom_dir), resume=True, fit_fn=quick_fit,
                      log=lambda line: None)
        finally:
            os.chdir(old)

    return shared_once(tmp_path_factory, "quick_study", build)


@pytest.fixture
def quick_copy(quick_study, tmp_path, monkeypatch) -> Path:
    """A private copy of the session's `quick_study` as the working folder (its default stores).
    Artifacts stay where the study logged them: read them, do not write new ones."""
    dst = tmp_path / "work"
    shutil.copytree(quick_study, dst)
    monkeypatch.chdir(dst)
    return dst


@pytest.fixture(scope="session")
def phantom30_dir(tmp_path_factory) -> Path:
    """A 30-study phantom (and 2 test studies), built once per session for the slow tests that
    measure point statistics or train the localiser. Read-only."""
    return shared_once(tmp_path_factory, "phantom30",
                       lambda out: make_phantom(out, studies=30, test_studies=2, seed=1, jobs=2))


# -- test time by loop -----------------------------------------------------------------------------
# The README's goals (the fast loop, -m "not slow", and the whole suite) are in wall time: what the
# one running them waits, pytest's own "in N s". Every run ends with it, and with the time its tests
# took by loop (setup, call and teardown, summed over every xdist worker: more than the wall time
# when the processes run side by side), so CI's log shows both.
_TEST_TIME: dict[str, list[float]] = {"fast": [], "slow": []}  # fast: not marked slow


def pytest_runtest_logreport(report):
    loop = "slow" if "slow" in report.keywords else "fast"
    _TEST_TIME[loop].append(report.duration)  # one report per phase: setup, call, teardown


def pytest_sessionstart(session):
    import time

    session.config._spinesweep_started = time.time()


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    import time

    parts = [f"{loop} {sum(t):.0f} s" for loop, t in _TEST_TIME.items() if t]
    if parts:
        wall = time.time() - config._spinesweep_started
        n = getattr(config.option, "numprocesses", None) or 1
        over = f" summed over {n} processes" if n > 1 else ""
        terminalreporter.write_sep("-", f"wall {wall:.0f} s; test time by loop{over}: {', '.join(parts)}")

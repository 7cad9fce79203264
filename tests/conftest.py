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

ROOT = Path(__file__).resolve().parents[1]


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


def kept_across_runs(request, name: str, key: str, build) -> Path:
    """The folder ``name``, filled by ``build(folder)`` once per `key` and kept between test runs
    in pytest's cache (``.pytest_cache/d/spinesweep/``; ``pytest --cache-clear`` empties it), for
    fixtures that are a pure function of `key`: the sources and library versions that make them.
    Built under a file lock (xdist workers and concurrent runs wait for one build). Read-only.
    Without pytest's cache (``-p no:cacheprovider``), built once per run (`shared_once`)."""
    cache = getattr(request.config, "cache", None)
    if cache is None:
        return shared_once(request.getfixturevalue("tmp_path_factory"), name, build)
    root = cache.mkdir("spinesweep")
    out = root / f"{name}-{key}"
    with FileLock(str(root / f"{name}.lock")):
        if not (out / ".built").exists():
            for old in root.glob(f"{name}-*"):  # an older key's build: its sources changed
                shutil.rmtree(old, ignore_errors=True)
            out.mkdir(parents=True)
            build(out)
            (out / ".built").touch()
    return out


def source_key(*parts: str, files=(), packages=()) -> str:
    """A short hash of `parts`, the contents of `files` (paths under the repository, globs
    allowed) and the installed versions of `packages`: the key of a `kept_across_runs` folder."""
    import hashlib
    from importlib.metadata import version

    h = hashlib.sha1("\n".join(parts).encode())
    for pattern in files:
        for f in sorted(ROOT.glob(pattern)):
            h.update(f.relative_to(ROOT).as_posix().encode() + f.read_bytes())
    for package in packages:
        h.update(f"{package}=={version(package)}".encode())
    return h.hexdigest()[:16]


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


# what the phantom's files are a function of: its generator (with the DICOM, geometry and layout
# code it uses) and the libraries that compute and write the pixels
PHANTOM_SOURCES = dict(files=("trainer/data/*.py", "trainer/errors.py"),
                       packages=("numpy", "scipy", "opencv-python-headless", "pydicom", "pandas"))


@pytest.fixture(scope="session")
def phantom_dir(request) -> Path:
    """A small phantom (10 train + 2 test studies), built once and kept between runs while its
    generator and libraries are unchanged (`kept_across_runs`). Read-only: copy it
    (`phantom_copy`) before breaking anything."""
    from trainer.data.phantom import make_phantom

    args = dict(studies=10, test_studies=2, seed=7)
    return kept_across_runs(request, "phantom", source_key(repr(args), **PHANTOM_SOURCES),
                            lambda out: make_phantom(out, jobs=2, **args))


@pytest.fixture
def phantom_copy(phantom_dir, tmp_path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(phantom_dir, dst)
    return dst


@pytest.fixture(scope="session")
def layout(phantom_dir):
    from trainer.data.layout import Layout

    return Layout(phantom_dir)


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """An empty working folder (the default stores go here)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def mlflow_template(request) -> Path:
    """An empty MLflow tracking DB, created (schema migrated) once and kept between runs while
    MLflow's version is unchanged: creating one costs seconds, and most tests that run a study
    only need one to be there. Copy it (`stores`), never write to it."""
    from sweep.tracking import Tracker

    key = source_key(files=("sweep/tracking.py",), packages=("mlflow", "sqlalchemy", "alembic"))
    folder = kept_across_runs(request, "mlflow_template", key,
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
    from trainer.data.phantom import make_phantom

    return shared_once(tmp_path_factory, "phantom30",
                       lambda out: make_phantom(out, studies=30, test_studies=2, seed=1, jobs=2))


# -- xdist groups ------------------------------------------------------------------------------------
@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Under ``--dist loadgroup`` (scripts/test), a test marked ``xdist_group`` must carry its
    group in its node id, or xdist spreads the group over the processes and each builds the
    group's per-process fixtures again. pytest 9.2 with pytest-xdist 3.8 dropped it without a word
    (pytest-dev/pytest-xdist#1386; pyproject.toml keeps pytest below 9.2): fail loudly instead."""
    if not getattr(config.option, "loadgroup", False):
        return
    lost = [i.nodeid for i in items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
    if lost:
        raise pytest.UsageError(f"--dist loadgroup ignores the xdist_group of {len(lost)} test(s), e.g. {lost[0]}: "
                                "this pytest / pytest-xdist pair does not group (pytest-dev/pytest-xdist#1386)")


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


@pytest.fixture(scope="session")
def phantom50_dir(tmp_path_factory) -> Path:
    """A 50-study phantom (no test studies), built once per run for the slow tests that train a
    real model to the issue's bar. Read-only."""
    from trainer.data.phantom import make_phantom

    return shared_once(tmp_path_factory, "phantom50",
                       lambda out: make_phantom(out, studies=50, test_studies=0, seed=0, jobs=2))

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

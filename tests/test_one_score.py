"""One score per trial, the same in Optuna, in MLflow's latest `score`, in `optuna-run runs` and
in the dashboard's trial table: on a study with complete, pruned, failed and promoted trials."""
import re

import optuna
import pytest
from mlflow.tracking import MlflowClient

from spinesweep.cli import main
from sweep.query import runs_table
from sweep.tracking import default_tracking_uri


@pytest.mark.slow
def test_optuna_mlflow_runs_and_dashboard_agree(phantom_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = ["--data", str(phantom_dir)]
    # random sampling + successive halving over 3 epochs: some trials are pruned
    assert main(["demo", "--smoke", "--n-trials", "5", "--set", "optim.epochs=3", *data]) == 0
    # a learning rate that makes the loss NaN: a failed trial in the same study
    assert main(["demo", "--smoke", "--n-trials", "6", "--resume", "--set", "optim.epochs=3",
                 "--set", "optim.lr=1e12", *data]) == 0
    assert main(["promote", "demo-smoke"]) == 0
    study = optuna.load_study(study_name="demo-smoke", storage="sqlite:///studies.db")
    states = {t.state for t in study.trials}
    assert {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL} <= states
    in_optuna = {t.number: t.value for t in study.trials}

    client = MlflowClient(default_tracking_uri())
    exp = client.get_experiment_by_name("demo-smoke")
    trial_runs = client.search_runs([exp.experiment_id], "tags.trial != ''")
    in_mlflow = {int(r.data.tags["trial"]): r.data.metrics.get("score") for r in trial_runs}
    in_runs = {r["trial"]: r["score"] for r in runs_table("demo-smoke")}
    assert main(["dashboard", "demo-smoke", "--out", "d.html"]) == 0
    page = (tmp_path / "d.html").read_text()
    rows = re.findall(r"<tr data-trial='(\d+)' data-state='(\w+)'(?: data-score='([^']+)')?>", page)
    in_dashboard = {int(n): (float(v) if v else None) for n, _, v in rows}

    assert set(in_optuna) == set(in_mlflow) == set(in_runs) == set(in_dashboard)
    for n, value in in_optuna.items():
        for view in (in_mlflow, in_runs, in_dashboard):
            assert view[n] == (None if value is None else pytest.approx(value)), (n, value, view[n])
    for r in trial_runs:  # the run's own score is logged after every epoch's curve
        hist = client.get_metric_history(r.info.run_id, "score")
        assert len(hist) <= 1
        if hist:
            epochs = client.get_metric_history(r.info.run_id, "val_score")
            assert hist[0].step > max(m.step for m in epochs)
        if r.info.status == "KILLED":
            assert r.data.tags["pruned"] == "true"

    # promoted fold runs: their latest `score` is the fold's, so the README's filters find them
    folds = client.search_runs([exp.experiment_id], "tags.promotion_of != ''")
    assert len(folds) == 3
    for f in folds:
        hist = client.get_metric_history(f.info.run_id, "score")
        assert len(hist) == 1 and hist[0].step > max(m.step for m in client.get_metric_history(f.info.run_id, "val_score"))
    worst = max(f.data.metrics["score"] for f in folds)
    found = client.search_runs([exp.experiment_id], f"metrics.score <= {worst + 1e-9} and tags.promotion_of != ''")
    assert len(found) == 3
    best = min(study.trials, key=lambda t: t.value if t.value is not None and t.state.name == "COMPLETE" else 9e9)
    promoted = [r for r in trial_runs if r.info.run_id == best.user_attrs["mlflow_run_id"]][0]
    assert f"data-trial='{best.number}'" in page and "promoted_oof_score" in client.get_run(promoted.info.run_id).data.metrics

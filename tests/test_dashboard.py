"""Dashboards: Optuna's figures on a hand-made study (imported trials left out), the project's
figure builders on empty and full data, and (slow) a real study's report rendered in headless Chromium, every figure drawn."""
import os
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from dashboards import figures, info
from dashboards.browser import chromium, render
from dashboards.report import write_report
from spinesweep.cli import main
from sweep.trials import best_trial, without_legacy

DISTS = {"lr": FloatDistribution(1e-4, 1e-2, log=True), "head": CategoricalDistribution(["lstm", "gru"])}


def hand_made_study() -> optuna.Study:
    study = optuna.create_study(direction="minimize")
    values = [0.9, 0.7, None, 0.8, 0.6]
    for i, v in enumerate(values):
        params = {"lr": 1e-3 * (i + 1), "head": "lstm" if i % 2 else "gru"}
        inter = {0: 1.0 - 0.05 * i, 1: 0.95 - 0.05 * i}
        if v is None:  # pruned after two steps
            study.add_trial(create_trial(state=TrialState.PRUNED, params=params, distributions=DISTS,
                                         intermediate_values=inter, user_attrs={"worker": "cpu1"}))
        else:
            study.add_trial(create_trial(value=v, params=params, distributions=DISTS, intermediate_values=inter,
                                         user_attrs={"worker": f"cpu{i % 2}"}))
    study.add_trial(create_trial(value=0.1, params={"lr": 5e-3}, distributions={"lr": DISTS["lr"]},
                                 user_attrs={"source": "legacy", "legacy_entry": "exp127"}))
    return study


def test_optuna_figures_leave_the_imported_trials_out():
    s = hand_made_study()
    own = without_legacy(s)
    assert [t.number for t in own.trials] == [0, 1, 2, 3, 4] and len(s.trials) == 6
    assert best_trial(s).value == 0.6  # the imported 0.1 is a real-data score: never the study's best
    for name in figures.OPTUNA_FIGURES:
        fig = figures.optuna_figure(name, own)
        assert fig is not None and len(fig.data) >= 1, name
    hist = figures.optuna_figure("history", own)
    assert 0.1 not in [y for tr in hist.data for y in (tr.y or [])]


def test_optuna_figures_are_none_without_the_trials_they_need():
    empty = optuna.create_study()
    assert all(figures.optuna_figure(n, empty) is None for n in figures.OPTUNA_FIGURES)
    one = optuna.create_study()
    one.add_trial(create_trial(value=1.0, params={"lr": 1e-3}, distributions={"lr": DISTS["lr"]}))
    assert figures.optuna_figure("importances", one) is None  # needs two completed trials
    assert figures.optuna_figure("intermediate", one) is None  # nothing reported
    assert figures.optuna_figure("history", one) is not None


def test_calibration_bins():
    oof = pd.DataFrame({"row_id": ["a", "b"], "normal_mild": [0.95, 0.15], "moderate": [0.03, 0.8],
                        "severe": [0.02, 0.05]})
    sol = pd.DataFrame({"row_id": ["a", "b"], "normal_mild": [1.0, 0.0], "moderate": [0.0, 1.0],
                        "severe": [0.0, 0.0], "sample_weight": [1, 2]})
    cal = info.calibration(oof, sol, bins=10)
    assert sum(cal["count"]) == 6
    top = cal["predicted"].index(max(cal["predicted"]))
    assert cal["observed"][top] == 1.0  # 0.95 was right
    assert cal["observed"][0] == 0.0  # the low probabilities were all wrong classes


def test_builders_return_none_on_empty_data_and_figures_otherwise():
    assert figures.confusion({}) is None and figures.calibration({"predicted": [], "observed": [], "count": []}) is None
    assert figures.against_legacy({"legacy": [], "study": [{"number": 0, "value": 1}]}, "x") is None
    assert figures.learning_curves({"folds": []}, "t") is None
    for fig in (figures.confusion({"spinal_canal_stenosis": [[5, 1, 0], [1, 2, 0], [0, 1, 1]]}),
                figures.calibration({"predicted": [0.1, 0.9], "observed": [0.0, 1.0], "count": [3, 3]}),
                figures.learning_curves({"folds": [{"fold": "", "epoch": [1, 2], "train_loss": [1, 0.5],
                                                    "val_loss": [1, 0.7], "score": [0.9, 0.6]}]}, "t")):
        assert fig is not None and len(fig.data) >= 1


def test_report_without_mlflow_says_why_a_section_is_empty(tmp_path):
    out = write_report(hand_made_study(), tmp_path / "r.html")
    assert set(out["figures"]) >= {"history", "importances", "parallel", "slices", "intermediate", "timeline"}
    assert "curves" in out["empty"] and "calibration" in out["empty"]
    text = (tmp_path / "r.html").read_text()
    assert text.count("plotly.js v") == 1 and "<script src=" not in text  # inlined once: works offline


def _need_browser():
    if chromium() is None:
        if os.environ.get("SPINESWEEP_ALLOW_NO_BROWSER"):
            pytest.skip("no chromium (SPINESWEEP_ALLOW_NO_BROWSER set)")
        pytest.fail("chromium is missing: scripts/test installs it (scripts/test-deps)")


@pytest.mark.slow
def test_the_browser_check_catches_a_script_error(tmp_path):
    _need_browser()
    from dashboards.report import _ERRORS_JS

    page = tmp_path / "bad.html"
    page.write_text(f"<html><head>{_ERRORS_JS}</head><body><pre id='report-errors'></pre>"
                    "<script>undefinedFunction();</script></body></html>")
    assert any("undefinedFunction" in e for e in render(page.as_uri())["errors"])


@pytest.mark.slow
def test_a_study_ends_with_a_dashboard_that_renders_every_figure(phantom_dir, tmp_path, monkeypatch, capsys):
    _need_browser()
    monkeypatch.chdir(tmp_path)
    assert main(["import-log"]) == 0
    # one epoch (--smoke): nothing is pruned at a trial's last step, so all four trials complete
    # (the importances need at least two), whatever the demo's pruner
    assert main(["demo", "--smoke", "--n-trials", "4", "--workers", "2", "--data", str(phantom_dir)]) == 0
    out = capsys.readouterr().out
    report = Path("dashboards/demo-smoke.html")
    assert report.exists() and "dashboard written: dashboards/demo-smoke.html" in out and "optuna-run ui" in out
    result = render(report.resolve().as_uri())
    assert result["errors"] == []
    expected = {"history", "importances", "parallel", "slices", "intermediate", "timeline", "curves", "losses", "confusion",
                "calibration", "legacy"}
    assert set(result["figures"]) == expected, result["empty"]
    assert all(n >= 1 for n in result["figures"].values()), result["figures"]
    # the same through the command, to another file
    assert main(["dashboard", "demo-smoke", "--out", "r.html"]) == 0
    assert Path("r.html").stat().st_size > 1_000_000  # plotly.js inlined

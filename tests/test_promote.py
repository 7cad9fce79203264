"""Promotion, ensemble and predict end to end on the small phantom: two trials promoted (every
fold trained), promoting again is a no-op, the ensemble is no worse than its best member and is
logged, the submission has the exact Kaggle form and scores against the hidden test labels."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from spinesweep.cli import main
from sweep.ensemble import combine
from sweep.tracking import default_tracking_uri
from trainer.data.layout import read_labels
from trainer.metric import build_solution, score_groups


def test_combine_renormalises_over_the_members_that_cover_a_row():
    a = pd.DataFrame({"row_id": ["1_spinal_canal_stenosis_l1_l2", "1_left_subarticular_stenosis_l1_l2"],
                      "normal_mild": [0.8, 0.6], "moderate": [0.1, 0.3], "severe": [0.1, 0.1]})
    b = pd.DataFrame({"row_id": ["1_spinal_canal_stenosis_l1_l2"], "normal_mild": [0.4], "moderate": [0.4],
                      "severe": [0.2]})
    out = combine([a, b], np.array([0.25, 0.75])).set_index("row_id")
    assert out.loc["1_spinal_canal_stenosis_l1_l2", "normal_mild"] == pytest.approx(0.5)
    assert out.loc["1_left_subarticular_stenosis_l1_l2", "moderate"] == pytest.approx(0.3)  # only a covers it
    assert np.allclose(out.sum(axis=1), 1.0)


def test_an_ensemble_of_one_member_weighted_one_is_exactly_that_member():
    """The guarantee "never worse than the best member" holds exactly, on any processor: keeping one
    member (weight 1, the others 0) gives that member's own values, and scores over the same rows in
    the same order give the member's own score to the last bit."""
    from sweep.ensemble import Member, joint_solution, weighted_score

    rng = np.random.default_rng(0)
    rows = [f"{s}_{c}_{lv}" for s in (3, 1, 2) for c in ("spinal_canal_stenosis", "left_subarticular_stenosis")
            for lv in ("l1_l2", "l4_l5")]
    truth = rng.integers(0, 3, len(rows))
    sol = pd.DataFrame({"row_id": rows, "normal_mild": (truth == 0) * 1.0, "moderate": (truth == 1) * 1.0,
                        "severe": (truth == 2) * 1.0, "sample_weight": np.array([1.0, 2.0, 4.0])[truth]})
    members = []
    for k in range(3):
        p = rng.dirichlet(np.ones(3), len(rows)) * rng.uniform(0.9, 1.1, (len(rows), 1))  # not summing to 1
        oof = pd.DataFrame({"row_id": rows, "normal_mild": p[:, 0], "moderate": p[:, 1], "severe": p[:, 2]})
        order = rng.permutation(len(rows))  # members' rows come in their own order
        members.append(Member("m", str(k), str(k), "r", "s", oof.iloc[order], sol.iloc[order]))
    union = joint_solution(members)
    for k, m in enumerate(members):
        one = np.eye(3)[k]
        picked = combine([x.oof for x in members], one).set_index("row_id")
        assert (picked.loc[m.oof["row_id"]].to_numpy() == m.oof[["normal_mild", "moderate", "severe"]].to_numpy()).all()
        own = score_groups(m.solution.sort_values("row_id", ignore_index=True), m.oof).score
        assert weighted_score(union, [x.oof for x in members], one) == own  # exactly, not approximately


@pytest.mark.slow
def test_promote_ensemble_predict(phantom_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # one epoch (--smoke): never pruned (no pruning at a trial's last step), so three complete trials
    assert main(["demo", "--smoke", "--n-trials", "3", "--data", str(phantom_dir)]) == 0
    test_study = int(pd.read_csv(phantom_dir / "test_series_descriptions.csv")["study_id"].iloc[0])
    study = optuna.load_study(study_name="demo-smoke", storage="sqlite:///studies.db")
    done = sorted((t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: t.value)
    assert len(done) >= 2
    capsys.readouterr()

    assert main(["promote", "demo-smoke"]) == 0  # the best trial
    out = capsys.readouterr().out
    assert f"promoted trial {done[0].number} -> spinesweep-demo-smoke version 1" in out
    assert "trained fold(s) [1, 2, 3]" in out
    assert main(["promote", "demo-smoke", "--trial", str(done[0].number)]) == 0
    assert "already promoted" in capsys.readouterr().out
    assert main(["promote", "demo-smoke", "--trial", str(done[1].number)]) == 0
    assert "version 2" in capsys.readouterr().out

    client = MlflowClient(default_tracking_uri())
    versions = client.search_model_versions("name='spinesweep-demo-smoke'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert client.get_model_version_by_alias("spinesweep-demo-smoke", f"trial_{done[1].number}").version in (2, "2")
    run_id = done[0].user_attrs["mlflow_run_id"]
    children = client.search_runs([client.get_run(run_id).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{run_id}'")
    assert sorted(r.data.tags["fold"] for r in children) == ["1", "2", "3"]
    arts = {a.path for a in client.list_artifacts(run_id, "promoted/model/artifacts/checkpoints")}
    assert {f"promoted/model/artifacts/checkpoints/checkpoint_fold{k}.pt" for k in range(4)} <= arts
    assert "promoted/model/MLmodel" in {a.path for a in client.list_artifacts(run_id, "promoted/model")}

    # a real MLflow model: loaded through the registry in a fresh process, it predicts submission rows
    script = (
        "import json, sys, mlflow, mlflow.pyfunc, pandas as pd\n"
        f"mlflow.set_tracking_uri({default_tracking_uri()!r})\n"
        f"m = mlflow.pyfunc.load_model('models:/spinesweep-demo-smoke@trial_{done[0].number}')\n"
        "sig = m.metadata.signature\n"
        f"out = m.predict(pd.DataFrame({{'data_dir': [{str(phantom_dir)!r}], 'study_id': [{test_study}]}}))\n"
        "print(json.dumps({'inputs': sig.inputs.input_names(), 'columns': list(out.columns), 'rows': len(out),"
        " 'sums': out[['normal_mild', 'moderate', 'severe']].sum(axis=1).round(6).tolist(),"
        " 'example': m.metadata.saved_input_example_info is not None}))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded["inputs"] == ["data_dir", "study_id"] and loaded["example"]
    assert loaded["columns"] == ["row_id", "normal_mild", "moderate", "severe", "fallback"]  # fallback: "" or why
    assert loaded["rows"] == 5 and all(abs(x - 1) < 1e-5 for x in loaded["sums"])  # spinal canal, 5 levels
    oof = pd.read_csv(client.download_artifacts(run_id, "promoted/oof.csv", str(tmp_path)))
    assert oof["row_id"].str.split("_").str[0].nunique() == 8  # every smoke study (8) is out of fold once

    assert main(["ensemble", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert len(r["members"]) == 2
    assert r["score"] <= min(m["score"] for m in r["members"])  # exactly: see the test above
    logged = client.get_run(r["run_id"])
    assert logged.data.metrics["score"] == pytest.approx(r["score"])
    assert client.get_experiment(logged.info.experiment_id).name == "ensembles"

    assert main(["predict", "--data", str(phantom_dir), "--out", "submission.csv"]) == 0
    sub = pd.read_csv("submission.csv")
    sample = pd.read_csv(phantom_dir / "sample_submission.csv")
    assert list(sub.columns) == list(sample.columns) and sub["row_id"].tolist() == sample["row_id"].tolist()
    assert len(sub) == 25 * sample["row_id"].str.split("_").str[0].nunique()
    assert not sub.isna().any().any()
    assert np.allclose(sub[["normal_mild", "moderate", "severe"]].sum(axis=1), 1.0)
    hidden = read_labels(phantom_dir / "_phantom" / "test_labels.csv")
    score = score_groups(build_solution(hidden), sub).score
    assert np.isfinite(score) and score > 0


def test_members_covering_different_rows_are_weighed_without_error():
    """A member promoted on its evaluated folds only covers fewer rows than one promoted on all:
    the cross-fit scores a candidate that covers none of a part's rows as inf, never an error."""
    from sweep.ensemble import Member, choose_weights, joint_solution

    rng = np.random.default_rng(1)
    rows = [f"{s}_spinal_canal_stenosis_{lv}" for s in range(1, 9) for lv in ("l1_l2", "l2_l3", "l4_l5")]
    truth = rng.integers(0, 3, len(rows))
    sol = pd.DataFrame({"row_id": rows, "normal_mild": (truth == 0) * 1.0, "moderate": (truth == 1) * 1.0,
                        "severe": (truth == 2) * 1.0, "sample_weight": np.array([1.0, 2.0, 4.0])[truth]})
    p = rng.dirichlet(np.ones(3), len(rows))
    oof = pd.DataFrame({"row_id": rows, "normal_mild": p[:, 0], "moderate": p[:, 1], "severe": p[:, 2]})
    some = oof["row_id"].str.startswith(("1_", "2_"))  # studies 1 and 2 only: one fold's worth
    full = Member("m", "1", "1", "r1", "s", oof, sol)
    part = Member("m", "2", "2", "r2", "s", oof[some], sol[some])
    weights, chosen, held_out = choose_weights(joint_solution([full, part]), [full.oof, part.oof])
    assert len(weights) == 2 and np.isclose(sum(weights), 1) and chosen
    assert all(np.isfinite(v) or v == np.inf for v in held_out.values())


def test_a_models_uri_must_name_a_registered_localiser(stores, layout, tmp_path):
    """``models:/`` point sources: a malformed URI, a model or alias the registry lacks, and a
    classifier's version each fail with a message naming what is wrong."""
    from sweep.localize import point_source
    from trainer.errors import UserError

    uri = default_tracking_uri()
    with pytest.raises(UserError, match="expected models:/NAME@ALIAS"):
        point_source("models:/spinesweep-localizer", layout.root, uri)
    with pytest.raises(UserError, match="no model 'spinesweep-localizer' with alias 'champion'.*promote localizer"):
        point_source("models:/spinesweep-localizer@champion", layout.root, uri)
    client = MlflowClient(uri)
    client.create_registered_model("spinesweep-demo")
    (tmp_path / "model").mkdir()
    client.create_model_version("spinesweep-demo", str(tmp_path / "model"), tags={"task": "classify"})
    client.set_registered_model_alias("spinesweep-demo", "trial_0", "1")
    for spec in ("models:/spinesweep-demo@trial_0", "models:/spinesweep-demo/1"):
        with pytest.raises(UserError, match="spinesweep-demo version 1 is not a localiser"):
            point_source(spec, layout.root, uri)
    with pytest.raises(UserError, match="no model 'spinesweep-demo' with version '7'"):
        point_source("models:/spinesweep-demo/7", layout.root, uri)


@pytest.mark.slow
def test_a_promoted_localiser_places_the_points_of_predict_and_of_the_classifier_model(phantom_dir, stores, capsys):
    """A classifier ensemble without any localiser: predict and the classifier's model warn once,
    naming the guess's cost. A tiny localiser study promoted (its missing folds trained) becomes
    ``spinesweep-localizer@champion``: a pyfunc whose points round-trip through the layout reader,
    with OOF points over every training study; then predict, `localize` and the classifier's model
    use it by default and say so, and ``prior`` keeps the guess."""
    import warnings

    import mlflow
    import mlflow.pyfunc

    from sweep.localize import CHAMPION_URI
    from sweep.localize import oof_points_file
    from trainer.data.layout import read_coordinates

    uri, data = default_tracking_uri(), str(phantom_dir)
    test_ids = sorted(pd.read_csv(phantom_dir / "test_series_descriptions.csv")["study_id"].unique().tolist())
    inputs = pd.DataFrame({"data_dir": [data] * len(test_ids), "study_id": test_ids})

    # a classifier ensemble, no localiser anywhere
    assert main(["demo", "--smoke", "--n-trials", "1", "--data", data]) == 0
    assert main(["promote", "demo-smoke", "--folds", "evaluated"]) == 0
    assert main(["ensemble", "--weights", "equal"]) == 0
    capsys.readouterr()
    assert main(["predict", "--data", data, "--out", "guess.csv"]) == 0
    out = capsys.readouterr().out
    assert out.count("WARNING") == 1 and "1.4 disc spacings" in out, out
    assert "points placed by the mean-position guess" in out
    mlflow.set_tracking_uri(uri)
    classifier = mlflow.pyfunc.load_model("models:/spinesweep-demo-smoke@trial_0")
    assert {p.name for p in classifier.metadata.signature.params.params} >= {"points", "localizer"}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        guessed = classifier.predict(inputs)
    assert len([w for w in seen if "disc spacings" in str(w.message)]) == 1

    # promoting a localiser study without a complete trial says so
    optuna.create_study(study_name="localizer-empty", storage="sqlite:///studies.db")
    assert main(["promote", "localizer-empty"]) == 2
    assert "no completed trial" in capsys.readouterr().err

    assert main(["localizer", "--smoke", "--n-trials", "1", "--data", data]) == 0
    capsys.readouterr()
    assert main(["promote", "localizer-smoke"]) == 0
    out = capsys.readouterr().out
    assert "promoted localiser trial 0 -> spinesweep-localizer version 1" in out, out
    assert "study_localizer-smoke_trial_0, champion" in out and "trained fold(s) [1, 2, 3]" in out
    client = MlflowClient(uri)
    mv = client.get_model_version_by_alias("spinesweep-localizer", "champion")
    assert client.get_model_version_by_alias("spinesweep-localizer", "study_localizer-smoke_trial_0").version == mv.version
    study = optuna.load_study(study_name="localizer-smoke", storage="sqlite:///studies.db")
    assert mv.tags["trial_run_id"] == study.trials[0].user_attrs["mlflow_run_id"] and mv.tags["task"] == "localize"
    assert mv.tags["study"] == "localizer-smoke" and json.loads(mv.tags["folds"]) == [0, 1, 2, 3]
    assert float(mv.tags["oof_score"]) > 0 and "ensemble" not in mv.tags  # not a classifier ensemble's member
    points = read_coordinates(oof_points_file(CHAMPION_URI, uri, Path("oof_points")))
    solution = pd.read_csv(client.download_artifacts(mv.run_id, "promoted/solution.csv", "."))
    assert set(points["study_id"]) == set(solution["study_id"]) and points["study_id"].nunique() == 8  # every study

    # the localiser's own model: points in train_label_coordinates.csv form
    localiser = mlflow.pyfunc.load_model(CHAMPION_URI)
    assert localiser.metadata.signature.inputs.input_names() == ["data_dir", "study_id"]
    assert localiser.metadata.saved_input_example_info is not None
    rows = localiser.predict(inputs)
    assert list(rows.columns) == ["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]
    rows.to_csv("champion_points.csv", index=False)
    back = read_coordinates(Path("champion_points.csv"))
    assert len(back) == len(rows) > 0 and set(back["study_id"]) == set(test_ids)
    train_rows = localiser.predict(pd.DataFrame({"data_dir": [data], "study_id": [int(points["study_id"].iloc[0])]}),
                                   params={"split": "train"})
    assert set(train_rows["study_id"]) == {int(points["study_id"].iloc[0])}

    # localize, predict and the classifier's model now use it by default; prior keeps the guess
    assert main(["localize", "--data", data, "--out", "points.csv"]) == 0
    assert f"by the promoted localiser {CHAMPION_URI}" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_csv("points.csv"), pd.read_csv("champion_points.csv"))
    assert main(["predict", "--data", data, "--out", "localised.csv"]) == 0
    out = capsys.readouterr().out
    assert f"points placed by the promoted localiser {CHAMPION_URI}" in out and "WARNING" not in out, out
    assert main(["predict", "--data", data, "--localizer", "prior", "--out", "prior.csv"]) == 0
    out = capsys.readouterr().out
    assert "points placed by the mean-position guess" in out and "WARNING" not in out, out
    pd.testing.assert_frame_equal(pd.read_csv("prior.csv"), pd.read_csv("guess.csv"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        by_default = classifier.predict(inputs)
        by_champion = classifier.predict(inputs, params={"localizer": CHAMPION_URI})
        by_prior = classifier.predict(inputs, params={"localizer": "prior"})
    assert not [w for w in seen if "disc spacings" in str(w.message)]
    pd.testing.assert_frame_equal(by_default, by_champion)
    pd.testing.assert_frame_equal(by_prior, guessed)

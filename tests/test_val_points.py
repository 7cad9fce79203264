"""`data.val_points: oof`: a classifier's validation fold cropped around a localiser's
out-of-fold points (issue 20), training crops on the labelled points; the config checks, the
datasets `fit` builds, the errors, and the sweep layer (the points file resolved from MLflow once
per study, the run's `val_points` tag, the dashboard and the ensemble's members)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from trainer.config import ConfigError, TrainConfig
from trainer.data.cache import data_fingerprint, default_cache_dir
from trainer.data.layout import CONDITION_NAMES, LEVEL_NAMES, Layout
from trainer.data.samples import ValPointsError
from trainer.fit import fold_datasets, train_val_split

COLUMNS = ["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]
CANAL = "spinal_canal_stenosis"


def _cfg(data_dir, **over) -> TrainConfig:
    base = {"data.data_dir": str(data_dir), "data.conditions": f"[{CANAL}]", "data.img_size": "24",
            "data.sag_t2_slices": "1", "augment.preset": "none", "device": "cpu"}
    return TrainConfig().with_overrides({**base, **over})


def write_points(rows: pd.DataFrame, path: Path) -> Path:
    """Layout-form rows (submission spelling) written in the train_label_coordinates.csv form."""
    out = rows.assign(condition=rows["condition"].map(CONDITION_NAMES), level=rows["level"].map(LEVEL_NAMES))
    out[COLUMNS].to_csv(path, index=False)
    return path


def test_config_val_points_defaults_round_trips_and_checks():
    cfg = TrainConfig()
    assert cfg.data.val_points == "labelled" and cfg.data.val_points_file == ""
    oof = TrainConfig().with_overrides({"data.val_points": "oof", "data.val_points_file": "points.csv"})
    assert TrainConfig.from_flat(oof.to_flat()) == oof
    assert oof.to_flat()["data.val_points"] == "oof"
    # a layer of a config may say oof and another name the file: checked on the config about to train
    incomplete = TrainConfig().with_overrides({"data.val_points": "oof"})
    with pytest.raises(ConfigError, match=r"^data\.val_points_file: required with data\.val_points: oof"):
        incomplete.data.check_val_points()
    with pytest.raises(ConfigError, match=r"data\.val_points: 'predicted' is not one of"):
        TrainConfig().with_overrides({"data.val_points": "predicted"})
    # a file with labelled points is allowed (a study may sample val_points over a pinned file)
    TrainConfig().with_overrides({"data.val_points_file": "points.csv"})


def test_oof_validation_crops_follow_the_files_points_training_crops_the_labels(layout, phantom_dir, tmp_path):
    """One validation study's canal points moved in the file: its validation crops are cut
    around the moved points (and differ from the labelled ones), every other crop is unchanged,
    and training studies keep their labelled points even where the file moves them."""
    cache = default_cache_dir()
    fp = data_fingerprint(layout)
    labelled_cfg = _cfg(phantom_dir)
    train_ids, val_ids = train_val_split(layout, labelled_cfg, cache, fp)
    moved_study, train_study = val_ids[0], train_ids[0]
    points = layout.coordinates.copy()
    canal = points["condition"] == CANAL
    shift = (canal & points["study_id"].isin([moved_study, train_study]))
    points.loc[shift, "x"] += 9.0
    points.loc[shift, "y"] -= 6.0
    path = write_points(points, tmp_path / "oof.csv")

    labelled = fold_datasets(labelled_cfg, layout, cache, fp)
    oof = fold_datasets(_cfg(phantom_dir, **{"data.val_points": "oof", "data.val_points_file": str(path)}),
                        layout, cache, fp)
    assert oof.val_ids == labelled.val_ids and oof.train_ids == labelled.train_ids
    want = points[shift & (points["study_id"] == moved_study)].set_index("level")
    plan = oof.source.plan(moved_study).blocks["sag_t2"]
    for lv, level in enumerate(["l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1"]):
        assert (plan[lv].x, plan[lv].y) == pytest.approx((want.loc[level, "x"], want.loc[level, "y"]))
    # the training study's plan keeps its labelled points: the file is read for validation studies only
    assert oof.source.plan(train_study).blocks["sag_t2"] == labelled.source.plan(train_study).blocks["sag_t2"]

    def crops(data, study):
        return np.stack([data.val_ds[i]["image"].numpy() for i, (s, _) in enumerate(data.val_ds.items) if s == study])

    assert not np.allclose(crops(oof, moved_study), crops(labelled, moved_study))
    for other in val_ids[1:]:
        np.testing.assert_array_equal(crops(oof, other), crops(labelled, other))


def test_oof_file_missing_a_validation_study_names_it(layout, phantom_dir, tmp_path):
    cache = default_cache_dir()
    fp = data_fingerprint(layout)
    _, val_ids = train_val_split(layout, _cfg(phantom_dir), cache, fp)
    points = layout.coordinates[layout.coordinates["study_id"] != val_ids[-1]]
    path = write_points(points, tmp_path / "oof.csv")
    cfg = _cfg(phantom_dir, **{"data.val_points": "oof", "data.val_points_file": str(path)})
    with pytest.raises(ValPointsError, match=rf"no points for 1 of fold 0's {len(val_ids)} validation studies "
                                             rf"\({val_ids[-1]}\)"):
        fold_datasets(cfg, layout, cache, fp)


@pytest.mark.parametrize("content,match", [
    (None, "file not found"),
    ("study_id,series_id,x,y\n1,2,3.0,4.0\n", r"missing column\(s\) \['instance_number', 'condition', 'level'\]"),
])
def test_oof_file_unreadable_names_the_file(layout, phantom_dir, tmp_path, content, match):
    path = tmp_path / "points.csv"
    if content is not None:
        path.write_text(content)
    cfg = _cfg(phantom_dir, **{"data.val_points": "oof", "data.val_points_file": str(path)})
    with pytest.raises(ValPointsError, match=rf"data\.val_points_file: {path}: {match}"):
        fold_datasets(cfg, layout, default_cache_dir(), data_fingerprint(layout))


def test_oof_without_a_file_is_refused_before_training_and_by_a_study(layout, phantom_dir, stores, tmp_path):
    from sweep.study import run_study

    cfg = _cfg(phantom_dir, **{"data.val_points": "oof"})
    with pytest.raises(ConfigError, match=r"^data\.val_points_file: required"):
        fold_datasets(cfg, layout, default_cache_dir(), data_fingerprint(layout))
    (tmp_path / "oof.yaml").write_text(SPACE)
    with pytest.raises(ConfigError, match=r"data\.val_points_file: required"):
        run_study(str(tmp_path / "oof.yaml"), data=str(phantom_dir), fit_fn=recording_fit, log=lambda line: None)


def test_oof_file_given_as_a_uri_is_refused_by_the_trainer(layout, phantom_dir):
    cfg = _cfg(phantom_dir, **{"data.val_points": "oof", "data.val_points_file": "runs:/abc123"})
    with pytest.raises(ValPointsError, match="is a URI; the trainer reads a local CSV only"):
        fold_datasets(cfg, layout, default_cache_dir(), data_fingerprint(layout))


def test_point_table_reads_a_points_file(layout, tmp_path):
    """`PointTable.from_csv` (predict's `--localizer` points) reads the form `write_points` writes."""
    from trainer.points.prior import PointTable

    table = PointTable.from_csv(write_points(layout.coordinates, tmp_path / "p.csv"))
    pd.testing.assert_frame_equal(table.rows, layout.coordinates.reset_index(drop=True), check_dtype=False)


# ---------------------------------------------------------------- the sweep layer (MLflow, a study)

SPACE = """\
direction: minimize
fixed:
  data.conditions: [spinal_canal_stenosis]
  data.val_points: oof
  optim.epochs: 2
  model.pretrained: false
  model.head: linear
params:
  optim.lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
sampler: {name: random, seed: 0}
pruner: {name: none}
folds: [0]
n_trials: 1
"""
SEEN: list[str] = []


def recording_fit(cfg, callbacks=(), progress=None):
    """`quick_fit` that records the points file each trial's config names (a local path, never a URI)."""
    from fakes import quick_fit

    SEEN.append(cfg.data.val_points_file)
    return quick_fit(cfg, callbacks, progress)


def localiser_run(tracking_uri: str, layout: Layout, tmp_path: Path, folds=((0, 1), (2, 3)), promoted=False,
                  leave_out=()) -> str:
    """An MLflow run shaped like a localiser trial: its OOF points as ``oof_coordinates_fold<k>.csv``
    (here the labelled points of the studies, split over 'folds' by study index mod 4, less the
    studies `leave_out`), or under ``promoted/``."""
    from sweep.tracking import Tracker

    tracker = Tracker(tracking_uri)
    exp = tracker.ensure_experiment("localizer")
    run = tracker.start_run(exp, "localizer-t0", tags={"trial": 0})
    art = tmp_path / "art"
    (art / "promoted").mkdir(parents=True)
    ids = layout.study_ids
    for k, part in enumerate(folds):
        rows = layout.coordinates[layout.coordinates["study_id"].isin(
            [s for i, s in enumerate(ids) if i % 4 in part and s not in leave_out])]
        write_points(rows, (art / "promoted" if promoted else art) / f"oof_coordinates_fold{k}.csv")
    tracker.log_artifacts(run, art)
    tracker.end_run(run, "FINISHED")
    return run


def test_oof_points_file_resolves_runs_and_models_uris(layout, stores, tmp_path):
    from sweep.localize import oof_points_file
    from sweep.tracking import Tracker, default_tracking_uri

    uri = default_tracking_uri()
    run = localiser_run(uri, layout, tmp_path / "a")
    got = oof_points_file(f"runs:/{run}", uri, tmp_path / "dst")
    assert got == tmp_path / "dst" / f"oof_points_{run}.csv"
    pts = pd.read_csv(got)
    assert list(pts.columns) == COLUMNS and sorted(pts["study_id"].unique()) == sorted(layout.study_ids)
    # a registered localiser: models:/NAME/VERSION and models:/NAME@ALIAS name its run's points
    promoted = localiser_run(uri, layout, tmp_path / "b", folds=((0, 1, 2, 3),), promoted=True)
    tracker = Tracker(uri)
    tracker.create_registered_model("spinesweep-localizer", "test")
    v = tracker.create_model_version("spinesweep-localizer", source="runs:/x/promoted/model", run_id=promoted, tags={}, description="")
    tracker.set_model_alias("spinesweep-localizer", "best", v.version)
    for ref in (f"models:/spinesweep-localizer/{v.version}", "models:/spinesweep-localizer@best"):
        got = oof_points_file(ref, uri, tmp_path / ref.replace("/", "_").replace(":", "_").replace("@", "_"))
        assert got.name == f"oof_points_{promoted}.csv" and len(pd.read_csv(got)) == len(layout.coordinates)
    assert oof_points_file("some/file.csv", uri, tmp_path) == Path("some/file.csv")
    from trainer.errors import UserError

    with pytest.raises(UserError, match="has no model .spinesweep-localizer. with version .7."):
        oof_points_file("models:/spinesweep-localizer/7", uri, tmp_path)
    empty = tracker.start_run(tracker.ensure_experiment("other"), "x", tags={})
    with pytest.raises(UserError, match=rf"run {empty} logged no oof_coordinates\*\.csv: not a localiser trial"):
        oof_points_file(f"runs:/{empty}", uri, tmp_path)


def test_a_study_scored_on_a_localisers_oof_points(layout, phantom_dir, stores, tmp_path):
    """`data.val_points_file: runs:/ID` is downloaded once before the trials; every trial gets the
    local file, its run is tagged val_points=oof with the URI, and the dashboard shows it. A file
    without some validation studies stops the study before its first trial, naming them."""
    from dashboards.info import trial_rows
    from sweep.study import run_study
    from sweep.tracking import Tracker, default_tracking_uri

    uri = default_tracking_uri()
    run = localiser_run(uri, layout, tmp_path / "loc")
    (tmp_path / "oof.yaml").write_text(SPACE)
    SEEN.clear()
    outcome = run_study(str(tmp_path / "oof.yaml"), data=str(phantom_dir), pinned={"data.val_points_file": f"runs:/{run}"},
                        fit_fn=recording_fit, log=lambda line: None)
    assert outcome.counts["COMPLETE"] == 1
    assert len(SEEN) == 1 and Path(SEEN[0]).is_file() and SEEN[0].endswith(f"oof_points_{run}.csv")
    tracker = Tracker(uri)
    exp = tracker.get_experiment("oof")
    (r,) = tracker.search_runs([exp.experiment_id], "tags.trial != ''")
    assert r.data.tags["val_points"] == "oof" and r.data.tags["val_points_source"] == f"runs:/{run}"
    assert r.data.params["data.val_points"] == "oof" and r.data.params["data.val_points_file"] == SEEN[0]
    assert [row["val_points"] for row in trial_rows(outcome.study, tracker)] == ["oof"]
    # reproduced where the downloaded file is gone: the run's val_points_source is fetched again
    from sweep.query import reproduce

    Path(SEEN[0]).unlink()
    again = reproduce(r.info.run_id, fit_fn=recording_fit, log=lambda line: None)
    assert Path(SEEN[-1]).is_file() and SEEN[-1] == SEEN[0] and again["score"] == again["logged_score"]

    # a localiser evaluated on some studies only: the study refuses before any trial
    _, val_ids = train_val_split(layout, TrainConfig().with_overrides({"data.data_dir": str(phantom_dir)}),
                                 default_cache_dir(), data_fingerprint(layout))
    partial = localiser_run(uri, layout, tmp_path / "partial", leave_out=val_ids[:2])
    SEEN.clear()
    with pytest.raises(ValPointsError, match=f"no points for 2 of fold 0's {len(val_ids)} validation studies "
                                             rf"\({val_ids[0]}, {val_ids[1]}\)"):
        run_study(str(tmp_path / "oof.yaml"), data=str(phantom_dir), study_name="oof2",
                  pinned={"data.val_points_file": f"runs:/{partial}"}, fit_fn=recording_fit, log=lambda line: None)
    assert SEEN == []


def test_ensemble_members_say_which_points_they_were_scored_on(stores):
    from sweep.ensemble import members
    from sweep.tracking import Tracker, default_tracking_uri

    tracker = Tracker(default_tracking_uri())
    exp = tracker.ensure_experiment("cls")
    old = tracker.start_run(exp, "t0", tags={})
    tracker.log_batch(old, params={"data.val_points": "labelled"})
    new = tracker.start_run(exp, "t1", tags={})
    tracker.create_registered_model("spinesweep-cls", "test")
    # promoted before the tag existed (read from the run's params), and one with the tag
    tracker.create_model_version("spinesweep-cls", source="runs:/x/promoted", run_id=old, tags={"ensemble": "default"},
                                 description="")
    tracker.create_model_version("spinesweep-cls", source="runs:/y/promoted", run_id=new,
                                 tags={"ensemble": "default", "val_points": "oof"}, description="")
    assert [m.val_points for m in members(default_tracking_uri(), with_frames=False)] == ["labelled", "oof"]

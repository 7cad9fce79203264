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
    with pytest.raises(ConfigError, match=r"^data\.val_points_file: required with data\.val_points: oof"):
        TrainConfig().with_overrides({"data.val_points": "oof"})
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


def test_oof_file_given_as_a_uri_is_refused_by_the_trainer(layout, phantom_dir):
    cfg = _cfg(phantom_dir, **{"data.val_points": "oof", "data.val_points_file": "runs:/abc123"})
    with pytest.raises(ValPointsError, match="is a URI; the trainer reads a local CSV only"):
        fold_datasets(cfg, layout, default_cache_dir(), data_fingerprint(layout))


def test_point_table_reads_a_points_file(layout, tmp_path):
    """`PointTable.from_csv` (predict's `--localizer` points) reads the form `write_points` writes."""
    from trainer.points.prior import PointTable

    table = PointTable.from_csv(write_points(layout.coordinates, tmp_path / "p.csv"))
    pd.testing.assert_frame_equal(table.rows, layout.coordinates.reset_index(drop=True), check_dtype=False)

"""The localiser (trainer/points/): grid mapping, heatmaps and their decoding, the point metrics,
the config, the competition-form output; the slow test trains it on the phantom."""
import numpy as np
import pandas as pd
import pytest

from trainer.config import ConfigError, TrainConfig
from trainer.data.cache import default_cache_dir
from trainer.data.layout import Layout, read_coordinates
from trainer.data.volumes import SeriesRef, VolumeStore
from trainer.points.data import (SliceFrame, inference_series, labelled_series, render_heatmaps, series_points,
                                 slice_frame, slice_targets)
from trainer.points.locate import SeriesMaps, decode_study, peak
from trainer.points.metrics import score_points, with_patient_positions
from trainer.points.model import CHANNELS, GROUPS


@pytest.mark.parametrize("flip_x,flip_y", [(False, False), (True, False), (False, True), (True, True)])
def test_slice_frame_maps_pixels_to_the_grid_and_back(flip_x, flip_y):
    f = SliceFrame(rows=256, cols=200, size=96, flip_x=flip_x, flip_y=flip_y)
    x, y = np.array([0.0, 17.3, 199.0]), np.array([255.0, 40.5, 0.0])
    u, v = f.to_model(x, y)
    assert np.allclose(f.to_image(u, v), (x, y))
    assert (u[0] > u[2]) == flip_x  # column 0 lands on the right when flipped


def test_a_rendered_gaussian_decodes_to_its_position():
    hm = render_heatmaps([(3, 41.3, 17.8, 1.0)], size=96, stride=4, sigma=1.5)
    h, u, v = peak(hm[3], stride=4)
    assert h > 0.9 and abs(u - 41.3) < 0.6 and abs(v - 17.8) < 0.6
    assert hm[[0, 1, 2, 4]].max() == 0


def test_config_task_and_localizer_section_round_trip():
    cfg = TrainConfig().with_overrides({"task": "localize", "localizer.sigma": "2.5", "localizer.img_size": "64"})
    assert TrainConfig.from_flat(cfg.to_flat()) == cfg
    assert cfg.to_flat()["task"] == "localize" and cfg.to_flat()["localizer.score"] == "p90_mm"
    with pytest.raises(ConfigError, match="localizer.img_size"):
        TrainConfig().with_overrides({"localizer.img_size": "50"})
    with pytest.raises(ConfigError, match="task"):
        TrainConfig().with_overrides({"task": "detect"})


def _oracle_maps(layout: Layout, store: VolumeStore, sid: int, size: int = 64, stride: int = 4) -> list[SeriesMaps]:
    """The heatmaps a perfect model would emit for one study: rendered from its labelled points."""
    coords = layout.coordinates[layout.coordinates["study_id"] == sid]
    labelled = labelled_series(coords, GROUPS)
    maps = []
    for group, series_id in inference_series(layout.series_of(sid), GROUPS):
        vol = store.open(SeriesRef(sid, series_id, layout.series_dir(sid, series_id)))
        m = SeriesMaps(group, series_id, vol)
        pts = series_points(labelled[(group, series_id)], vol, group) if (group, series_id) in labelled else None
        for j in range(len(vol)):
            fr = slice_frame(vol, j, size, group)
            targets = slice_targets(vol, j, pts, fr, 2.0) if pts is not None else []
            m.indices.append(j)
            m.frames.append(fr)
            m.probs.append(render_heatmaps(targets, size, stride, 1.5)[list(CHANNELS[group])])
        maps.append(m)
    return maps


def test_decoding_perfect_heatmaps_recovers_every_labelled_point(layout):
    """Slice choice, the left/right split of the foramina by patient x and the level of each axial
    point through the sagittal canal points: with the heatmaps a perfect model would emit."""
    store = VolumeStore(default_cache_dir())

    def load(s, i):
        return store.open(SeriesRef(int(s), int(i), layout.series_dir(s, i)))

    ids = layout.study_ids[:4]
    pred = pd.concat([decode_study(sid, _oracle_maps(layout, store, sid), 4) for sid in ids], ignore_index=True)
    truth = with_patient_positions(layout.coordinates[layout.coordinates["study_id"].isin(ids)].reset_index(drop=True), load)
    res = score_points(truth, pred)
    assert res.groups["level_accuracy"] == 1.0
    assert res.groups["sagittal_median_mm"] < 1.5 and res.groups["axial_median_mm"] < 2.5
    assert res.groups["p90_mm"] < 4.0  # a neighbouring slice at most (3-4 mm)


def test_a_foramen_is_looked_for_at_its_own_levels_height(layout):
    """A lateral slice alone hardly tells one level's foramen from the next: here the L3/L4
    channel of Sagittal T1 fires more strongly at the L4/L5 foramen than at its own. Decoding
    still places it at L3/L4, by the height of the L3/L4 canal point carried into the slice."""
    store = VolumeStore(default_cache_dir())

    def load(s, i):
        return store.open(SeriesRef(int(s), int(i), layout.series_dir(s, i)))

    ids = layout.study_ids[:3]
    preds = []
    for sid in ids:
        maps = _oracle_maps(layout, store, sid, size=128)  # discs about 5 cells apart: distinct peaks
        for m in maps:
            if m.group == "sag_t1":
                m.probs = [np.stack([p[0], p[1], np.maximum(p[2], 1.5 * p[3]), p[3], p[4]]) for p in m.probs]
        preds.append(decode_study(sid, maps, 4))
    pred = pd.concat(preds, ignore_index=True)
    truth = with_patient_positions(layout.coordinates[layout.coordinates["study_id"].isin(ids)].reset_index(drop=True), load)
    res = score_points(truth, pred)
    assert res.groups["sag_t1_level_accuracy"] == 1.0 and res.groups["sag_t1_p90_mm"] < 4.0


def test_point_scores_count_wrong_levels_and_missing_points():
    base = pd.DataFrame(dict(study_id=1, series_id=9, instance_number=[3, 3, 3], condition="spinal_canal_stenosis",
                             level=["l1_l2", "l2_l3", "l3_l4"], x=0.0, y=0.0, patient_x=0.0, patient_y=0.0,
                             patient_z=[70.0, 35.0, 0.0], slice=[4, 4, 4]))
    assert score_points(base, base).groups["level_accuracy"] == 1.0 and score_points(base, base).score == 0.0
    swapped = base.assign(patient_z=[35.0, 70.0, 0.0])
    res = score_points(base, swapped, "median_mm")
    assert res.groups["level_accuracy"] == pytest.approx(1 / 3) and res.score == pytest.approx(35.0)
    assert score_points(base, base.iloc[:2]).groups["p90_mm"] == 100.0  # a point without prediction: MISSED_MM
    with pytest.raises(ValueError, match="localiser score"):
        score_points(base, base, "mean_mm")


def test_earlier_folds_alone_are_scored_by_the_task_that_made_them():
    """A promotion that trains no fold (``--folds evaluated``) scores the trial's own OOF rows: a
    localiser's by the point error, not by the classifier's metric."""
    from sweep.evaluate import FoldScores

    base = pd.DataFrame(dict(study_id=1, series_id=9, instance_number=[3, 3], condition="spinal_canal_stenosis",
                             level=["l1_l2", "l2_l3"], x=0.0, y=0.0, patient_x=0.0, patient_y=0.0,
                             patient_z=[35.0, 0.0], slice=[4, 4]))
    cfg = TrainConfig().with_overrides({"task": "localize", "localizer.score": "median_mm"})
    res = FoldScores(extra_oof=[base.assign(patient_z=[35.0, 10.0])], extra_solution=[base], config=cfg).score()
    assert res.score == pytest.approx(5.0) and res.groups["level_accuracy"] == 1.0


def test_localize_writes_rows_the_layout_reader_takes_back(layout, tmp_path):
    from trainer.infer import LevelPrior
    from trainer.points.locate import localize

    rows = localize(LevelPrior.fit(layout, max_studies=3), layout.root, "test")
    path = tmp_path / "points.csv"
    rows.to_csv(path, index=False)
    back = read_coordinates(path)
    assert list(rows.columns) == ["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]
    assert len(back) == len(rows) == 15 * layout.test_series["study_id"].nunique()  # sagittal points only
    assert set(back["study_id"]) == set(layout.test_series["study_id"])


def test_levels_are_placed_jointly_in_head_to_feet_order():
    """Each level's own channel peaks higher at the next disc down: one by one, every level would
    be one disc off; placed jointly in order, each is on its own disc."""
    from trainer.points.locate import ordered_levels

    rows = [2, 6, 10, 14, 18]
    stack = np.zeros((2, 5, 24, 24), dtype=np.float32)
    for lv in range(5):
        targets = [(lv, 40.0, 4 * rows[lv] + 1.5, 0.6)]
        if lv < 4:
            targets.append((lv, 40.0, 4 * rows[lv + 1] + 1.5, 0.7))
        stack[1] += render_heatmaps(targets, 96, 4, 1.0)[:5]
    assert [int(round((peak(stack[1, lv], 4)[2] + 0.5) / 4 - 0.5)) for lv in range(4)] == rows[1:]
    placed = ordered_levels(stack, 4)
    assert [k for k, _, _ in placed] == [1] * 5
    assert np.allclose([v for _, _, v in placed], [4 * r + 1.5 for r in rows], atol=0.5)


@pytest.mark.slow
def test_the_localizer_learns_the_phantom_and_its_points_feed_the_layout_reader(phantom30_dir, tmp_path):
    """fit(task=localize) on a 30-study phantom: its out-of-fold points land far closer than the
    mean-position guess's; its checkpoint places every point of a study as a Localizer, in rows
    the layout reader takes back."""
    phantom_dir = phantom30_dir
    from trainer.fit import fit
    from trainer.points.locate import Localizer, localize

    cfg = TrainConfig.from_dict(dict(
        task="localize", data=dict(data_dir=str(phantom_dir)), device="cpu", output_dir=str(tmp_path / "run"),
        model=dict(backbone="test_resnet", pretrained=False, in_chans=3),
        optim=dict(lr=3e-3, epochs=12, batch_size=16, warmup_ratio=0.1), localizer=dict(img_size=64, negatives=0.15)))
    seen = []
    result = fit(cfg, callbacks=[lambda epoch, m: seen.append(m["score"])])
    assert len(seen) == 12 and result.best_epoch >= 1
    assert result.groups["median_mm"] < 0.5 * result.prior_groups["median_mm"], (result.groups, result.prior_groups)
    assert result.groups["level_accuracy"] > result.prior_groups["level_accuracy"]
    assert set(result.tables) == {"oof_coordinates.csv"}
    result.tables["oof_coordinates.csv"].to_csv(tmp_path / "oof.csv", index=False)
    assert len(read_coordinates(tmp_path / "oof.csv")) == len(result.oof)
    loc = Localizer.from_checkpoints([result.checkpoint])
    rows = localize(loc, phantom_dir, "test")
    rows.to_csv(tmp_path / "test_points.csv", index=False)
    back = read_coordinates(tmp_path / "test_points.csv")
    assert len(back) == 25 * 2  # every point of both test studies


def test_the_audit_finds_planted_errors_and_nothing_in_clean_labels(layout):
    from trainer.points.audit import audit_points

    store = VolumeStore(default_cache_dir())

    def load(s, i):
        return store.open(SeriesRef(int(s), int(i), layout.series_dir(s, i)))

    a, b, c = layout.study_ids[:3]
    coords = layout.coordinates[layout.coordinates["study_id"].isin([a, b, c])].reset_index(drop=True)
    assert audit_points(coords, load).empty
    bad = coords.copy()
    canal = bad.index[(bad["study_id"] == a) & (bad["condition"] == "spinal_canal_stenosis")]
    i1, i2 = [i for i in canal if bad.at[i, "level"] in ("l1_l2", "l2_l3")]
    bad.loc[[i1, i2], "level"] = bad.loc[[i2, i1], "level"].to_numpy()  # swapped levels
    left = bad.index[(bad["study_id"] == b) & (bad["condition"] == "left_neural_foraminal_narrowing")
                     & (bad["level"] == "l3_l4")][0]
    right = bad.index[(bad["study_id"] == b) & (bad["condition"] == "right_neural_foraminal_narrowing")
                      & (bad["level"] == "l3_l4")][0]
    bad.loc[left, ["instance_number", "x", "y"]] = bad.loc[right, ["instance_number", "x", "y"]].to_numpy()
    lost = bad.index[bad["study_id"] == c][0]
    bad.loc[lost, "instance_number"] = 99999
    found = audit_points(bad, load)
    reasons = {(int(r.study_id), r.reason) for r in found.itertuples()}
    assert reasons == {(a, "levels_out_of_order"), (b, "wrong_side"), (c, "instance_missing")}
    assert found.iloc[0]["reason"] == "instance_missing"  # worst first
    assert set(found.loc[found["reason"] == "levels_out_of_order", "level"]) == {"l1_l2", "l2_l3"}


def test_the_audit_reads_either_form_of_a_localisers_points(phantom_copy, tmp_path, capsys):
    """`data audit --oof` takes coordinate rows as `localize` writes them (no patient columns: they
    are computed) as well as a trial's oof.csv; a missing file is one error line; the review list
    is in the label file's spelling, so it joins train_label_coordinates.csv."""
    from spinesweep.cli import main

    labels = pd.read_csv(phantom_copy / "train_label_coordinates.csv")
    moved = labels.copy()
    moved.loc[0, "y"] += 40  # the "localiser" disagrees with one labelled point by 40 pixels
    moved.to_csv(tmp_path / "points.csv", index=False)
    out = tmp_path / "audit.csv"
    assert main(["data", "audit", "--data", str(phantom_copy), "--oof", str(tmp_path / "points.csv"),
                 "--out", str(out)]) == 0
    found = pd.read_csv(out)
    assert list(found["reason"]) == ["far_from_prediction"]
    key = ["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]
    assert found[key].merge(labels, on=key).shape[0] == 1  # the label file's own row and spelling
    capsys.readouterr()
    assert main(["data", "audit", "--data", str(phantom_copy), "--oof", str(tmp_path / "nope.csv")]) == 2
    assert "nope.csv: localiser points file not found" in capsys.readouterr().err


def test_a_localiser_is_named_or_the_error_says_what_to_do(layout, tmp_path):
    from sweep.localize import point_source
    from trainer.errors import UserError

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # never created: neither name reaches MLflow
    with pytest.raises(UserError, match="expected prior, best"):
        point_source("yolo", layout.root, uri)
    not_a_localiser = tmp_path / "classifier.pt"
    import torch

    torch.save(dict(config=TrainConfig().to_dict(), state_dict={}), not_a_localiser)
    with pytest.raises(UserError, match="not a localiser checkpoint"):
        point_source(str(not_a_localiser), layout.root, uri)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: a folder without checkpoints"):
        point_source(str(tmp_path / "empty"), layout.root, uri)
    with pytest.raises(UserError, match="device 'nosuchdev': "):  # the device, not the checkpoint, is named
        point_source(str(not_a_localiser), layout.root, uri, device="nosuchdev")
    for junk, what in ((b'{"a": 1}', "UnpicklingError"), (b"", "EOFError")):  # not a checkpoint at all
        (tmp_path / "junk.pt").write_bytes(junk)
        with pytest.raises(UserError, match=f"junk.pt: not a spinesweep checkpoint \\({what}"):
            point_source(str(tmp_path / "junk.pt"), layout.root, uri)


def test_a_localiser_run_or_study_that_is_not_one_is_named(quick_copy, layout):
    """``runs:/ID`` of a run the store does not have, and ``study:NAME`` of a classifier study: one
    error line naming it, not MLflow's traceback or "no complete trial"."""
    from sweep.localize import point_source
    from sweep.tracking import default_tracking_uri
    from trainer.errors import UserError

    uri = default_tracking_uri()
    with pytest.raises(UserError, match="no run '0123456789abcdef'"):
        point_source("runs:/0123456789abcdef", layout.root, uri)
    with pytest.raises(UserError, match="study 'quick' is not a localiser study"):
        point_source("study:quick", layout.root, uri)


def test_without_a_localiser_study_best_says_how_to_make_one(layout, stores):
    """No localiser study ``localizer``: the error says how to make one, and names the localiser
    studies the store does hold (a --smoke one is ``localizer-smoke``) as ``study:NAME``."""
    from sweep.localize import point_source
    from sweep.tracking import Tracker, default_tracking_uri
    from trainer.errors import UserError

    uri = default_tracking_uri()
    with pytest.raises(UserError, match="optuna-run localizer") as e:
        point_source(None, layout.root, uri)
    assert "this store has" not in str(e.value)
    tracker = Tracker(uri)
    for study, task in (("localizer-smoke", "localize"), ("scs", "classify")):
        run = tracker.start_run(tracker.ensure_experiment(study), "trial 0", tags={"trial": 0})
        tracker.log_batch(run, params={"task": task})
        tracker.end_run(run)
    with pytest.raises(UserError, match="optuna-run localizer") as e:
        point_source(None, layout.root, uri)
    assert "this store has study:localizer-smoke:" in str(e.value)


def test_the_audit_tells_a_repeated_instance_from_a_missing_one(phantom_copy, tmp_path):
    """A labelled instance number that two files hold is `instance_repeated`, naming both files,
    not `instance_missing` (the point exists twice; which file was meant is the question)."""
    import pydicom

    from trainer.data.layout import Layout
    from trainer.points.audit import audit_points

    layout = Layout(phantom_copy)
    coords = layout.coordinates
    point = coords[coords["condition"] == "spinal_canal_stenosis"].iloc[0]
    sid, series, inst = int(point.study_id), int(point.series_id), int(point.instance_number)
    folder = layout.series_dir(sid, series)
    numbers = sorted(int(f.stem) for f in folder.glob("*.dcm"))
    ds = pydicom.dcmread(folder / f"{numbers[(numbers.index(inst) + 5) % len(numbers)]}.dcm")
    ds.InstanceNumber = inst
    ds.save_as(folder / "copy.dcm", enforce_file_format=False)
    store = VolumeStore(tmp_path / "cache")

    def load(s, i):
        return store.open(SeriesRef(int(s), int(i), layout.series_dir(s, i)))

    found = audit_points(coords[(coords["study_id"] == sid) & (coords["series_id"] == series)], load)
    hit = found[found["instance_number"] == inst]
    assert len(hit) and set(hit["reason"]) == {"instance_repeated"}
    assert f"{inst}.dcm" in hit.iloc[0]["detail"] and "copy.dcm" in hit.iloc[0]["detail"]

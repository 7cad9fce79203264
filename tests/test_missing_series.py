"""A level whose crop cannot be built (a series absent from the descriptions CSV or from disk,
unreadable, no slice near the point) is never shown to a model as blank pixels: in validation, in
`predict_studies` (the registered model's and `predict`'s path) it gets the training label
frequencies, and says why."""
import shutil

import numpy as np
import pandas as pd
import pytest

from trainer.config import TrainConfig
from trainer.data.crops import lacking_conditions
from trainer.data.layout import Layout

CONDITIONS = ["spinal_canal_stenosis", "left_neural_foraminal_narrowing", "left_subarticular_stenosis"]


def test_a_condition_lacks_its_crop_only_when_its_own_block_is_absent():
    blocks = ["sag_t2", "sag_t1_left", "sag_t1_right", "axial"]
    present = np.array([[True, True, True, True], [False, True, True, False], [True, False, True, True]])
    np.testing.assert_array_equal(lacking_conditions(blocks, present, CONDITIONS),
                                  [[False, False, False], [True, False, True], [False, True, False]])
    # a condition whose plane the spec does not use is not "missing": the model never saw it there
    np.testing.assert_array_equal(lacking_conditions(["sag_t2"], np.array([[False]]), CONDITIONS), [[True, False, False]])


def test_fallback_lines_name_each_study_what_was_missing_and_what_was_done():
    from sweep.predict import fallback_lines

    why = "no Sagittal T2/STIR series in the series descriptions"
    rows = pd.DataFrame({"row_id": [f"7_spinal_canal_stenosis_{lv}" for lv in ("l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1")]
                         + ["9_left_subarticular_stenosis_l4_l5"], "member": "m",
                         "why": [why] * 5 + ["point outside (series 3 instance 4 (900, 10))"]})
    lines = fallback_lines(rows)
    assert lines == [f"predict: study 7: {why}: spinal_canal_stenosis at all 5 levels -> 5 rows given the training "
                     "label frequencies (no crop to show the model)",
                     "predict: study 9: point outside (series 3 instance 4 (900, 10)): left_subarticular_stenosis at "
                     "l4_l5 -> 1 rows given the training label frequencies (no crop to show the model)"]
    assert fallback_lines(rows.iloc[:0]) == []


@pytest.mark.slow
def test_missing_series_get_the_training_label_frequencies_in_validation_and_prediction(phantom_copy, tmp_path):
    from trainer.data.cache import data_fingerprint, default_cache_dir
    from trainer.fit import fit, load_checkpoint, train_val_split
    from trainer.infer import predict_studies

    layout = Layout(phantom_copy)
    cfg = TrainConfig.from_dict(dict(
        model=dict(backbone="test_efficientnet", pretrained=False, head="linear"),
        optim=dict(epochs=1, batch_size=8, lr=2e-3),
        data=dict(img_size=32, sag_t2_slices=3, sag_t1_slices=1, axial_slices=1, n_folds=2, conditions=CONDITIONS,
                  data_dir=str(phantom_copy)),
        output_dir=str(tmp_path / "run")))
    # a validation study loses its Sagittal T2/STIR folder
    _, val = train_val_split(layout, cfg, default_cache_dir(""), data_fingerprint(layout))
    victim = val[0]
    (sag_t2,) = layout.series_of(victim)["Sagittal T2/STIR"]
    shutil.rmtree(layout.series_dir(victim, sag_t2))
    result = fit(cfg)
    _, _, ckpt = load_checkpoint(result.checkpoint)
    frequencies = np.asarray(ckpt["label_prior"])
    oof = result.oof.set_index("row_id")
    cols = ["normal_mild", "moderate", "severe"]
    canal = oof.loc[[i for i in oof.index if i.startswith(f"{victim}_spinal_canal")]]
    assert len(canal) >= 4
    np.testing.assert_allclose(canal[cols].to_numpy(), np.tile(frequencies[0], (len(canal), 1)), atol=1e-6)
    others = oof.loc[[i for i in oof.index if i.startswith(f"{victim}_left_neural")]]
    assert not np.allclose(others[cols].to_numpy(), frequencies[1], atol=1e-4)  # its own crops: the model's answer

    # two test studies lose their Sagittal T2/STIR: one from the CSV and the disk, one only on disk
    tests = pd.read_csv(phantom_copy / "test_series_descriptions.csv")
    a, b = sorted(tests["study_id"].unique())[:2]
    sag = tests[tests["series_description"] == "Sagittal T2/STIR"].set_index("study_id")["series_id"]
    tests[~((tests["study_id"] == a) & (tests["series_description"] == "Sagittal T2/STIR"))].to_csv(
        phantom_copy / "test_series_descriptions.csv", index=False)
    for sid in (a, b):
        shutil.rmtree(phantom_copy / "test_images" / str(sid) / str(sag[sid]))
    pred = predict_studies([result.checkpoint], phantom_copy, [a, b]).set_index("row_id")
    assert len(pred) == 2 * 5 * len(CONDITIONS)
    for sid, why in ((a, "no Sagittal T2/STIR series in the series descriptions"),
                     (b, f"Sagittal T2/STIR series {sag[b]} unreadable or missing on disk")):
        for c, cond in ((0, "spinal_canal_stenosis"), (2, "left_subarticular_stenosis")):  # axial: from the canal point
            rows = pred.loc[[f"{sid}_{cond}_{lv}" for lv in ("l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1")]]
            np.testing.assert_allclose(rows[cols].to_numpy(), np.tile(frequencies[c], (5, 1)), atol=1e-9)
            assert all(why in f for f in rows["fallback"]), rows["fallback"].tolist()
        foramen = pred.loc[[f"{sid}_left_neural_foraminal_narrowing_{lv}" for lv in ("l1_l2", "l3_l4")]]
        assert (foramen["fallback"] == "").all()
        assert not np.allclose(foramen[cols].to_numpy(), frequencies[1], atol=1e-4)

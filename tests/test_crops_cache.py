import os
import shutil

import numpy as np
import pandas as pd
import pytest

from trainer.config import DataConfig
from trainer.data import cache as cache_mod
from trainer.data import volumes as volumes_mod
from trainer.data.cache import data_fingerprint
from trainer.data.crops import CropSpec, crop_resize, crop_stack
from trainer.data.dicom import read_series
from trainer.data.layout import Layout
from trainer.data.samples import SampleSource
from trainer.data.volumes import SeriesRef, VolumeStore



def spec(**kw) -> CropSpec:
    return CropSpec.from_config(DataConfig(img_size=kw.pop("img_size", 32), **kw))


@pytest.mark.parametrize("x,y", [(40.0, 25.0), (3.0, 60.0), (70.0, 70.0)])
@pytest.mark.parametrize("size", [31, 32, 64])
def test_the_labelled_point_lands_at_the_crop_centre(x, y, size):
    img = np.zeros((80, 96), dtype=np.uint8)
    img[int(y), int(x)] = 255
    crop = crop_resize(img, x, y, ratio=0.15, size=size)
    cy, cx = np.unravel_index(np.argmax(crop), crop.shape)
    c = (size - 1) / 2
    assert abs(cx - c) <= 1 and abs(cy - c) <= 1
    # half side = ratio x larger side = 14.4 px, so the crop spans 28.8 input px
    assert crop.shape == (size, size)


def test_crop_outside_the_image_is_zero_padded():
    img = np.full((50, 50), 200, dtype=np.uint8)
    crop = crop_resize(img, 0, 0, ratio=0.2, size=20)
    assert crop[0, 0] == 0 and crop[-1, -1] == 200


def test_neighbour_slices_follow_the_patient_point(tmp_path):
    # dot at the same patient position in each slice; the stack keeps it centred
    from helpers import SAGITTAL, series_plan
    from trainer.data.phantom import write_series

    plan = series_plan(SAGITTAL, [(x, -16.0, 16.0) for x in (0.0, 3.0, 6.0, 9.0)])
    images = [np.full((64, 64), 100, dtype=np.uint16) for _ in range(4)]
    for im in images:
        im[30, 20] = 4000
    write_series(tmp_path, images, plan, [1, 2, 3, 4], 1, 2)
    vol = read_series(tmp_path)
    stack = crop_stack(vol, 1, 20, 30, n=5, ratio=0.1, size=15)
    assert stack.shape == (5, 15, 15)
    for s in stack:
        assert np.unravel_index(np.argmax(s), s.shape) == (7, 7)
    # clamped at the ends: slice 0 repeats for offset -2
    np.testing.assert_array_equal(stack[0], stack[1])


def source(layout, root, **kw) -> SampleSource:
    return SampleSource(layout, spec(**kw), VolumeStore(root))


def test_study_crops_put_every_labelled_point_at_its_centre(layout):
    """Crops from the phantom: at every labelled point, the crop centre equals the DICOM pixel."""
    src = source(layout, cache_mod.default_cache_dir() / "centre", img_size=33, sag_t2_slices=1, sag_t1_slices=1,
                 axial_slices=1, window_ratio=0.02)
    sid = layout.study_ids[0]
    crops = src.study_crops(sid)
    assert crops.images.shape == (5, 4, 33, 33)
    c = layout.coordinates[(layout.coordinates.study_id == sid)
                           & (layout.coordinates.condition == "spinal_canal_stenosis")]
    for r in c.itertuples():
        vol = read_series(layout.series_dir(sid, r.series_id))
        px = vol.images[vol.index_of_instance(r.instance_number)]
        lv = ["l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1"].index(r.level)
        # bilinear value at the point
        x0, y0 = int(r.x), int(r.y)
        fx, fy = r.x - x0, r.y - y0
        ref = (px[y0, x0] * (1 - fx) * (1 - fy) + px[y0, x0 + 1] * fx * (1 - fy)
               + px[y0 + 1, x0] * (1 - fx) * fy + px[y0 + 1, x0 + 1] * fx * fy)
        assert abs(int(crops.images[lv, 0, 16, 16]) - ref) <= 1.5


def test_missing_series_point_and_instance_degrade_one_block(phantom_copy):
    layout = Layout(phantom_copy)
    sid = layout.study_ids[1]
    series = layout.series_of(sid)
    shutil.rmtree(layout.series_dir(sid, series["Sagittal T1"][0]))  # a series folder missing
    coords = pd.read_csv(phantom_copy / "train_label_coordinates.csv")
    mine = coords.study_id == sid
    scs = mine & (coords.condition == "Spinal Canal Stenosis")
    coords.loc[scs & (coords.level == "L1/L2"), "instance_number"] = 999999  # missing instance
    coords.loc[scs & (coords.level == "L2/L3"), "x"] = 5000.0  # outside the image
    coords.to_csv(phantom_copy / "train_label_coordinates.csv", index=False)
    layout = Layout(phantom_copy)
    src = source(layout, phantom_copy / "cache")
    with pytest.warns(UserWarning) as rec:
        crops = src.study_crops(sid)
    messages = " | ".join(str(w.message) for w in rec)
    assert f"study {sid} series {series['Sagittal T1'][0]}" in messages and "not found" in messages
    assert "instance 999999 not found" in messages and "outside the image" in messages
    reasons = {(f["level"], f["block"]): f["reason"] for f in crops.flags}
    assert reasons[("l1_l2", "sag_t2")] == "instance_missing"
    assert reasons[("l2_l3", "sag_t2")] == "point_outside"
    assert reasons[("l3_l4", "sag_t1_left")] == "series_unreadable"
    # blocks: sag_t2, sag_t1_left, sag_t1_right, axial
    assert not crops.present[:, 1:3].any() and (crops.images[:, 5:11] == 0).all()
    assert not crops.present[0, 0] and crops.present[2:, 0].all()
    assert crops.present[:, 3].sum() >= 4  # axial untouched


def test_a_new_window_or_slice_count_decodes_nothing_and_adds_no_bytes(phantom_copy, monkeypatch):
    layout = Layout(phantom_copy)
    root = phantom_copy / "cache"
    calls = []
    real = volumes_mod.read_series
    monkeypatch.setattr(volumes_mod, "read_series", lambda d: calls.append(d) or real(d))
    ids = layout.study_ids[:3]
    n = sum(len(s) for sid in ids for s in layout.series_of(sid).values())  # 3 or more series per study
    assert n >= 9
    r1 = source(layout, root).prepare(ids)
    assert (r1.decoded, r1.reused) == (n, 0) and len(calls) == n  # every series holds labelled points
    size = VolumeStore(root).usage()
    r2 = source(layout, root).prepare(ids)
    assert (r2.decoded, r2.reused) == (0, n) and len(calls) == n
    for change in (dict(window_ratio=0.2, img_size=48), dict(sag_t2_slices=7, axial_slices=5)):
        src = source(layout, root, **change)
        r3 = src.prepare(ids)
        images, present = src.sample(ids[0], 2)
        assert r3.decoded == 0 and len(calls) == n and present.any()
        assert images.shape == (src.spec.n_slices, src.spec.img_size, src.spec.img_size)
    assert VolumeStore(root).usage() == size


def test_only_the_series_a_spec_cuts_from_are_decoded(phantom_copy):
    layout = Layout(phantom_copy)
    sid = layout.study_ids[0]
    report = source(layout, phantom_copy / "cache", conditions=("spinal_canal_stenosis",)).prepare([sid])
    assert report.decoded == 1  # Sagittal T2/STIR only
    report = source(layout, phantom_copy / "cache").prepare([sid], every_series=True)
    assert report.decoded == sum(len(s) for s in layout.series_of(sid).values()) - 1  # all the others


def test_changed_data_or_corrupt_entries_are_rebuilt(phantom_copy):
    layout = Layout(phantom_copy)
    store = VolumeStore(phantom_copy / "cache")
    sid = layout.study_ids[0]
    series = layout.series_of(sid)["Sagittal T2/STIR"][0]
    ref = SeriesRef(sid, series, layout.series_dir(sid, series))
    good = np.concatenate([im.ravel() for im in store.open(ref).images]).copy()
    npy, meta, _ = store.paths(sid, series)
    npy.write_bytes(npy.read_bytes()[:100])  # truncated entry on disk
    with pytest.warns(UserWarning, match="corrupt cache entry rebuilt"):
        vol = VolumeStore(phantom_copy / "cache").open(ref)
    np.testing.assert_array_equal(np.concatenate([im.ravel() for im in vol.images]), good)
    meta.write_text("{garbage")
    with pytest.warns(UserWarning, match="corrupt cache entry rebuilt"):
        assert VolumeStore(phantom_copy / "cache").ensure(ref)
    # a changed DICOM file changes the entry's key: rebuilt
    f = next(ref.folder.glob("*.dcm"))
    f.write_bytes(f.read_bytes())
    os.utime(f, ns=(1, 1))
    assert VolumeStore(phantom_copy / "cache").ensure(ref)
    assert not VolumeStore(phantom_copy / "cache").ensure(ref)


def test_interrupted_write_leaves_no_entry(phantom_copy, monkeypatch):
    layout = Layout(phantom_copy)
    store = VolumeStore(phantom_copy / "cache")
    sid = layout.study_ids[0]
    series = layout.series_of(sid)["Sagittal T1"][0]
    ref = SeriesRef(sid, series, layout.series_dir(sid, series))

    def disk_full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(volumes_mod, "atomic_write_bytes", disk_full)
    with pytest.raises(OSError, match=f"cannot write study {sid} series {series}.*No space left"):
        store.ensure(ref)
    monkeypatch.undo()
    assert not store.cached(ref)  # nothing half-written is trusted
    assert store.ensure(ref) and store.cached(ref)


def test_a_series_with_no_readable_file_is_remembered_not_retried(phantom_copy, monkeypatch):
    layout = Layout(phantom_copy)
    sid = layout.study_ids[0]
    series = layout.series_of(sid)["Axial T2"][0]
    ref = SeriesRef(sid, series, layout.series_dir(sid, series))
    for f in ref.folder.glob("*.dcm"):
        f.write_bytes(b"not a dicom file")
    store = VolumeStore(phantom_copy / "cache")
    with pytest.warns(UserWarning, match="unreadable DICOM slice skipped"):
        assert store.ensure(ref)
    monkeypatch.setattr(volumes_mod, "read_series", lambda d: pytest.fail("decoded again"))
    with pytest.raises(FileNotFoundError, match="no readable DICOM file"):
        store.open(ref)


def test_data_fingerprint_is_content_based(phantom_dir, phantom_copy):
    assert data_fingerprint(Layout(phantom_dir)) == data_fingerprint(Layout(phantom_copy))
    (phantom_copy / "train.csv").write_text((phantom_copy / "train.csv").read_text().replace("Moderate", "Severe", 1))
    assert data_fingerprint(Layout(phantom_dir)) != data_fingerprint(Layout(phantom_copy))

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from trainer.data.layout import LABEL_COLUMNS, Layout
from trainer.data.phantom import make_phantom


def tree_hash(root: Path) -> str:
    h = hashlib.sha1()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_phantom_is_deterministic_per_seed(tmp_path):
    make_phantom(tmp_path / "a", studies=1, test_studies=1, seed=3)
    make_phantom(tmp_path / "b", studies=1, test_studies=1, seed=3, jobs=2)
    make_phantom(tmp_path / "c", studies=1, test_studies=0, seed=4)
    assert tree_hash(tmp_path / "a") == tree_hash(tmp_path / "b")
    assert tree_hash(tmp_path / "a" / "train_images") != tree_hash(tmp_path / "c" / "train_images")


def test_phantom_has_the_rsna_layout_and_dicom_tags(phantom_dir):
    root = phantom_dir
    assert list(pd.read_csv(root / "train.csv").columns) == ["study_id", *LABEL_COLUMNS]
    assert list(pd.read_csv(root / "sample_submission.csv").columns) == ["row_id", "normal_mild", "moderate", "severe"]
    layout = Layout(root)
    layout.validate()
    sub = pd.read_csv(root / "sample_submission.csv")
    assert len(sub) == 25 * layout.test_series.study_id.nunique()
    files = sorted((root / "train_images").rglob("*.dcm"))
    ds = pydicom.dcmread(files[0])
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
                "InstanceNumber", "SeriesDescription", "PatientPosition", "StudyInstanceUID",
                "SeriesInstanceUID", "SOPInstanceUID"):
        assert tag in ds, tag
    assert (ds.Modality, ds.BitsAllocated, ds.BitsStored, ds.PhotometricInterpretation) == ("MR", 16, 12, "MONOCHROME2")
    test_file = next((root / "test_images").rglob("*.dcm"))
    assert "SliceThickness" not in pydicom.dcmread(test_file)  # as the hidden test set may be


def test_phantom_varies_what_real_data_varies(phantom_dir):
    layout = Layout(phantom_dir)  # the session's 10 studies: 4 image sizes, 9 slice counts, 21 reversed series
    sizes, starts, reversed_, ffs, counts = set(), [], 0, 0, set()
    for sid in layout.study_ids:
        for desc, ids in layout.series_of(sid).items():
            files = list(layout.series_dir(sid, ids[0]).glob("*.dcm"))
            counts.add(len(files))
            numbers = sorted(int(f.stem) for f in files)
            starts.append(numbers[0])
            a, b = (pydicom.dcmread(layout.series_dir(sid, ids[0]) / f"{n}.dcm") for n in numbers[:2])
            sizes.add(a.Rows)
            normal = np.cross(np.array(a.ImageOrientationPatient[:3], float), np.array(a.ImageOrientationPatient[3:], float))
            step = (np.array(b.ImagePositionPatient, float) - np.array(a.ImagePositionPatient, float)) @ normal
            reversed_ += step < 0
            ffs += a.PatientPosition == "FFS"
    assert len(sizes) >= 3 and len(counts) >= 5
    assert any(s > 1 for s in starts) and reversed_ >= 1 and ffs >= 1


def test_label_priors_are_realistic():
    from trainer.data.phantom import _grades

    g = np.array([_grades(np.random.default_rng(i)) for i in range(2000)])
    assert abs((g == 0).mean() - 0.80) < 0.02 and abs((g == 1).mean() - 0.13) < 0.02
    assert abs((g == 2).mean() - 0.07) < 0.015 and 0.005 < (g == -1).mean() < 0.02
    severe_by_level = [(g[:, :, lv] == 2).mean() for lv in range(5)]
    assert severe_by_level[0] < severe_by_level[3]  # lower levels are worse


def run_cli(capsys, *args):
    """`optuna-run ARGS` in this process (a subprocess would only add seconds of imports): its
    exit code and what it wrote, as ``returncode``, ``stdout``, ``stderr``."""
    from types import SimpleNamespace

    from spinesweep.cli import main

    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def test_data_check_reports_zero_failures_on_the_phantom(phantom_dir, capsys):
    r = run_cli(capsys, "data", "check", "--data", str(phantom_dir), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["studies"] == 10 and out["failures"] == {}
    assert out["crops_built"] + out["unlabelled_blocks"] == out["crops_expected"]
    assert out["points"] == len(pd.read_csv(phantom_dir / "train_label_coordinates.csv"))


def test_data_check_counts_broken_input_and_still_exits_zero(phantom_copy, capsys):
    layout = Layout(phantom_copy)
    sid = layout.study_ids[0]
    folder = layout.series_dir(sid, layout.series_of(sid)["Axial T2"][0])
    victim = sorted(folder.glob("*.dcm"))[0]
    victim.write_bytes(victim.read_bytes()[:-500])  # truncated
    r = run_cli(capsys, "data", "check", "--data", str(phantom_copy), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["failures"].get("slice_unreadable") == 1
    assert victim.name in out["failure_examples"]["slice_unreadable"][0]


def test_data_check_exits_nonzero_only_when_the_layout_is_unreadable(tmp_path, capsys):
    r = run_cli(capsys, "data", "check", "--data", str(tmp_path))
    assert r.returncode == 2 and "train.csv: file not found" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture(scope="session")
def real_phantom(tmp_path_factory) -> Path:
    """Four studies at the competition's sizes (384-640 px, RLE lossless 12-bit, 1-3 axial series)."""
    out = tmp_path_factory.mktemp("phantom_real")
    make_phantom(out, studies=4, test_studies=0, seed=5, jobs=2, scale="real")
    return out


@pytest.mark.slow
def test_realistic_phantom_has_real_sizes_and_rle_files(real_phantom):
    files = sorted((real_phantom / "train_images").rglob("*.dcm"))
    sizes = set()
    for f in files[::7]:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5"  # RLE lossless
        assert (ds.BitsAllocated, ds.BitsStored) == (16, 12)
        sizes.add(int(ds.Rows))
    assert min(sizes) >= 320 and max(sizes) <= 640
    layout = Layout(real_phantom)
    per_study = layout.train_series.groupby("study_id").size()
    assert (per_study >= 3).all()  # two sagittal series and at least one axial
    sag = [len(list(layout.series_dir(s, i).glob("*.dcm"))) for s in layout.study_ids
           for i in layout.series_of(s)["Sagittal T2/STIR"]]
    assert all(13 <= n <= 21 for n in sag)


@pytest.mark.slow
def test_realistic_phantom_through_data_check_and_one_epoch_of_train(real_phantom, tmp_path):
    cache = tmp_path / "cache"
    r = subprocess.run([sys.executable, "-m", "spinesweep", "data", "check", "--data", str(real_phantom),
                        "--cache-dir", str(cache), "--json", "--jobs", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    layout = Layout(real_phantom)
    assert summary["series_decoded"] == len(layout.train_series)  # every series, decoded once
    assert summary["failures"] == {} and summary["crops_built"] >= 0.95 * summary["crops_expected"]
    assert 0 < summary["cache_bytes"] <= summary["cache_budget"]
    r = subprocess.run([sys.executable, "-m", "spinesweep", "train", "--data", str(real_phantom), "--json",
                        "model.backbone=test_efficientnet", "model.pretrained=false", "model.head=linear",
                        "optim.epochs=1", "optim.batch_size=4", "data.img_size=64", "data.n_folds=2",
                        f"data.cache_dir={cache}", "augment.crop_shift=0.1", "augment.crop_scale=0.1"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["n_train"] > 0 and np.isfinite(out["score"]) and len(out["history"]) == 1


def test_a_repeated_instance_number_is_reported_and_never_moves_a_label(phantom_copy, tmp_path):
    """A second file given a labelled instance number: `data check` names both files, and the
    label's block is left out (present off, with a warning) instead of pointing at either file."""
    import warnings

    from trainer.config import DataConfig
    from trainer.data.check import check_data
    from trainer.data.crops import CropSpec
    from trainer.data.dicom import DicomWarning
    from trainer.data.samples import SampleSource
    from trainer.data.volumes import VolumeStore

    layout = Layout(phantom_copy)
    point = layout.coordinates[layout.coordinates["condition"] == "spinal_canal_stenosis"].iloc[0]
    sid, series, inst = int(point.study_id), int(point.series_id), int(point.instance_number)
    folder = layout.series_dir(sid, series)
    numbers = sorted(int(f.stem) for f in folder.glob("*.dcm"))
    other = numbers[(numbers.index(inst) + 5) % len(numbers)]
    ds = pydicom.dcmread(folder / f"{other}.dcm")
    ds.InstanceNumber = inst
    ds.save_as(folder / "copy.dcm", enforce_file_format=False)

    spec = CropSpec.from_config(DataConfig(data_dir=str(phantom_copy)))
    out = check_data(phantom_copy, spec, cache_dir=str(tmp_path / "cache"))
    labelled = layout.coordinates[(layout.coordinates["series_id"] == series) &
                                  (layout.coordinates["instance_number"] == inst)]
    assert out["failures"]["instance_repeated"] == 1  # one number, once
    assert out["failures"]["labelled_instance_repeated"] == len(labelled)  # every label on it
    (shown,) = out["failure_examples"]["instance_repeated"]
    assert f"study {sid}: series {series} instance {inst}: files " in shown
    assert f"{inst}.dcm" in shown and "copy.dcm" in shown

    source = SampleSource(layout, spec, VolumeStore(tmp_path / "cache"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = source.plan(sid)
    lv = ["l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1"].index(point.level)
    assert plan.blocks["sag_t2"][lv] is None
    _, present = source.sample(sid, lv)
    assert not present[0]
    assert any(issubclass(w.category, DicomWarning) and f"labelled instance {inst} is held by 2 files" in str(w.message)
               and "copy.dcm" in str(w.message) and f"study {sid} series {series}" in str(w.message) for w in caught)

import numpy as np
import pandas as pd
import pytest
import torch

from trainer.config import DataConfig
from trainer.data.cache import data_fingerprint
from trainer.data.crops import CropSpec
from trainer.data.samples import SampleSource
from trainer.data.volumes import VolumeStore
from trainer.data.dataset import SpineDataset
from trainer.data.folds import load_folds, make_folds
from trainer.data.layout import CONDITIONS


def fake_labels(n_studies, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_studies):
        burden = rng.random()
        for c in CONDITIONS:
            for lv in ("l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1"):
                rows.append((1000 + s, c, lv, int(rng.random() < burden) * rng.integers(1, 3)))
    return pd.DataFrame(rows, columns=["study_id", "condition", "level", "severity"])


def test_folds_are_deterministic_disjoint_and_balanced():
    labels = fake_labels(200)
    a, b = make_folds(labels, 4, seed=1), make_folds(labels, 4, seed=1)
    pd.testing.assert_frame_equal(a, b)
    assert not make_folds(labels, 4, seed=2)["fold"].equals(a["fold"])
    assert sorted(a["study_id"]) == sorted(labels["study_id"].unique())
    assert a["fold"].value_counts().tolist() == [50, 50, 50, 50]
    # stratified: each fold's mean burden is close to the overall mean
    burden = labels.assign(w=labels.severity.map({0: 0, 1: 1, 2: 3})).groupby("study_id").w.sum()
    per_fold = a.set_index("study_id").join(burden).groupby("fold").w.mean()
    assert per_fold.max() - per_fold.min() < 0.15 * burden.mean()


def test_too_few_studies_for_the_folds():
    with pytest.raises(ValueError, match="3 studies cannot be split into 4 folds"):
        make_folds(fake_labels(3), 4, seed=0)


def test_folds_are_saved_and_reused(layout, tmp_path):
    fp = data_fingerprint(layout)
    f1 = load_folds(layout, 5, 0, tmp_path, fp)
    saved = tmp_path / "folds" / f"{fp}_5_0.csv"
    assert saved.exists()
    # a saved split wins over recomputation (e.g. after a library upgrade)
    altered = f1.assign(fold=(f1.fold + 1) % 5)
    altered.to_csv(saved, index=False)
    pd.testing.assert_frame_equal(load_folds(layout, 5, 0, tmp_path, fp), altered)


def test_dataset_items_and_empty_labels(layout, tmp_path):
    cfg = DataConfig(img_size=24, sag_t2_slices=3, sag_t1_slices=2, axial_slices=1)
    store = SampleSource(layout, CropSpec.from_config(cfg), VolumeStore(tmp_path))
    ids = layout.study_ids[:4]
    store.prepare(ids)
    ds = SpineDataset(store, ids, conditions=CONDITIONS)
    assert len(ds) == 4 * 5
    item = ds[0]
    assert item["image"].shape == (3 + 2 + 2 + 1, 24, 24) and item["image"].dtype == torch.float32
    assert 0 <= item["image"].min() and item["image"].max() <= 1
    assert item["target"].shape == (5,) and item["present"].shape == (4,)
    # empty cells stay -1 (never filled)
    labels = layout.labels[layout.labels.study_id.isin(ids)]
    n_empty = int((labels.severity == -1).sum())
    assert sum(int((ds[i]["target"] == -1).sum()) for i in range(len(ds))) == n_empty
    std = SpineDataset(store, ids, normalize="standardize")[0]["image"]
    assert abs(float(std.mean())) < 1e-4 and abs(float(std.std()) - 1) < 1e-3
    flip = SpineDataset(store, ids, transform=lambda image: {"image": image[:, ::-1]})
    torch.testing.assert_close(flip[0]["image"], ds[0]["image"].flip(-1))
    # crop jitter moves and scales the window: other pixels, same shape, same targets
    np.random.seed(0)
    jit = SpineDataset(store, ids, crop_shift=0.3, crop_scale=0.3)[0]
    assert jit["image"].shape == item["image"].shape and not torch.equal(jit["image"], item["image"])
    assert torch.equal(jit["target"], item["target"])

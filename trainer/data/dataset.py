"""The torch `Dataset`: one item per (study, level), slices as channels, targets per condition."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from .layout import CONDITIONS, LEVELS, Layout
from .samples import SampleSource


def level_targets(layout: Layout, study_ids, conditions) -> dict[tuple[int, int], np.ndarray]:
    """(study_id, level index) -> int array (len(conditions),): 0/1/2, -1 for an empty label."""
    labels = layout.labels
    labels = labels[labels["study_id"].isin(set(study_ids)) & labels["condition"].isin(conditions)]
    cond_idx = {c: i for i, c in enumerate(conditions)}
    lvl_idx = {lv: i for i, lv in enumerate(LEVELS)}
    out: dict[tuple[int, int], np.ndarray] = {}
    for sid, cond, lvl, sev in labels[["study_id", "condition", "level", "severity"]].itertuples(index=False):
        key = (int(sid), lvl_idx[lvl])
        if key not in out:
            out[key] = np.full(len(conditions), -1, dtype=np.int64)
        out[key][cond_idx[cond]] = sev
    return out


def normalize_stack(x: torch.Tensor, mode: str) -> torch.Tensor:
    """One sample's (slices, H, W) uint8-valued stack as model input: ``minmax255`` divides by 255
    (crops are already windowed to 0..255 per series: `dicom.scale_to_uint8`), ``standardize`` centres and scales over its pixels."""
    if mode == "minmax255":
        return x / 255.0
    return (x - x.mean()) / x.std().clamp_min(1e-6)


class SpineDataset(Dataset):
    """Items: ``image`` float32 (slices, H, W), ``target`` int64 (conditions,) with -1 for an
    empty label (ignored by the loss, not filled), ``present`` bool per crop block, and the keys.

    Crops are cut when an item is asked for (`SampleSource.sample`), from memory-mapped volumes.
    `transform` is an albumentations-style callable applied to the (H, W, slices) uint8 stack, so
    every slice of a sample gets the same augmentation; `crop_shift` and `crop_scale` jitter each
    block's crop centre (a fraction of its half side) and window (a factor in [1-s, 1+s]) before
    it is cut, drawn from numpy's global generator (seeded per DataLoader worker).
    """

    def __init__(self, source: SampleSource, study_ids, conditions=CONDITIONS, normalize: str = "minmax255",
                 transform: Callable | None = None, crop_shift: float = 0.0, crop_scale: float = 0.0):
        self.source = source
        self.conditions = tuple(conditions)
        self.normalize = normalize
        self.transform = transform
        self.crop_shift, self.crop_scale = crop_shift, crop_scale
        targets = level_targets(source.layout, study_ids, self.conditions)
        self.items = [(int(s), lv) for s in sorted(study_ids) for lv in range(len(LEVELS))
                      if (int(s), lv) in targets]
        self.targets = targets

    def __len__(self) -> int:
        return len(self.items)

    def _jitter(self, half: float) -> tuple[float, float, float]:
        dx, dy = np.random.uniform(-self.crop_shift, self.crop_shift, 2) * half
        return float(dx), float(dy), float(1 + np.random.uniform(-self.crop_scale, self.crop_scale))

    def __getitem__(self, i: int) -> dict:
        study_id, lv = self.items[i]
        jitter = self._jitter if (self.crop_shift or self.crop_scale) else None
        stack, present = self.source.sample(study_id, lv, jitter)  # (S, H, W) uint8
        if self.transform is not None:
            stack = self.transform(image=np.ascontiguousarray(stack.transpose(1, 2, 0)))["image"]
            stack = stack.transpose(2, 0, 1)
        x = normalize_stack(torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32)), self.normalize)
        return dict(image=x, target=torch.from_numpy(self.targets[(study_id, lv)]),
                    present=torch.from_numpy(present), study_id=study_id, level=lv)

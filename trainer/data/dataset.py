"""The torch `Dataset`: one item per (study, level), slices as channels, targets per condition."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from .cache import SampleStore
from .layout import CONDITIONS, LEVELS, Layout


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
    (crops are already min-max scaled to 0..255), ``standardize`` centres and scales over its pixels."""
    if mode == "minmax255":
        return x / 255.0
    return (x - x.mean()) / x.std().clamp_min(1e-6)


class SpineDataset(Dataset):
    """Items: ``image`` float32 (slices, H, W), ``target`` int64 (conditions,) with -1 for an
    empty label (ignored by the loss, not filled), ``present`` bool per crop block, and the keys.

    `transform` is an albumentations-style callable applied to the (H, W, slices) uint8 stack, so
    every slice of a sample gets the same augmentation.
    """

    def __init__(self, store: SampleStore, study_ids, conditions=CONDITIONS, normalize: str = "minmax255",
                 transform: Callable | None = None):
        self.store = store
        self.conditions = tuple(conditions)
        self.normalize = normalize
        self.transform = transform
        targets = level_targets(store.layout, study_ids, self.conditions)
        self.items = [(int(s), lv) for s in sorted(study_ids) for lv in range(len(LEVELS))
                      if (int(s), lv) in targets]
        self.targets = targets
        self._open: dict[int, tuple] = {}

    def __len__(self) -> int:
        return len(self.items)

    def _study(self, study_id: int):
        if study_id not in self._open:
            entry = self.store.load(study_id)
            if entry is None:
                raise RuntimeError(f"study {study_id}: crops not cached; call SampleStore.ensure first")
            self._open[study_id] = entry
        return self._open[study_id]

    def __getitem__(self, i: int) -> dict:
        study_id, lv = self.items[i]
        images, present, _ = self._study(study_id)
        stack = np.asarray(images[lv])  # (S, H, W) uint8, copied out of the memory map
        if self.transform is not None:
            stack = self.transform(image=np.ascontiguousarray(stack.transpose(1, 2, 0)))["image"]
            stack = stack.transpose(2, 0, 1)
        x = normalize_stack(torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32)), self.normalize)
        return dict(image=x, target=torch.from_numpy(self.targets[(study_id, lv)]),
                    present=torch.from_numpy(present[lv].copy()), study_id=study_id, level=lv)

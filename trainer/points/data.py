"""Slices as keypoint samples: what the localiser sees and what it should answer.

A sample is one slice of one series (with `in_chans` neighbours as channels), resized to
``img_size x img_size`` in a canonical orientation (sagittal: anterior left, head up; axial:
patient right on the image's left, anterior up), so that "left recess" means one side of the image
whatever the scanner did (FFS images come mirrored). `SliceFrame` maps pixel coordinates of the
original slice to the model's grid and back.

Targets: every labelled point of the series, carried through patient space into each slice of
the series, becomes a Gaussian in its channel (`model.CHANNELS`) of height
``exp(-d^2 / (2 slice_sigma_mm^2))``, d its distance (mm) from the slice: the peak height says
which slice holds the point. The channels of the other groups are masked out of the loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from ..data.dicom import Volume
from ..data.geometry import patient_to_pixel, pixel_to_patient
from ..data.layout import LEVELS, PLANE_OF_CONDITION, Layout
from ..data.volumes import SeriesRef, VolumeStore
from .model import CHANNELS, GROUP_OF_SERIES, GROUPS, N_CHANNELS

GROUP_OF_CONDITION = {c: GROUP_OF_SERIES[d] for c, d in PLANE_OF_CONDITION.items()}


def groups_of(conditions) -> tuple[str, ...]:
    """The slice groups a localiser of these conditions trains and reads: those of the
    conditions, and Sagittal T2/STIR whenever foramina or recesses are asked for (their levels
    come from the canal points, `locate.decode_study`)."""
    need = {GROUP_OF_CONDITION[c] for c in conditions}
    if need & {"sag_t1", "axial"}:
        need.add("sag_t2")
    return tuple(g for g in GROUPS if g in need)


@dataclass(frozen=True)
class SliceFrame:
    """A slice of ``rows x cols`` pixels on the model's ``size x size`` grid, flipped as needed."""

    rows: int
    cols: int
    size: int
    flip_x: bool
    flip_y: bool

    def to_model(self, x, y):
        """Pixel (x, y) of the slice -> (u, v) on the model's grid (pixel centres aligned)."""
        x = self.cols - 1 - np.asarray(x, float) if self.flip_x else np.asarray(x, float)
        y = self.rows - 1 - np.asarray(y, float) if self.flip_y else np.asarray(y, float)
        return (x + 0.5) * self.size / self.cols - 0.5, (y + 0.5) * self.size / self.rows - 0.5

    def to_image(self, u, v):
        """(u, v) on the model's grid -> pixel (x, y) of the slice."""
        x = (np.asarray(u, float) + 0.5) * self.cols / self.size - 0.5
        y = (np.asarray(v, float) + 0.5) * self.rows / self.size - 0.5
        return (self.cols - 1 - x if self.flip_x else x), (self.rows - 1 - y if self.flip_y else y)


def canonical_flips(orientation: np.ndarray, group: str) -> tuple[bool, bool]:
    """(flip_x, flip_y) that turn a slice to the canonical orientation of its group."""
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    if group == "axial":  # columns towards the patient's left (+x), rows towards posterior (+y)
        return bool(row[0] < 0), bool(col[1] < 0)
    return bool(row[1] < 0), bool(col[2] > 0)  # sagittal: columns towards posterior, rows towards the feet


def slice_frame(vol: Volume, index: int, size: int, group: str) -> SliceFrame:
    """How slice `index` sits on the model's grid (no pixel read)."""
    rows, cols = vol.images[index].shape
    return SliceFrame(rows, cols, size, *canonical_flips(vol.orientations[index], group))


def slice_input(vol: Volume, index: int, in_chans: int, size: int, group: str,
                resized: dict | None = None) -> tuple[np.ndarray, SliceFrame]:
    """(image float32 ``[in_chans, size, size]`` in [0, 1], frame): slice `index` and its
    neighbours (clamped at the series' ends), each resized to the grid and flipped canonically.
    `resized`, a dict shared over the slices of one series, keeps each resized slice for its
    neighbours (a whole series costs one resize per slice, not `in_chans`)."""
    frame = slice_frame(vol, index, size, group)
    out = np.empty((in_chans, size, size), dtype=np.float32)
    for k, off in enumerate(range(-(in_chans // 2), in_chans - in_chans // 2)):
        j = min(max(index + off, 0), len(vol) - 1)
        img = resized.get(j) if resized is not None else None
        if img is None:
            img = cv2.resize(np.asarray(vol.images[j]), (size, size), interpolation=cv2.INTER_AREA)
            if resized is not None:
                resized[j] = img
        if frame.flip_x:
            img = img[:, ::-1]
        if frame.flip_y:
            img = img[::-1]
        out[k] = img * (1 / 255.0)
    return out, frame


@dataclass
class SeriesPoints:
    """The labelled points of one series in patient space: (channel, xyz mm) pairs."""

    group: str
    channels: list[int]
    positions: np.ndarray  # (P, 3)


def series_points(coords, vol: Volume, group: str) -> SeriesPoints:
    """`coords`: the series' rows of train_label_coordinates (submission spelling); rows whose
    instance is not in the series are left out."""
    channels, positions = [], []
    for r in coords.itertuples(index=False):
        idx = vol.index_of_instance(int(r.instance_number))
        if idx is None:
            continue
        lv = LEVELS.index(r.level)
        if group == "axial":
            ch = CHANNELS["axial"][0 if r.condition.startswith("left") else 1]
        else:
            ch = CHANNELS[group][lv]
        channels.append(ch)
        positions.append(pixel_to_patient(vol, idx, float(r.x), float(r.y)))
    return SeriesPoints(group, channels, np.asarray(positions, dtype=float).reshape(-1, 3))


def slice_targets(vol: Volume, index: int, points: SeriesPoints, frame: SliceFrame,
                  slice_sigma_mm: float) -> list[tuple[int, float, float, float]]:
    """(channel, u, v, height) of every point on slice `index`, on the model's grid."""
    out = []
    for ch, p in zip(points.channels, points.positions):
        x, y, d = patient_to_pixel(vol, index, p)
        height = float(np.exp(-d * d / (2 * slice_sigma_mm ** 2)))
        if height < 1e-3:
            continue
        u, v = frame.to_model(x, y)
        out.append((ch, float(u), float(v), height))
    return out


def render_heatmaps(targets, size: int, stride: int, sigma: float) -> np.ndarray:
    """``[N_CHANNELS, size / stride, size / stride]`` Gaussians (sd `sigma` cells) at the targets'
    grid positions, scaled by their heights; overlapping points in one channel take the max."""
    n = size // stride
    out = np.zeros((N_CHANNELS, n, n), dtype=np.float32)
    grid = np.arange(n, dtype=np.float32)
    for ch, u, v, h in targets:
        cu, cv = (u + 0.5) / stride - 0.5, (v + 0.5) / stride - 0.5
        g = h * np.exp(-((grid[None, :] - cu) ** 2 + (grid[:, None] - cv) ** 2) / (2 * sigma ** 2))
        np.maximum(out[ch], g, out=out[ch])
    return out


def random_affine(rng: np.random.Generator, size: int, strength: float) -> np.ndarray:
    """A 2x3 matrix on the grid: scale +-20%, rotation +-15 deg, shift +-10% of the side, times `strength`."""
    angle = rng.uniform(-15, 15) * strength
    scale = 1 + rng.uniform(-0.2, 0.2) * strength
    m = cv2.getRotationMatrix2D(((size - 1) / 2, (size - 1) / 2), angle, scale)
    m[:, 2] += rng.uniform(-0.1, 0.1, 2) * size * strength
    return m


def augment(image: np.ndarray, targets, rng: np.random.Generator, strength: float):
    """The same random affine on every channel and on the targets' positions, then a random
    contrast (gamma) and brightness; (image, targets)."""
    size = image.shape[-1]
    m = random_affine(rng, size, strength)
    image = np.stack([cv2.warpAffine(c, m, (size, size), flags=cv2.INTER_LINEAR, borderValue=0) for c in image])
    moved = [(ch, *(m @ np.array([u, v, 1.0])), h) for ch, u, v, h in targets]
    gamma = np.exp(rng.uniform(-0.3, 0.3) * strength)
    image = np.clip(image, 0, 1) ** gamma * (1 + rng.uniform(-0.2, 0.2) * strength)
    return image.astype(np.float32), moved


def labelled_series(coords_of_study: pd.DataFrame, groups) -> dict[tuple[str, int], pd.DataFrame]:
    """(group, series_id) -> its rows of the study's coordinates, for the groups in use."""
    out = {}
    for (cond, series_id), rows in coords_of_study.groupby(["condition", "series_id"]):
        group = GROUP_OF_CONDITION[cond]
        if group in groups:
            key = (group, int(series_id))
            out[key] = rows if key not in out else pd.concat([out[key], rows])
    return out


def inference_series(series: dict[str, list[int]], groups) -> list[tuple[str, int]]:
    """The series a study's points are looked for in, as on a test study: the first Sagittal
    T2/STIR and Sagittal T1, every Axial T2."""
    out = []
    for desc, group in GROUP_OF_SERIES.items():
        if group not in groups or not series.get(desc):
            continue
        ids = series[desc] if group == "axial" else series[desc][:1]
        out += [(group, int(s)) for s in ids]
    return out


class SliceDataset(Dataset):
    """Items: ``image`` float32 ``[in_chans, S, S]``, ``heatmap`` float32 ``[N_CHANNELS, S/stride,
    S/stride]``, ``mask`` float32 ``[N_CHANNELS]`` (1 for the channels of the series' group when
    the series holds labelled points of it), and the keys ``study_id, series_id, index``.

    ``train=True``: the slices of the series that hold the labelled points; each epoch
    (`set_epoch`) keeps every slice near a point and a share `negatives` of the others, with the
    random affine of strength `affine`. ``train=False``: every slice of the series a test study
    would be searched in (`inference_series`), in order, unaugmented."""

    def __init__(self, layout: Layout, store: VolumeStore, study_ids, groups, loc_cfg, in_chans: int, stride: int,
                 train: bool, seed: int = 0):
        self.layout, self.store, self.groups = layout, store, tuple(groups)
        self.cfg, self.in_chans, self.stride, self.train, self.seed = loc_cfg, in_chans, stride, train, seed
        self._open: dict[tuple[int, int], Volume] = {}
        coords = layout.coordinates
        coords = coords[coords["study_id"].isin(set(int(s) for s in study_ids))]
        by_study = {int(k): g for k, g in coords.groupby("study_id")}
        self.points: dict[tuple[int, int], SeriesPoints] = {}
        self.all_items: list[tuple[int, int, int, str]] = []  # (study, series, index, group)
        near: list[bool] = []
        for sid in sorted(int(s) for s in study_ids):
            study_coords = by_study.get(sid, coords.iloc[:0])
            labelled = labelled_series(study_coords, self.groups)
            wanted = list(labelled) if train else inference_series(layout.series_of(sid), self.groups)
            for group, series_id in wanted:
                try:
                    vol = self.volume(sid, series_id)
                except Exception:
                    continue  # an unreadable series has no slice to learn from or search in
                if (group, series_id) in labelled:
                    self.points[(sid, series_id)] = series_points(labelled[(group, series_id)], vol, group)
                pts = self.points.get((sid, series_id))
                for j in range(len(vol)):
                    self.all_items.append((sid, series_id, j, group))
                    close = pts is not None and any(
                        abs(patient_to_pixel(vol, j, p)[2]) < 2.5 * loc_cfg.slice_sigma_mm for p in pts.positions)
                    near.append(close)
        self.near = np.asarray(near, dtype=bool)
        self.set_epoch(0)

    def __getstate__(self):  # DataLoader workers reopen their own memory maps
        return {**self.__dict__, "_open": {}}

    def volume(self, study_id: int, series_id: int) -> Volume:
        """The series' volume from the store, opened once per process and kept open."""
        key = (study_id, series_id)
        if key not in self._open:
            folder = self.layout.series_dir(study_id, series_id)
            self._open[key] = self.store.open(SeriesRef(study_id, series_id, Path(folder)))
        return self._open[key]

    def set_epoch(self, epoch: int) -> None:
        """Choose this epoch's slices (training: the near ones and a random share of the rest)."""
        if not self.train:
            self.items = list(self.all_items)
            return
        rng = np.random.default_rng([self.seed, epoch, 7])
        keep = self.near | (rng.random(len(self.near)) < self.cfg.negatives)
        self.items = [it for it, k in zip(self.all_items, keep) if k]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        sid, series_id, j, group = self.items[i]
        vol = self.volume(sid, series_id)
        size = self.cfg.img_size
        image, frame = slice_input(vol, j, self.in_chans, size, group)
        pts = self.points.get((sid, series_id))
        targets = slice_targets(vol, j, pts, frame, self.cfg.slice_sigma_mm) if pts is not None else []
        if self.train and self.cfg.affine > 0:
            rng = np.random.default_rng(np.random.randint(0, 2**31))  # seeded per DataLoader worker
            image, targets = augment(image, targets, rng, self.cfg.affine)
        mask = np.zeros(N_CHANNELS, dtype=np.float32)
        if pts is not None:
            mask[list(CHANNELS[group])] = 1.0
        return dict(image=torch.from_numpy(np.ascontiguousarray(image)),
                    heatmap=torch.from_numpy(render_heatmaps(targets, size, self.stride, self.cfg.sigma)),
                    mask=torch.from_numpy(mask), study_id=sid, series_id=series_id, index=j, group=group)

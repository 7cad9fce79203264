"""From heatmaps to points, and `Localizer`: a trained keypoint model that places every
(condition, level) point of a study, the drop-in replacement of `infer.LevelPrior`.

Decoding, per study (`decode_study`):
- spinal canal: the five levels placed jointly in head-to-feet order on the Sagittal T2/STIR
  heatmaps (`ordered_levels`), each on the slice where its own heatmap peaks there, the point
  refined to a fraction of a cell (`refine`);
- foramina: on Sagittal T1, once among the slices left of the midline and once among those right
  of it (the midline: the canal points' patient x, else the stack's centre); each level's heatmap
  weighted by a Gaussian around that level's canal point carried through patient space into the
  slice (sd half the local disc spacing, `_near_canal`), since a foramen sits at its disc's height
  and a lateral slice alone hardly tells one level from the next; without canal points, the five
  levels placed jointly as on the canal;
- subarticular recesses, each level: the canal point of that level carried through patient space
  to the Axial T2 slices within `AXIAL_REACH_MM` of it (every axial series), the slice whose left
  and right peaks sum highest, the two points on it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..data.dicom import Volume
from ..data.geometry import patient_to_pixel, pixel_to_patient, slice_center
from ..data.layout import CONDITIONS, LEVELS
from .data import SliceFrame, groups_of, inference_series, slice_input
from .metrics import COORD_COLUMNS, PATIENT_COLUMNS
from .model import CHANNELS, GROUPS

AXIAL_REACH_MM = 8.0  # axial slices this close to a level's canal point are searched for its recesses
AXIAL_FALLBACK_MM = 20.0  # else the nearest slice, if this close


@dataclass
class SeriesMaps:
    """Heatmaps of some slices of one series: ``probs[k]`` ``[channels of the group, H, W]`` in
    [0, 1] for slice ``indices[k]``, on the grid of ``frames[k]`` (`stride` pixels per cell)."""

    group: str
    series_id: int
    volume: Volume
    indices: list[int] = field(default_factory=list)
    frames: list[SliceFrame] = field(default_factory=list)
    probs: list[np.ndarray] = field(default_factory=list)


def refine(hm: np.ndarray, i: int, j: int, stride: int) -> tuple[float, float]:
    """(u, v) on the input grid of heatmap cell (i, j), refined to a fraction of a cell by
    fitting a parabola to the log heights of the cell and its neighbours along each axis (exact
    for a Gaussian: the heatmaps are trained as Gaussians)."""
    def offset(a, b, c):  # log heights before, at, after
        den = a - 2 * b + c
        return float(np.clip(0.5 * (a - c) / den, -0.5, 0.5)) if den < 0 else 0.0

    log = np.log(np.maximum(hm, 1e-12))
    di = offset(log[i - 1, j], log[i, j], log[i + 1, j]) if 0 < i < hm.shape[0] - 1 else 0.0
    dj = offset(log[i, j - 1], log[i, j], log[i, j + 1]) if 0 < j < hm.shape[1] - 1 else 0.0
    return (j + dj + 0.5) * stride - 0.5, (i + di + 0.5) * stride - 0.5


def peak(hm: np.ndarray, stride: int) -> tuple[float, float, float]:
    """(height, u, v) of a heatmap's highest cell, (u, v) on the input grid (`refine`d)."""
    i, j = np.unravel_index(int(np.argmax(hm)), hm.shape)
    return (float(hm[i, j]), *refine(hm, i, j, stride))


def local_maxima(a: np.ndarray) -> np.ndarray:
    """Boolean mask ``a.shape`` (2-D) of the cells higher than each of their 8 neighbours."""
    h, w = a.shape
    padded = np.pad(a, 1, constant_values=-np.inf)
    neighbours = np.max([padded[1 + di:h + 1 + di, 1 + dj:w + 1 + dj] for di in (-1, 0, 1) for dj in (-1, 0, 1)
                         if di or dj], axis=0)
    return a > neighbours


def ordered_levels(stack: np.ndarray, stride: int, candidates: int = 9) -> list[tuple[int, float, float]] | None:
    """The five levels of a sagittal stack placed jointly: ``stack`` ``[slices, 5, H, W]``.

    Each level channel alone confuses neighbouring discs; their sum (over levels, and over slices
    by its maximum) shows every disc. Its strongest local maxima are the candidates; the five
    levels take five of them in head-to-feet order (rows of the canonical grid) so that the sum of
    each level's own height at its candidate is highest (dynamic programming). Returns per level
    (slice position in the stack, u, v), or None when fewer than five candidates stand out."""
    proj = stack.max(0)  # [5, H, W]
    total = proj.sum(0)
    peaks = np.argwhere(local_maxima(total) & (total > 0.05))
    if len(peaks) < 5:
        return None
    peaks = peaks[np.argsort(-total[tuple(peaks.T)])][:candidates]
    peaks = peaks[np.argsort(peaks[:, 0], kind="stable")]  # head first
    n, levels = len(peaks), proj.shape[0]
    gain = np.array([[proj[lv, i, j] for i, j in peaks] for lv in range(levels)])  # [5, n]
    best = np.full((levels, n), -np.inf)
    back = np.zeros((levels, n), dtype=int)
    best[0] = gain[0]
    for lv in range(1, levels):
        run = np.maximum.accumulate(best[lv - 1])  # best of the candidates above, for each c
        arg = np.array([int(np.argmax(best[lv - 1][:c + 1])) for c in range(n)])
        best[lv, 1:] = run[:-1] + gain[lv, 1:]
        back[lv, 1:] = arg[:-1]
    chosen = [int(np.argmax(best[-1]))]
    for lv in range(levels - 1, 0, -1):
        chosen.append(int(back[lv, chosen[-1]]))
    out = []
    for lv, c in enumerate(chosen[::-1]):
        i, j = peaks[c]
        k = int(np.argmax(stack[:, lv, i, j]))
        out.append((k, *refine(stack[k, lv], i, j, stride)))
    return out


def _row(study_id, maps: SeriesMaps, k: int, condition: str, level: str, u: float, v: float) -> dict:
    idx = maps.indices[k]
    x, y = maps.frames[k].to_image(u, v)
    p = pixel_to_patient(maps.volume, idx, float(x), float(y))
    return dict(study_id=int(study_id), series_id=maps.series_id, instance_number=int(maps.volume.instance_numbers[idx]),
                condition=condition, level=level, x=float(x), y=float(y),
                patient_x=p[0], patient_y=p[1], patient_z=p[2], slice=idx)


def _best(maps: SeriesMaps, channel: int, stride: int, among=None):
    """(k, u, v) of the slice (among the positions `among` of `maps.indices`) whose heatmap peaks highest."""
    best = None
    for k in (range(len(maps.indices)) if among is None else among):
        h, u, v = peak(maps.probs[k][channel], stride)
        if best is None or h > best[0]:
            best = (h, k, u, v)
    return None if best is None else best[1:]


def _levels(maps: SeriesMaps, stride: int, among=None) -> list[tuple[int, float, float]]:
    """Per level (position in `maps.indices`, u, v): jointly ordered (`ordered_levels`) when the
    slices share one grid, else each level's highest peak."""
    among = list(range(len(maps.indices))) if among is None else list(among)
    shapes = {maps.probs[k].shape for k in among}
    if len(shapes) == 1:
        placed = ordered_levels(np.stack([maps.probs[k] for k in among]), stride)
        if placed is not None:
            return [(among[k], u, v) for k, u, v in placed]
    return [_best(maps, lv, stride, among) for lv in range(len(LEVELS))]


def _near_canal(maps: SeriesMaps, stride: int, among, canal: dict[str, np.ndarray]) -> list[tuple[int, float, float]]:
    """Per level (position in `maps.indices`, u, v) on the slices `among` of a Sagittal T1 stack:
    of the level heatmap's peaks (`local_maxima`) on every slice, the one whose height times a
    Gaussian around the level's canal point (patient mm, ``canal[level]``, carried into the slice's
    heatmap grid) is highest. The Gaussian's sd is half the in-plane distance between neighbouring
    canal points there (the disc spacing), so a neighbouring level's foramen weighs about e^-2 of
    its own. The weight only chooses among peaks: the point is the peak itself (`refine`d), never
    pulled towards the canal."""
    grid = {}  # slice position -> the five canal points on its heatmap grid, [5, 2] (column, row)
    for k in among:
        xy = [patient_to_pixel(maps.volume, maps.indices[k], canal[level])[:2] for level in LEVELS]
        u, v = maps.frames[k].to_model(*np.array(xy).T)
        grid[k] = np.stack([(u + 0.5) / stride - 0.5, (v + 0.5) / stride - 0.5], axis=1)
    out = []
    for lv in range(len(LEVELS)):
        best = None
        for k in among:
            hm = maps.probs[k][lv]
            own, near = grid[k][lv], grid[k][max(lv - 1, 0):lv + 2]
            sd = max(0.5 * float(np.linalg.norm(np.diff(near, axis=0), axis=1).mean()), 1.0)  # half the disc spacing
            ij = np.argwhere(local_maxima(hm))
            if not len(ij):
                continue
            w = hm[ij[:, 0], ij[:, 1]] * np.exp(-((ij[:, 1] - own[0]) ** 2 + (ij[:, 0] - own[1]) ** 2) / (2 * sd ** 2))
            top = int(np.argmax(w))
            if best is None or w[top] > best[0]:
                best = (w[top], k, int(ij[top, 0]), int(ij[top, 1]))
        if best is None:  # flat heatmaps on every slice: no peak to weigh
            out.append(_best(maps, lv, stride, among))
            continue
        _, k, i, j = best
        out.append((k, *refine(maps.probs[k][lv], i, j, stride)))
    return out


def decode_study(study_id: int, maps: list[SeriesMaps], stride: int, conditions=CONDITIONS) -> pd.DataFrame:
    """Rows of the train_label_coordinates form (submission spelling) plus `PATIENT_COLUMNS`, one
    per (condition, level) of `conditions` that the study's heatmaps can place (module doc)."""
    rows = []
    by_group = {g: [m for m in maps if m.group == g and m.indices] for g in GROUPS}
    canal: dict[str, np.ndarray] = {}
    if by_group["sag_t2"]:
        m = by_group["sag_t2"][0]
        placed = _levels(m, stride)
        for lv, level in enumerate(LEVELS):
            k, u, v = placed[lv]
            r = _row(study_id, m, k, "spinal_canal_stenosis", level, u, v)
            canal[level] = np.array([r["patient_x"], r["patient_y"], r["patient_z"]])
            if "spinal_canal_stenosis" in conditions:
                rows.append(r)
    if by_group["sag_t1"] and {"left_neural_foraminal_narrowing", "right_neural_foraminal_narrowing"} & set(conditions):
        m = by_group["sag_t1"][0]
        xs = np.array([slice_center(m.volume, i)[0] for i in m.indices])
        midline = float(np.median([p[0] for p in canal.values()])) if canal else float(np.mean(xs))
        sides = {"left": [k for k in range(len(xs)) if xs[k] > midline],  # patient +x is the left
                 "right": [k for k in range(len(xs)) if xs[k] <= midline]}
        for side, among in sides.items():
            cond = f"{side}_neural_foraminal_narrowing"
            if cond not in conditions or not among:
                continue
            placed = _near_canal(m, stride, among, canal) if len(canal) == len(LEVELS) else _levels(m, stride, among)
            for lv, level in enumerate(LEVELS):
                k, u, v = placed[lv]
                rows.append(_row(study_id, m, k, cond, level, u, v))
    recess = [c for c in ("left_subarticular_stenosis", "right_subarticular_stenosis") if c in conditions]
    if by_group["axial"] and recess and canal:
        for level, p in canal.items():
            cands = [(m, k, abs(patient_to_pixel(m.volume, i, p)[2]))
                     for m in by_group["axial"] for k, i in enumerate(m.indices)]
            near = [(m, k) for m, k, d in cands if d <= AXIAL_REACH_MM]
            if not near:
                nearest = min(cands, key=lambda c: c[2])
                near = [nearest[:2]] if nearest[2] <= AXIAL_FALLBACK_MM else []
            if not near:
                continue
            m, k = max(near, key=lambda mk: mk[0].probs[mk[1]][0].max() + mk[0].probs[mk[1]][1].max())
            for c in recess:
                _, u, v = peak(m.probs[k][0 if c.startswith("left") else 1], stride)
                rows.append(_row(study_id, m, k, c, level, u, v))
    return pd.DataFrame(rows, columns=[*COORD_COLUMNS, *PATIENT_COLUMNS])


class Localizer:
    """A trained keypoint model (one or several fold checkpoints, heatmaps averaged) that places a
    study's points. `coordinates` has `infer.LevelPrior`'s signature, so `predict_studies` crops
    around its points instead of the mean-position guess."""

    def __init__(self, models: list[torch.nn.Module], cfg, device: str = "cpu", batch_size: int = 32):
        # channels-last convolutions: measured 1.44x faster on one CPU core for the stride-2 model
        self.models = [m.to(memory_format=torch.channels_last) for m in models]
        self.cfg, self.device, self.batch_size = cfg, torch.device(device), batch_size
        self.stride = models[0].stride
        self.conditions = tuple(cfg.data.conditions)
        self.groups = groups_of(self.conditions)

    @classmethod
    def from_checkpoints(cls, paths, device: str = "cpu") -> "Localizer":
        """From checkpoints written by a localiser's `fit` (raises ValueError for a classifier's)."""
        from .model import load_localizer_checkpoint

        loaded = [load_localizer_checkpoint(p, device) for p in paths]
        if not loaded:
            raise ValueError("a localiser needs at least one checkpoint")
        return cls([m for m, _ in loaded], loaded[0][1], device)

    @torch.no_grad()
    def heatmaps(self, vol: Volume, indices, group: str) -> tuple[list[SliceFrame], list[np.ndarray]]:
        """Frames and heatmaps (the group's channels, [0, 1], mean over the models) of some slices."""
        frames, images, resized = [], [], {}
        for i in indices:
            img, fr = slice_input(vol, i, self.cfg.model.in_chans, self.cfg.localizer.img_size, group, resized)
            frames.append(fr)
            images.append(img)
        chans = list(CHANNELS[group])
        out = []
        for s in range(0, len(images), self.batch_size):
            x = torch.from_numpy(np.stack(images[s:s + self.batch_size])).to(self.device,
                                                                               memory_format=torch.channels_last)
            p = sum(torch.sigmoid(m(x)[:, chans].float()) for m in self.models) / len(self.models)
            out += list(p.cpu().numpy())
        return frames, out

    def locate(self, study_id: int, series: dict[str, list[int]], load_volume) -> pd.DataFrame:
        """Points of one study: rows as `decode_study` returns them. `series`: the study's series
        ids by description; `load_volume(series_id)` returns its Volume or raises (that series is
        then left out)."""
        maps = []
        todo = inference_series(series, self.groups)
        for group, series_id in [t for t in todo if t[0] != "axial"]:
            try:
                vol = load_volume(series_id)
            except Exception:
                continue
            idx = list(range(len(vol)))
            frames, probs = self.heatmaps(vol, idx, group)
            maps.append(SeriesMaps(group, series_id, vol, idx, frames, probs))
        canal = decode_study(study_id, maps, self.stride, ("spinal_canal_stenosis",))
        points = canal[["patient_x", "patient_y", "patient_z"]].to_numpy(float)
        for group, series_id in [t for t in todo if t[0] == "axial"]:
            try:
                vol = load_volume(series_id)
            except Exception:
                continue
            # only the slices near a level: the rest cannot be chosen
            idx = [i for i in range(len(vol))
                   if len(points) and min(abs(patient_to_pixel(vol, i, p)[2]) for p in points) <= AXIAL_FALLBACK_MM]
            frames, probs = self.heatmaps(vol, idx, group)
            maps.append(SeriesMaps(group, series_id, vol, idx, frames, probs))
        return decode_study(study_id, maps, self.stride, self.conditions)

    def coordinates(self, study_id: int, series: dict[str, list[int]], load_volume,
                    problems: dict[str, str] | None = None) -> pd.DataFrame:
        """train_label_coordinates rows (submission spelling) of one study: `LevelPrior`'s interface
        (`problems` receives, by series description, why a series gave no points)."""
        from .prior import watched

        load = watched(series, load_volume, {} if problems is None else problems)
        return self.locate(study_id, series, load)[list(COORD_COLUMNS)]


def load_point_source(spec: str, layout, device: str = "cpu"):
    """A point source for `predict_studies`: ``prior`` (the mean-position guess, fitted on the
    layout's training coordinates), or a localiser checkpoint file (``.pt``) or folder of them.
    Raises FileNotFoundError for a path that does not exist."""
    from .prior import LevelPrior

    if spec == "prior":
        return LevelPrior.fit(layout)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"localiser {spec}: no such checkpoint file or folder")
    paths = sorted(path.glob("*.pt")) if path.is_dir() else [path]
    if not paths:
        raise ValueError(f"localiser {spec}: a folder without checkpoints (*.pt)")
    return Localizer.from_checkpoints(paths, device)


def localize(source, data_dir, split: str = "test", study_ids=None, cache_root: Path | None = None) -> pd.DataFrame:
    """Points of every study of a data folder's `split` (``test`` or ``train``) by a point source
    (a `Localizer`, or `infer.LevelPrior` for the mean-position guess), in the exact form of
    ``train_label_coordinates.csv`` (columns ``study_id, series_id, instance_number, condition,
    level, x, y``; "Spinal Canal Stenosis", "L1/L2"), so the layout reader takes the file back.
    Raises ValueError for an unknown split, LayoutError for a folder that is not an RSNA layout."""
    from ..data.cache import default_cache_dir
    from ..data.layout import Layout
    from ..data.volumes import SeriesRef, VolumeStore
    from .metrics import competition_form

    if split not in ("test", "train"):
        raise ValueError(f"split {split!r}: expected test or train")
    layout = Layout(Path(data_dir))
    table = layout.test_series if split == "test" else layout.train_series
    ids = sorted(table["study_id"].unique().tolist()) if study_ids is None else [int(s) for s in study_ids]
    store = VolumeStore(Path(cache_root or default_cache_dir()))
    frames = []
    for sid in ids:
        def load_volume(series_id, sid=sid):
            return store.open(SeriesRef(sid, int(series_id), layout.series_dir(sid, series_id, split)))

        frames.append(source.coordinates(sid, layout.series_of(sid, split), load_volume))
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(COORD_COLUMNS))
    return competition_form(rows)

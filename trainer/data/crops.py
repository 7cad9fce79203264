"""Crops: for one (study, level) sample, the stack of slices around each labelled point per plane.

Blocks, in this order, for the planes in use:

- ``sag_t2``: `sag_t2_slices` slices of Sagittal T2/STIR centred on the spinal-canal point's slice;
- ``sag_t1_left`` and ``sag_t1_right``: `sag_t1_slices` slices of Sagittal T1 centred on the
  labelled slice of each foramen (the labelled lateral slice, found by instance number, so by
  position, never by file index);
- ``axial``: `axial_slices` slices of Axial T2 centred on the subarticular points' slice, at the
  midpoint of the left and right points. Without subarticular points, the spinal-canal point is
  carried through patient space to the nearest axial slice.

A crop is square, centred on the point, with half side = ratio x the image's larger side (the
manual log's `window_ratio`; `axial_window_ratio` for axial), resized to `img_size`. Neighbour
slices are cropped around the same patient position projected into them. A block whose point or
series is missing, or whose instance number more than one file holds, is zeros and its `present`
flag is False, with the reason in the flags.

Two steps, so that a new crop spec costs no preprocessing: `plan_study` finds, once per study,
each block's series, centre slice and point (geometry only, no pixels read); `cut_level` cuts a
sample's crops from the memory-mapped volumes when a DataLoader worker asks for it, with optional
jitter of the crop's centre and scale (augmentations).
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
import pandas as pd

from .dicom import DicomWarning, Volume
from .geometry import nearest_slice, patient_to_pixel, pixel_to_patient
from .layout import LEVELS


_SAG_T2_COND = "spinal_canal_stenosis"
_FORAMEN = {"sag_t1_left": "left_neural_foraminal_narrowing", "sag_t1_right": "right_neural_foraminal_narrowing"}
_RECESS = ("left_subarticular_stenosis", "right_subarticular_stenosis")
AXIAL_MAX_DISTANCE_MM = 10.0  # the fallback projection must land this close to an axial slice


class _CropSpecMethods:
    def blocks(self) -> list[tuple[str, int]]:
        """The (block, slices) of a sample's input, in channel order: ``sag_t2``, then ``sag_t1_left``
        and ``sag_t1_right`` (the foramina), then ``axial``, each only when its plane is used."""
        out = []
        if "sag_t2" in self.planes:
            out.append(("sag_t2", self.sag_t2_slices))
        if "sag_t1" in self.planes:
            out += [("sag_t1_left", self.sag_t1_slices), ("sag_t1_right", self.sag_t1_slices)]
        if "axial" in self.planes:
            out.append(("axial", self.axial_slices))
        return out

    @property
    def n_slices(self) -> int:
        """The input's channel count: every block's slices summed (the C of a ``[C, H, W]`` crop stack)."""
        return sum(n for _, n in self.blocks())

    @classmethod
    def from_config(cls, data_cfg) -> "CropSpec":
        """The crop spec of a `DataConfig`: its used planes and its pixel fields (`PIXEL_FIELDS`)."""
        return cls(planes=data_cfg.used_planes(), **{name: getattr(data_cfg, name) for name in PIXEL_FIELDS})


def _pixel_fields() -> tuple[str, ...]:
    from ..config import DataConfig

    return tuple(f.name for f in dataclasses.fields(DataConfig) if f.metadata.get("pixels"))


PIXEL_FIELDS = _pixel_fields()
# The preprocessing fields that decide a sample's pixels: the planes in use and every DataConfig
# field marked `PIXELS` (window ratios, slice counts, image size), made from the config's own
# declaration so that a new such field cannot be forgotten here.
CropSpec = dataclasses.make_dataclass("CropSpec", [("planes", tuple)] + [(n, object) for n in PIXEL_FIELDS],
                                      bases=(_CropSpecMethods,), frozen=True)
CropSpec.__module__ = __name__  # pickles (DataLoader workers) find it here


BLOCK_PLANE = {"sag_t2": "sag_t2", "sag_t1_left": "sag_t1", "sag_t1_right": "sag_t1", "axial": "axial"}
BLOCK_ORDER = ("sag_t2", "sag_t1_left", "sag_t1_right", "axial")
# the block each condition is graded on
BLOCK_OF_CONDITION = {_SAG_T2_COND: "sag_t2", **{c: b for b, c in _FORAMEN.items()}, **{c: "axial" for c in _RECESS}}
# the series descriptions a block's point comes from (the axial block, on test studies, from the
# canal point carried over from Sagittal T2/STIR)
SERIES_OF_BLOCK = {"sag_t2": ("Sagittal T2/STIR",), "sag_t1_left": ("Sagittal T1",),
                   "sag_t1_right": ("Sagittal T1",), "axial": ("Axial T2", "Sagittal T2/STIR")}


def lacking_conditions(blocks, present, conditions) -> np.ndarray:
    """Which conditions a sample cannot be graded on: ``(..., len(conditions))`` bool, True where
    the block the condition is graded on (`BLOCK_OF_CONDITION`) is in use (`blocks`, the spec's
    block names in order) and not present. `present` is ``(..., len(blocks))`` bool (a sample's
    flags, or a batch of them). Such a condition gets the training label frequencies, never the
    model's answer to a blank crop."""
    present = np.asarray(present, dtype=bool)
    names = list(blocks)
    out = np.zeros(present.shape[:-1] + (len(conditions),), dtype=bool)
    for c, cond in enumerate(conditions):
        block = BLOCK_OF_CONDITION[cond]
        if block in names:
            out[..., c] = ~present[..., names.index(block)]
    return out


def crop_resize(image: np.ndarray, x: float, y: float, ratio: float, size: int) -> np.ndarray:
    """Square crop centred on pixel (x, y), half side = ratio x the larger image side, resized to
    size x size in one affine warp (sub-pixel exact; zeros outside the image)."""
    half = ratio * max(image.shape)
    s = 2 * half / size  # input pixels per output pixel
    c = (size - 1) / 2
    m = np.array([[s, 0, x - c * s], [0, s, y - c * s]], dtype=np.float64)
    return cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def crop_stack(volume: Volume, index: int, x: float, y: float, n: int, ratio: float, size: int,
               out: np.ndarray | None = None) -> np.ndarray:
    """n slices centred on slice `index` (clamped at the series' ends), each cropped around the
    patient position of (x, y) projected into it."""
    point = pixel_to_patient(volume, index, x, y)
    out = np.zeros((n, size, size), dtype=np.uint8) if out is None else out
    for k, off in enumerate(range(-(n // 2), n - n // 2)):
        j = min(max(index + off, 0), len(volume) - 1)
        xj, yj = (x, y) if j == index else patient_to_pixel(volume, j, point)[:2]
        out[k] = crop_resize(volume.images[j], xj, yj, ratio, size)
    return out


@dataclass
class StudyCrops:
    """The crops of all five levels of one study, cut at once (`build_study_crops`,
    `SampleSource.study_crops`). Levels are in `LEVELS` order, slices in the spec's block order; a
    block that could not be cut is zeros with `present` False and the reason in `flags` (``level``
    and ``block`` are None for a flag about the series, such as an unreadable slice)."""

    images: np.ndarray  # (levels, slices, size, size) uint8
    present: np.ndarray  # (levels, blocks) bool
    flags: list[dict]  # {"level", "block", "reason", "detail"}


@dataclass(frozen=True)
class BlockPlan:
    """Where one crop block of one level is cut: the series, its centre slice and the point."""

    series_id: int
    index: int
    x: float
    y: float


@dataclass
class StudyPlan:
    """Per level, per block of `BLOCK_ORDER` in use: a BlockPlan, or None (with a flag)."""

    study_id: int
    blocks: dict[str, list[BlockPlan | None]]  # block name -> 5 levels
    flags: list[dict]  # {"level", "block", "reason", "detail"}
    series: tuple[int, ...]  # the series the plan cuts from


def _inside(volume: Volume, index: int, x: float, y: float) -> bool:
    rows, cols = volume.images[index].shape
    return 0 <= x < cols and 0 <= y < rows


def plan_study(study_id: int, coords: pd.DataFrame, load_volume, planes, axial_series_id: int | None = None,
               warn: bool = True) -> StudyPlan:
    """Each block's series, centre slice and point, for all five levels of one study.

    `coords` holds the study's rows of train_label_coordinates (condition/level in submission
    spelling); `load_volume(series_id)` returns a Volume or raises (missing or unreadable series);
    `planes` are the planes in use; `axial_series_id` is the study's Axial T2 series, for the
    fallback without axial points. Reads geometry only: no pixel is touched.
    """
    names = [b for b in BLOCK_ORDER if BLOCK_PLANE[b] in planes]
    blocks: dict[str, list[BlockPlan | None]] = {b: [None] * len(LEVELS) for b in names}
    flags: list[dict] = []
    volumes: dict[int, Volume | Exception] = {}

    def volume(series_id: int):
        if series_id not in volumes:
            try:
                volumes[series_id] = load_volume(series_id)
            except Exception as e:
                volumes[series_id] = e
                if warn:
                    warnings.warn(f"study {study_id} series {series_id}: {e}", DicomWarning, stacklevel=3)
            else:
                for name, reason in volumes[series_id].skipped:
                    flags.append(dict(level=None, block=None, reason="slice_unreadable",
                                      detail=f"series {series_id} file {name}: {reason}"))
        return volumes[series_id]

    points = {(r.condition, r.level): r for r in coords.itertuples(index=False)}

    def locate(cond: str, level: str, block: str):
        """(volume, slice index, x, y) of a labelled point, or None with a flag."""
        r = points.get((cond, level))
        if r is None:
            flags.append(dict(level=level, block=block, reason="no_point", detail=cond))
            return None
        vol = volume(int(r.series_id))
        if isinstance(vol, Exception):
            flags.append(dict(level=level, block=block, reason="series_unreadable",
                              detail=f"series {r.series_id}: {vol}"))
            return None
        hits = vol.slices_of_instance(int(r.instance_number))
        if len(hits) > 1:  # which file the label meant cannot be known: never guessed
            files = ", ".join(vol.file_name(i) for i in hits)
            flags.append(dict(level=level, block=block, reason="labelled_instance_repeated",
                              detail=f"series {r.series_id} instance {r.instance_number}: files {files}"))
            if warn:
                warnings.warn(f"study {study_id} series {r.series_id}: labelled instance {r.instance_number} is "
                              f"held by {len(hits)} files ({files}); the point is not used ({level} {cond})",
                              DicomWarning, stacklevel=3)
            return None
        idx = hits[0] if hits else None
        if idx is None:
            flags.append(dict(level=level, block=block, reason="instance_missing",
                              detail=f"series {r.series_id} instance {r.instance_number}"))
            if warn:
                warnings.warn(f"study {study_id} series {r.series_id}: labelled instance "
                              f"{r.instance_number} not found ({level} {cond})", DicomWarning, stacklevel=3)
            return None
        if not _inside(vol, idx, r.x, r.y):
            flags.append(dict(level=level, block=block, reason="point_outside",
                              detail=f"series {r.series_id} instance {r.instance_number} ({r.x}, {r.y})"))
            if warn:
                warnings.warn(f"study {study_id} series {r.series_id} instance {r.instance_number}: point "
                              f"({r.x}, {r.y}) lies outside the image ({level} {cond})", DicomWarning, stacklevel=3)
            return None
        return int(r.series_id), idx, float(r.x), float(r.y)

    for lv, level in enumerate(LEVELS):
        for block in names:
            if block == "sag_t2":
                hit = locate(_SAG_T2_COND, level, block)
            elif block in _FORAMEN:
                hit = locate(_FORAMEN[block], level, block)
            else:
                hit = _locate_axial(points, level, volume, locate, flags, axial_series_id)
            if hit is not None:
                blocks[block][lv] = BlockPlan(*hit)
    used = tuple(sorted({p.series_id for ps in blocks.values() for p in ps if p is not None}))
    return StudyPlan(study_id, blocks, flags, used)


def cut_level(plan: StudyPlan, lv: int, spec: CropSpec, volume, jitter=None) -> tuple[np.ndarray, np.ndarray]:
    """(images (slices, size, size) uint8, present per block) of one level, cut now.

    `volume(series_id)` returns the Volume; `jitter`, for training, is a callable
    ``jitter(half_side) -> (dx, dy, scale)`` moving each block's crop centre by (dx, dy) pixels and
    scaling its window."""
    size = spec.img_size
    blocks = spec.blocks()
    images = np.zeros((spec.n_slices, size, size), dtype=np.uint8)
    present = np.zeros(len(blocks), dtype=bool)
    start = 0
    for b, (block, n) in enumerate(blocks):
        bp = plan.blocks[block][lv]
        if bp is not None:
            vol = volume(bp.series_id)
            ratio = spec.axial_window_ratio if block == "axial" else spec.window_ratio
            x, y = bp.x, bp.y
            if jitter is not None:
                dx, dy, scale = jitter(ratio * max(vol.images[bp.index].shape))
                x, y, ratio = x + dx, y + dy, ratio * scale
            crop_stack(vol, bp.index, x, y, n, ratio, size, out=images[start:start + n])
            present[b] = True
        start += n
    return images, present


def build_study_crops(study_id: int, coords: pd.DataFrame, load_volume, spec: CropSpec,
                      axial_series_id: int | None = None) -> StudyCrops:
    """Crops of all five levels of one study, cut at once (prediction, data check, tests)."""
    plan = plan_study(study_id, coords, load_volume, spec.planes, axial_series_id)
    cache: dict[int, Volume] = {}

    def volume(series_id):
        if series_id not in cache:
            cache[series_id] = load_volume(series_id)
        return cache[series_id]

    levels = [cut_level(plan, lv, spec, volume) for lv in range(len(LEVELS))]
    return StudyCrops(np.stack([im for im, _ in levels]), np.stack([p for _, p in levels]), plan.flags)


def _locate_axial(points, level, volume, locate, flags, axial_series_id):
    found = [points[(c, level)] for c in _RECESS if (c, level) in points]
    if found:
        # both recesses are labelled on one slice in practice; take the first point's slice and
        # the midpoint of the points on it
        hit = locate(found[0].condition, level, "axial")
        if hit is None:
            return None
        series_id, idx, _, _ = hit
        same = [r for r in found if int(r.series_id) == int(found[0].series_id)
                and int(r.instance_number) == int(found[0].instance_number)]
        return series_id, idx, float(np.mean([r.x for r in same])), float(np.mean([r.y for r in same]))
    # no subarticular point: carry the canal point through patient space to the axial series
    canal = points.get((_SAG_T2_COND, level))
    if canal is not None and axial_series_id is not None:
        sag = volume(int(canal.series_id))
        ax = volume(int(axial_series_id))
        if not isinstance(sag, Exception) and not isinstance(ax, Exception):
            idx = sag.index_of_instance(int(canal.instance_number))
            if idx is not None:
                p = pixel_to_patient(sag, idx, float(canal.x), float(canal.y))
                j, x, y, dist = nearest_slice(ax, p)
                if abs(dist) <= AXIAL_MAX_DISTANCE_MM and _inside(ax, j, x, y):
                    flags.append(dict(level=level, block="axial", reason="axial_from_sagittal",
                                      detail=f"{dist:.1f} mm from slice"))
                    return int(axial_series_id), j, x, y
    flags.append(dict(level=level, block="axial", reason="no_point", detail="subarticular"))
    return None

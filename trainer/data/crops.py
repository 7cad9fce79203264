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
series is missing is zeros and its `present` flag is False, with the reason in the flags.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass

import cv2
import numpy as np
import pandas as pd

from .dicom import DicomWarning, Volume
from .geometry import nearest_slice, patient_to_pixel, pixel_to_patient
from .layout import LEVELS

CROP_VERSION = 1  # bump when crop semantics change: it invalidates cached samples

_SAG_T2_COND = "spinal_canal_stenosis"
_FORAMEN = {"sag_t1_left": "left_neural_foraminal_narrowing", "sag_t1_right": "right_neural_foraminal_narrowing"}
_RECESS = ("left_subarticular_stenosis", "right_subarticular_stenosis")
AXIAL_MAX_DISTANCE_MM = 10.0  # the fallback projection must land this close to an axial slice


@dataclass(frozen=True)
class CropSpec:
    """The preprocessing fields that decide a sample's pixels (and so its cache key)."""

    planes: tuple[str, ...]
    window_ratio: float
    axial_window_ratio: float
    sag_t1_slices: int
    sag_t2_slices: int
    axial_slices: int
    img_size: int

    @classmethod
    def from_config(cls, data_cfg) -> "CropSpec":
        return cls(
            planes=data_cfg.used_planes(),
            window_ratio=data_cfg.window_ratio,
            axial_window_ratio=data_cfg.axial_window_ratio,
            sag_t1_slices=data_cfg.sag_t1_slices,
            sag_t2_slices=data_cfg.sag_t2_slices,
            axial_slices=data_cfg.axial_slices,
            img_size=data_cfg.img_size,
        )

    def blocks(self) -> list[tuple[str, int]]:
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
        return sum(n for _, n in self.blocks())

    def key(self) -> str:
        payload = json.dumps(asdict(self) | {"version": CROP_VERSION}, sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:16]


def crop_resize(image: np.ndarray, x: float, y: float, ratio: float, size: int) -> np.ndarray:
    """Square crop centred on pixel (x, y), half side = ratio x the larger image side, resized to
    size x size in one affine warp (sub-pixel exact; zeros outside the image)."""
    half = ratio * max(image.shape)
    s = 2 * half / size  # input pixels per output pixel
    c = (size - 1) / 2
    m = np.array([[s, 0, x - c * s], [0, s, y - c * s]], dtype=np.float64)
    return cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def crop_stack(volume: Volume, index: int, x: float, y: float, n: int, ratio: float, size: int) -> np.ndarray:
    """n slices centred on slice `index` (clamped at the series' ends), each cropped around the
    patient position of (x, y) projected into it."""
    point = pixel_to_patient(volume, index, x, y)
    out = np.zeros((n, size, size), dtype=np.uint8)
    for k, off in enumerate(range(-(n // 2), n - n // 2)):
        j = int(np.clip(index + off, 0, len(volume) - 1))
        xj, yj = (x, y) if j == index else patient_to_pixel(volume, j, point)[:2]
        out[k] = crop_resize(volume.images[j], xj, yj, ratio, size)
    return out


@dataclass
class StudyCrops:
    images: np.ndarray  # (levels, slices, size, size) uint8
    present: np.ndarray  # (levels, blocks) bool
    flags: list[dict]  # {"level", "block", "reason", "detail"}


def _inside(volume: Volume, index: int, x: float, y: float) -> bool:
    rows, cols = volume.images[index].shape
    return 0 <= x < cols and 0 <= y < rows


def build_study_crops(study_id: int, coords: pd.DataFrame, load_volume, spec: CropSpec,
                      axial_series_id: int | None = None) -> StudyCrops:
    """Crops of all five levels of one study.

    `coords` holds the study's rows of train_label_coordinates (condition/level in submission
    spelling); `load_volume(series_id)` returns a Volume or raises (missing or unreadable series);
    `axial_series_id` is the study's Axial T2 series, for the fallback without axial points.
    """
    blocks = spec.blocks()
    size = spec.img_size
    images = np.zeros((len(LEVELS), spec.n_slices, size, size), dtype=np.uint8)
    present = np.zeros((len(LEVELS), len(blocks)), dtype=bool)
    flags: list[dict] = []
    volumes: dict[int, Volume | Exception] = {}

    def volume(series_id: int):
        if series_id not in volumes:
            try:
                volumes[series_id] = load_volume(series_id)
            except Exception as e:
                volumes[series_id] = e
                warnings.warn(f"study {study_id} series {series_id}: {e}", DicomWarning, stacklevel=2)
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
        idx = vol.index_of_instance(int(r.instance_number))
        if idx is None:
            flags.append(dict(level=level, block=block, reason="instance_missing",
                              detail=f"series {r.series_id} instance {r.instance_number}"))
            warnings.warn(f"study {study_id} series {r.series_id}: labelled instance "
                          f"{r.instance_number} not found ({level} {cond})", DicomWarning, stacklevel=3)
            return None
        if not _inside(vol, idx, r.x, r.y):
            flags.append(dict(level=level, block=block, reason="point_outside",
                              detail=f"series {r.series_id} instance {r.instance_number} ({r.x}, {r.y})"))
            warnings.warn(f"study {study_id} series {r.series_id} instance {r.instance_number}: point "
                          f"({r.x}, {r.y}) lies outside the image ({level} {cond})", DicomWarning, stacklevel=3)
            return None
        return vol, idx, float(r.x), float(r.y)

    for lv, level in enumerate(LEVELS):
        start = 0
        for b, (block, n) in enumerate(blocks):
            ratio = spec.axial_window_ratio if block == "axial" else spec.window_ratio
            if block == "sag_t2":
                hit = locate(_SAG_T2_COND, level, block)
            elif block in _FORAMEN:
                hit = locate(_FORAMEN[block], level, block)
            else:
                hit = _locate_axial(points, level, volume, locate, flags, axial_series_id)
            if hit is not None:
                vol, idx, x, y = hit
                images[lv, start:start + n] = crop_stack(vol, idx, x, y, n, ratio, size)
                present[lv, b] = True
            start += n
    return StudyCrops(images, present, flags)


def _locate_axial(points, level, volume, locate, flags, axial_series_id):
    found = [points[(c, level)] for c in _RECESS if (c, level) in points]
    if found:
        # both recesses are labelled on one slice in practice; take the first point's slice and
        # the midpoint of the points on it
        hit = locate(found[0].condition, level, "axial")
        if hit is None:
            return None
        vol, idx, _, _ = hit
        same = [r for r in found if int(r.series_id) == int(found[0].series_id)
                and int(r.instance_number) == int(found[0].instance_number)]
        return vol, idx, float(np.mean([r.x for r in same])), float(np.mean([r.y for r in same]))
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
                    return ax, j, x, y
    flags.append(dict(level=level, block="axial", reason="no_point", detail="subarticular"))
    return None

"""Patient-space geometry of a `Volume` (DICOM LPS: +x patient left, +y posterior, +z head).

Pixel coordinates are (x, y) = (column, row), as in train_label_coordinates.csv. A pixel's patient
position is ImagePositionPatient + x * column spacing * row direction + y * row spacing * column
direction (PixelSpacing lists the spacing between rows first).
"""
from __future__ import annotations

import numpy as np

from .dicom import Volume


def slice_normal(volume: Volume, index: int = 0) -> np.ndarray:
    """Unit normal ``(3,)`` of slice `index`'s plane in patient space: row direction x column direction."""
    return volume.normals()[index]


def pixel_to_patient(volume: Volume, index: int, x: float, y: float) -> np.ndarray:
    """Patient position (mm) of pixel (x, y) of slice `index`."""
    o = volume.orientations[index]
    row_spacing, col_spacing = volume.spacings[index]
    return volume.positions[index] + x * col_spacing * o[:3] + y * row_spacing * o[3:]


def patient_to_pixel(volume: Volume, index: int, point: np.ndarray) -> tuple[float, float, float]:
    """(x, y, distance): the in-plane pixel nearest to `point` and its distance (mm) from the plane."""
    o = volume.orientations[index]
    row_spacing, col_spacing = volume.spacings[index]
    d = np.asarray(point, dtype=np.float64) - volume.positions[index]
    x = float(d @ o[:3]) / col_spacing
    y = float(d @ o[3:]) / row_spacing
    return x, y, float(d @ slice_normal(volume, index))


def slice_center(volume: Volume, index: int) -> np.ndarray:
    """Patient position ``(3,)`` (mm) of the centre of slice `index`'s image."""
    rows, cols = volume.images[index].shape
    return pixel_to_patient(volume, index, (cols - 1) / 2, (rows - 1) / 2)


def sagittal_side(volume: Volume, index: int, midline_x: float) -> str:
    """'left' or 'right' of the patient for a sagittal slice, from its patient x against the
    midline's (patient +x points to the patient's left); never from the slice's index."""
    return "left" if slice_center(volume, index)[0] > midline_x else "right"


def nearest_slice(volume: Volume, point: np.ndarray) -> tuple[int, float, float, float]:
    """(index, x, y, distance): the slice whose plane passes nearest to a patient point, and the
    point projected into it. Works for series holding several stacks at different angles."""
    best = None
    for i in range(len(volume)):
        x, y, dist = patient_to_pixel(volume, i, point)
        if best is None or abs(dist) < abs(best[3]):
            best = (i, x, y, dist)
    return best

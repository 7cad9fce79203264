"""Synthetic series for geometry tests, written with the phantom's own DICOM writer."""
from __future__ import annotations

import numpy as np

from trainer.data.phantom import SeriesPlan, write_series

SAGITTAL = np.array([0, 1, 0, 0, 0, -1], dtype=float)  # rows go posterior, columns go down
AXIAL = np.array([1, 0, 0, 0, 1, 0], dtype=float)


def series_plan(orientation, positions, spacing=0.5, size=64, description="Sagittal T2/STIR") -> SeriesPlan:
    positions = np.asarray(positions, dtype=float)
    return SeriesPlan(description, "T2", positions, np.tile(orientation, (len(positions), 1)), spacing, size,
                      3.0, 3.0, "HFS")


def dot_images(n, size=64, dots=None):
    """n uint16 slices, slice k has value 100*(k+1) everywhere and an optional bright dot."""
    images = []
    for k in range(n):
        im = np.full((size, size), 100 * (k + 1), dtype=np.uint16)
        if dots and dots[k] is not None:
            x, y = dots[k]
            im[y, x] = 4000
        images.append(im)
    return images


def write_sagittal(folder, xs, instances, size=64, spacing=0.5, dots=None, **kw):
    pos = [(x, -16.0, 16.0) for x in xs]
    plan = series_plan(SAGITTAL, pos, spacing, size)
    write_series(folder, dot_images(len(xs), size, dots), plan, instances, 1, 2, **kw)
    return plan


def free_port() -> int:
    """A TCP port nothing listens on (for servers the tests start on loopback)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

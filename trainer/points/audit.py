"""The coordinate audit: labelled points a person should look at, worst first.

Real label files hold mistakes (the 7th place corrected 141 spinal canal points in 93 studies by
hand, mostly at L1/L2 and L2/L3). `audit_points` lists, per labelled point, what is geometrically
impossible or suspicious:

- ``instance_missing``: its instance number is not in its series (or the series cannot be read);
- ``instance_repeated``: several files of its series hold its instance number (which one was meant?);
- ``point_outside``: (x, y) lies outside its image;
- ``levels_out_of_order``: along the spine (patient z, head up) a level is not below the level
  above it, for the same condition (swapped levels);
- ``wrong_side``: a left point on the patient's right of the study's canal, or the reverse;
- ``far_from_prediction``: more than `far_mm` from a localiser's out-of-fold point (given).

Each row carries the point (train_label_coordinates columns, submission spelling), the reason,
a detail a person can read, and ``badness`` (mm where there is a distance; 1000 for points that
cannot be placed at all), sorted worst first.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..data.layout import LEVELS, PLANE_OF_CONDITION
from .metrics import COORD_COLUMNS, with_patient_positions

UNPLACEABLE = 1000.0  # badness of a point that cannot be placed in patient space


def _holders(load_volume, study_id: int, series_id: int, instance_number: int) -> list[str]:
    """The files of a series that hold an instance number ([] when the series cannot be read)."""
    try:
        vol = load_volume(study_id, series_id)
    except Exception:
        return []
    return [vol.file_name(i) for i in vol.slices_of_instance(instance_number)]


def audit_points(coords: pd.DataFrame, load_volume, predicted: pd.DataFrame | None = None,
                 far_mm: float = 15.0) -> pd.DataFrame:
    """Suspicious labelled points (module doc), worst first.

    `coords`: train_label_coordinates rows (submission spelling); `load_volume(study_id,
    series_id)` returns the Volume or raises; `predicted`: a localiser's out-of-fold points with
    patient columns (`with_patient_positions`), or None to skip that check. Returns a DataFrame
    with `COORD_COLUMNS` + ``reason, detail, badness``."""
    pts = with_patient_positions(coords.reset_index(drop=True), load_volume)
    found = []

    def flag(r, reason, detail, badness):
        found.append({**{c: getattr(r, c) for c in COORD_COLUMNS}, "reason": reason, "detail": detail,
                      "badness": float(badness)})

    shapes: dict[tuple[int, int], object] = {}
    for r in pts.itertuples(index=False):
        if np.isnan(r.slice):
            held = _holders(load_volume, int(r.study_id), int(r.series_id), int(r.instance_number))
            if len(held) > 1:
                flag(r, "instance_repeated", f"instance {r.instance_number} is held by {len(held)} files of series "
                     f"{r.series_id} ({', '.join(held)})", UNPLACEABLE)
            else:
                flag(r, "instance_missing", f"instance {r.instance_number} is not in series {r.series_id}",
                     UNPLACEABLE)
            continue
        key = (int(r.study_id), int(r.series_id))
        if key not in shapes:
            shapes[key] = load_volume(*key)
        rows, cols = shapes[key].images[int(r.slice)].shape
        if not (0 <= r.x < cols and 0 <= r.y < rows):
            flag(r, "point_outside", f"({r.x:.1f}, {r.y:.1f}) outside the {cols} x {rows} image", UNPLACEABLE)
    placed = pts[pts["slice"].notna()]
    order = {lv: i for i, lv in enumerate(LEVELS)}
    for (sid, cond), g in placed.groupby(["study_id", "condition"]):
        g = g.assign(k=g["level"].map(order)).sort_values("k")
        z = g["patient_z"].to_numpy()
        bad = set()
        for a in range(len(g) - 1):
            if z[a + 1] >= z[a]:  # the lower level is not below the upper one
                bad.update((a, a + 1))
        for a in sorted(bad):
            r = g.iloc[a]
            flag(r, "levels_out_of_order", f"{cond} levels along the spine (z, mm): " + ", ".join(
                f"{lv} {zz:.0f}" for lv, zz in zip(g["level"], z)), abs(z[a] - np.median(z)) + 50)
    canal = placed[placed["condition"] == "spinal_canal_stenosis"].groupby("study_id")["patient_x"].median()
    for r in placed[placed["condition"].str.startswith(("left", "right"))].itertuples(index=False):
        if r.study_id not in canal.index:
            continue
        side = 1 if r.condition.startswith("left") else -1  # patient +x is the left
        offset = (r.patient_x - canal[r.study_id]) * side
        if offset < 0:
            flag(r, "wrong_side", f"{-offset:.1f} mm on the patient's {'right' if side > 0 else 'left'} of the canal "
                 f"({PLANE_OF_CONDITION[r.condition]})", -offset + 50)
    if predicted is not None and len(predicted):
        keys = ["study_id", "condition", "level"]
        m = placed.merge(predicted[keys + ["patient_x", "patient_y", "patient_z"]], on=keys, suffixes=("", "_pred"))
        d = np.linalg.norm(m[["patient_x", "patient_y", "patient_z"]].to_numpy(float)
                           - m[["patient_x_pred", "patient_y_pred", "patient_z_pred"]].to_numpy(float), axis=1)
        for r, dist in zip(m.itertuples(index=False), d):
            if dist > far_mm:
                flag(r, "far_from_prediction", f"{dist:.1f} mm from the localiser's out-of-fold point", dist)
    out = pd.DataFrame(found, columns=[*COORD_COLUMNS, "reason", "detail", "badness"])
    return out.sort_values("badness", ascending=False, kind="stable").reset_index(drop=True)


def read_predicted(path, load_volume) -> pd.DataFrame:
    """A localiser's points to compare with, from either form it writes: a trial's ``oof.csv``
    (with patient columns) or ``train_label_coordinates.csv`` rows (`optuna-run localize`, the
    ``oof_coordinates*.csv`` files), whose patient positions are computed here. Raises UserError
    for a missing file, LayoutError (naming the file and field) for a malformed one."""
    from pathlib import Path

    from ..data.layout import read_coordinates
    from ..errors import UserError
    from .metrics import PATIENT_COLUMNS

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: localiser points file not found")
    if set(PATIENT_COLUMNS) <= set(pd.read_csv(path, nrows=0).columns):
        return pd.read_csv(path)
    return with_patient_positions(read_coordinates(path), load_volume)


def audit_folder(data_dir, oof: str | None = None, far_mm: float = 15.0, cache_root=None) -> pd.DataFrame:
    """`audit_points` over a data folder's training coordinates; `oof`: a localiser's out-of-fold
    points to compare with (`read_predicted`: a trial's ``oof.csv`` or coordinate rows). Raises
    LayoutError for a folder that is not an RSNA layout or a malformed points file, UserError for
    a missing one."""
    from pathlib import Path

    from ..data.cache import default_cache_dir
    from ..data.layout import Layout
    from ..data.volumes import SeriesRef, VolumeStore

    layout = Layout(Path(data_dir))
    store = VolumeStore(Path(cache_root or default_cache_dir()))

    def load(s, i):
        return store.open(SeriesRef(int(s), int(i), layout.series_dir(s, i)))

    predicted = read_predicted(oof, load) if oof else None
    return audit_points(layout.coordinates, load, predicted, far_mm)

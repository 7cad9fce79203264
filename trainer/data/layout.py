"""The RSNA 2024 lumbar-spine folder layout: names, CSV readers and their validation.

Every reader checks exact column names and values and fails with a `LayoutError` naming the file
and the offending column or value, so a wrong `--data` folder is caught before any training.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
import warnings
from pathlib import Path

import pandas as pd

from ..errors import UserError
CONDITIONS = (
    "spinal_canal_stenosis",
    "left_neural_foraminal_narrowing",
    "right_neural_foraminal_narrowing",
    "left_subarticular_stenosis",
    "right_subarticular_stenosis",
)
LEVELS = ("l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1")
SEVERITIES = ("Normal/Mild", "Moderate", "Severe")
TARGET_COLUMNS = ("normal_mild", "moderate", "severe")  # submission columns, same order
LABEL_COLUMNS = tuple(f"{c}_{lv}" for c in CONDITIONS for lv in LEVELS)

# train_label_coordinates.csv spells conditions and levels for people
CONDITION_NAMES = {c: c.replace("_", " ").title() for c in CONDITIONS}
LEVEL_NAMES = {lv: lv.upper().replace("_", "/") for lv in LEVELS}
CONDITION_FROM_NAME = {v: k for k, v in CONDITION_NAMES.items()}
LEVEL_FROM_NAME = {v: k for k, v in LEVEL_NAMES.items()}

SERIES_DESCRIPTIONS = ("Sagittal T1", "Sagittal T2/STIR", "Axial T2")
# which series a condition's points are labelled on
PLANE_OF_CONDITION = {
    "spinal_canal_stenosis": "Sagittal T2/STIR",
    "left_neural_foraminal_narrowing": "Sagittal T1",
    "right_neural_foraminal_narrowing": "Sagittal T1",
    "left_subarticular_stenosis": "Axial T2",
    "right_subarticular_stenosis": "Axial T2",
}
# the crop planes, by series description
PLANE_OF_SERIES = {"Sagittal T2/STIR": "sag_t2", "Sagittal T1": "sag_t1", "Axial T2": "axial"}

GROUP_OF_CONDITION = {
    "spinal_canal_stenosis": "spinal",
    "left_neural_foraminal_narrowing": "foraminal",
    "right_neural_foraminal_narrowing": "foraminal",
    "left_subarticular_stenosis": "subarticular",
    "right_subarticular_stenosis": "subarticular",
}


class LayoutError(UserError):
    """The data folder does not have the RSNA layout; the message names the file and field."""


class LayoutWarning(UserWarning):
    """Data that is used, with a stated rule, but looks wrong; the message names file and rows."""


def row_id(study_id: int, condition: str, level: str) -> str:
    """Kaggle submission row id, e.g. ``44036939_left_neural_foraminal_narrowing_l1_l2``."""
    return f"{study_id}_{condition}_{level}"


def parse_row_ids(row_ids) -> pd.DataFrame:
    """The inverse of `row_id` on a column of ids: ``study_id`` (str), ``condition``, ``level``."""
    ids = pd.Series(row_ids, dtype=str).reset_index(drop=True)
    study, rest = ids.str.split("_", n=1).str[0], ids.str.split("_", n=1).str[1]
    parts = rest.str.rsplit("_", n=2)
    return pd.DataFrame({"study_id": study, "condition": parts.str[0], "level": parts.str[1] + "_" + parts.str[2]})


def _read_csv(path: Path, columns: tuple[str, ...], exact: bool = True) -> pd.DataFrame:
    if not path.is_file():
        raise LayoutError(f"{path}: file not found")
    try:
        df = pd.read_csv(path)
    except Exception as e:  # pandas raises several kinds on garbage input
        raise LayoutError(f"{path}: cannot be read as CSV ({e})") from e
    got = tuple(df.columns)
    if exact and got != columns:
        missing = [c for c in columns if c not in got]
        extra = [c for c in got if c not in columns]
        detail = []
        if missing:
            detail.append(f"missing column(s) {missing}")
        if extra:
            detail.append(f"unexpected column(s) {extra}")
        if not detail:
            detail.append(f"columns out of order: expected {list(columns)}")
        raise LayoutError(f"{path}: " + "; ".join(detail))
    return df


def _check_values(path: Path, df: pd.DataFrame, column: str, allowed, allow_empty: bool) -> None:
    values = df[column]
    bad = values[~values.isin(allowed) & ~(values.isna() if allow_empty else False)]
    if len(bad):
        raise LayoutError(
            f"{path}: column {column!r} has value {bad.iloc[0]!r} (row {bad.index[0] + 2}); "
            f"allowed: {sorted(allowed)}"
        )


def _show(value) -> str:
    return repr(value) if isinstance(value, str) else ("empty" if pd.isna(value) else str(value))


def _check_int(path: Path, df: pd.DataFrame, column: str) -> None:
    """Whole numbers only (``22.0`` is 22); the error names the first offending row and value."""
    if df.empty:  # a header-only table (no test studies, say) has no type to check
        return
    if pd.api.types.is_integer_dtype(df[column]):
        return
    values = pd.to_numeric(df[column], errors="coerce")
    bad = values.isna() | (values != values.round())
    if bad.any():
        row = int(bad.to_numpy().argmax())
        raise LayoutError(
            f"{path}: column {column!r} must hold integers; row {row + 2} has {_show(df[column].iloc[row])}"
        )
    df[column] = values.astype("int64")


def _check_float(path: Path, df: pd.DataFrame, column: str) -> None:
    values = pd.to_numeric(df[column], errors="coerce")
    bad = values.isna() | values.abs().eq(float("inf"))
    if bad.any():
        row = int(bad.to_numpy().argmax())
        raise LayoutError(f"{path}: column {column!r} must hold numbers; row {row + 2} has {_show(df[column].iloc[row])}")
    df[column] = values.astype("float64")


def _check_not_empty(path: Path, df: pd.DataFrame) -> None:
    if df.empty:
        raise LayoutError(f"{path}: no rows below the header")


def read_labels(path: Path) -> pd.DataFrame:
    """train.csv as a tidy frame: study_id, condition, level, severity (0/1/2, -1 when empty)."""
    df = _read_csv(path, ("study_id",) + LABEL_COLUMNS)
    _check_not_empty(path, df)
    _check_int(path, df, "study_id")
    dup = df["study_id"].duplicated(keep=False)
    if dup.any():
        rows = [int(i) + 2 for i in df.index[dup & (df["study_id"] == df.loc[dup, "study_id"].iloc[0])]]
        raise LayoutError(f"{path}: study {int(df.loc[dup, 'study_id'].iloc[0])} has more than one row "
                          f"(rows {', '.join(map(str, rows))}); one row per study")
    for col in LABEL_COLUMNS:
        _check_values(path, df, col, SEVERITIES, allow_empty=True)
    long = df.melt(id_vars="study_id", var_name="label", value_name="grade")
    cond_level = long["label"].str.rsplit("_", n=2, expand=True)
    long["condition"] = cond_level[0]
    long["level"] = cond_level[1] + "_" + cond_level[2]
    code = {s: i for i, s in enumerate(SEVERITIES)}
    long["severity"] = long["grade"].map(code).fillna(-1).astype(int)
    return long[["study_id", "condition", "level", "severity"]].sort_values(
        ["study_id", "condition", "level"], ignore_index=True
    )


def read_coordinates(path: Path) -> pd.DataFrame:
    """train_label_coordinates.csv with conditions and levels in submission spelling."""
    cols = ("study_id", "series_id", "instance_number", "condition", "level", "x", "y")
    df = _read_csv(path, cols)
    _check_not_empty(path, df)
    for c in ("study_id", "series_id", "instance_number"):
        _check_int(path, df, c)
    for c in ("x", "y"):
        _check_float(path, df, c)
    _check_values(path, df, "condition", CONDITION_FROM_NAME, allow_empty=False)
    _check_values(path, df, "level", LEVEL_FROM_NAME, allow_empty=False)
    df["condition"] = df["condition"].map(CONDITION_FROM_NAME)
    df["level"] = df["level"].map(LEVEL_FROM_NAME)
    return _first_point_only(path, df)


def _first_point_only(path: Path, df: pd.DataFrame) -> pd.DataFrame:
    """One point per (study, series, condition, level): a repeated row is dropped, and a second
    row that disagrees (another slice or position) loses to the first, with a warning naming
    both rows. Points of one level on two series (two Axial T2, say) are not repeats."""
    key = ["study_id", "series_id", "condition", "level"]
    dup = df.duplicated(key, keep="first")
    if not dup.any():
        return df
    first = df.drop_duplicates(key, keep="first").reset_index().set_index(key)["index"]
    point = ["instance_number", "x", "y"]
    conflicts = []
    for i, row in df[dup].iterrows():
        j = int(first.loc[tuple(row[key])])
        if any(row[c] != df.at[j, c] for c in point):
            conflicts.append(f"row {i + 2} (instance {row['instance_number']}, x {row['x']}, y {row['y']}) "
                             f"disagrees with row {j + 2}")
    if conflicts:
        more = f" and {len(conflicts) - 3} more" if len(conflicts) > 3 else ""
        warnings.warn(f"{path}: {len(conflicts)} point(s) given twice with different values, the first row "
                      f"kept: {'; '.join(conflicts[:3])}{more}", LayoutWarning, stacklevel=3)
    return df[~dup].reset_index(drop=True)


def read_series_descriptions(path: Path, allow_empty: bool = False) -> pd.DataFrame:
    """A ``*_series_descriptions.csv`` as read: ``study_id``, ``series_id`` (int64), ``series_description``
    (one of `SERIES_DESCRIPTIONS`). `allow_empty` accepts a header-only file (a test table without studies).
    Raises LayoutError, naming the file and column, when it is missing or not CSV, its columns are
    not exactly those, an id is not a whole number, a description is unknown, or it has no rows."""
    df = _read_csv(path, ("study_id", "series_id", "series_description"))
    if not allow_empty:
        _check_not_empty(path, df)
    _check_int(path, df, "study_id")
    _check_int(path, df, "series_id")
    _check_values(path, df, "series_description", SERIES_DESCRIPTIONS, allow_empty=False)
    return df


@dataclass(frozen=True)
class Layout:
    """One RSNA-format data folder. Tables are read (and validated) on first use."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))
        if not self.root.is_dir():
            raise LayoutError(f"{self.root}: data folder not found")

    @cached_property
    def labels(self) -> pd.DataFrame:
        """``train.csv`` in tidy form (`read_labels`): study_id, condition, level, severity (0/1/2, -1 when empty)."""
        return read_labels(self.root / "train.csv")

    @cached_property
    def coordinates(self) -> pd.DataFrame:
        """``train_label_coordinates.csv`` (`read_coordinates`): study_id, series_id, instance_number,
        condition, level (submission spelling), x, y (pixels); one point per (study, series, condition, level)."""
        return read_coordinates(self.root / "train_label_coordinates.csv")

    @cached_property
    def train_series(self) -> pd.DataFrame:
        """``train_series_descriptions.csv`` (`read_series_descriptions`): study_id, series_id, series_description."""
        return read_series_descriptions(self.root / "train_series_descriptions.csv")

    @cached_property
    def test_series(self) -> pd.DataFrame:
        """``test_series_descriptions.csv`` (`read_series_descriptions`); it may have no rows."""
        return read_series_descriptions(self.root / "test_series_descriptions.csv", allow_empty=True)

    @cached_property
    def study_ids(self) -> list[int]:
        """The ids of the studies in ``train.csv``, sorted."""
        return sorted(self.labels["study_id"].unique().tolist())

    def series_dir(self, study_id: int, series_id: int, split: str = "train") -> Path:
        """The folder of one series' DICOM files, ``<root>/<split>_images/<study_id>/<series_id>`` (not checked)."""
        return self.root / f"{split}_images" / str(study_id) / str(series_id)

    def series_of(self, study_id: int, split: str = "train") -> dict[str, list[int]]:
        """Series ids of a study by description (a study may have two Axial T2, or lack one)."""
        index = self._series_index_train if split == "train" else self._series_index_test
        found = index.get(int(study_id), {})
        return {d: list(found.get(d, ())) for d in SERIES_DESCRIPTIONS}

    @staticmethod
    def _index(table: pd.DataFrame) -> dict[int, dict[str, list[int]]]:
        out: dict[int, dict[str, list[int]]] = {}
        for study, series, desc in table[["study_id", "series_id", "series_description"]].itertuples(index=False):
            out.setdefault(int(study), {}).setdefault(desc, []).append(int(series))
        return out

    @cached_property
    def _series_index_train(self):
        return self._index(self.train_series)

    @cached_property
    def _series_index_test(self):
        return self._index(self.test_series)

    def validate(self) -> None:
        """Read every table once so a broken layout fails now, naming file and field."""
        self.labels, self.coordinates, self.train_series
        if (self.root / "test_series_descriptions.csv").exists():
            self.test_series
        if not (self.root / "train_images").is_dir():
            raise LayoutError(f"{self.root / 'train_images'}: folder not found")

import pandas as pd
import pytest

from trainer.data.layout import (LABEL_COLUMNS, Layout, LayoutError, read_coordinates, read_labels,
                                 read_series_descriptions)


def test_labels_are_tidy_with_empty_cells_as_minus_one(layout):
    labels = layout.labels
    assert list(labels.columns) == ["study_id", "condition", "level", "severity"]
    assert len(labels) == 25 * len(layout.study_ids)
    assert set(labels["severity"]) <= {-1, 0, 1, 2}
    raw = pd.read_csv(layout.root / "train.csv")
    assert (labels["severity"] == -1).sum() == raw[list(LABEL_COLUMNS)].isna().sum().sum()


def test_coordinates_use_submission_spelling(layout):
    c = layout.coordinates
    assert set(c["level"]) <= {"l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1"}
    assert "spinal_canal_stenosis" in set(c["condition"])


def test_wrong_column_names_the_file_and_column(phantom_copy):
    path = phantom_copy / "train.csv"
    df = pd.read_csv(path).rename(columns={"spinal_canal_stenosis_l1_l2": "scs_l1_l2"})
    df.to_csv(path, index=False)
    with pytest.raises(LayoutError, match=r"train\.csv: missing column\(s\) \['spinal_canal_stenosis_l1_l2'\]"):
        read_labels(path)


def test_wrong_value_names_the_column_value_and_row(phantom_copy):
    path = phantom_copy / "train.csv"
    df = pd.read_csv(path)
    df.loc[1, "left_subarticular_stenosis_l4_l5"] = "Severe-ish"
    df.to_csv(path, index=False)
    with pytest.raises(LayoutError, match=r"'left_subarticular_stenosis_l4_l5' has value 'Severe-ish' \(row 3\)"):
        read_labels(path)


def test_unknown_condition_and_series_description_are_refused(phantom_copy):
    path = phantom_copy / "train_label_coordinates.csv"
    df = pd.read_csv(path)
    df.loc[0, "condition"] = "Spinal Stenosis"
    df.to_csv(path, index=False)
    with pytest.raises(LayoutError, match="'condition' has value 'Spinal Stenosis'"):
        read_coordinates(path)
    sd = phantom_copy / "train_series_descriptions.csv"
    df = pd.read_csv(sd)
    df.loc[0, "series_description"] = "Coronal T1"
    df.to_csv(sd, index=False)
    with pytest.raises(LayoutError, match="series_descriptions.csv: column 'series_description' has value 'Coronal T1'"):
        read_series_descriptions(sd)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(LayoutError, match="data folder not found"):
        Layout(tmp_path / "nope")
    with pytest.raises(LayoutError, match=r"train\.csv: file not found"):
        Layout(tmp_path).validate()

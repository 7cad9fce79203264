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


def test_a_study_twice_in_train_csv_names_both_rows(phantom_copy):
    path = phantom_copy / "train.csv"
    df = pd.read_csv(path)
    pd.concat([df, df.iloc[[3]]]).to_csv(path, index=False)
    with pytest.raises(LayoutError, match=rf"train\.csv: study {df.study_id[3]} has more than one row "
                                          rf"\(rows 5, {len(df) + 2}\)"):
        read_labels(path)


@pytest.mark.parametrize("name", ["train.csv", "train_label_coordinates.csv", "train_series_descriptions.csv"])
def test_a_header_only_table_is_refused(phantom_copy, name):
    path = phantom_copy / name
    pd.read_csv(path).iloc[:0].to_csv(path, index=False)
    with pytest.raises(LayoutError, match=rf"{name.replace('.', '[.]')}: no rows below the header"):
        Layout(phantom_copy).validate()


def test_coordinate_values_name_the_row_that_is_wrong(phantom_copy):
    path = phantom_copy / "train_label_coordinates.csv"
    df = pd.read_csv(path)
    df["x"] = df["x"].astype(object)
    df.loc[5, "x"] = "left"
    df.to_csv(path, index=False)
    with pytest.raises(LayoutError, match=r"column 'x' must hold numbers; row 7 has 'left'"):
        read_coordinates(path)
    df = pd.read_csv(phantom_copy / "train_label_coordinates.csv")
    df["x"] = pd.to_numeric(df["x"].replace("left", 1.0))
    df["instance_number"] = df["instance_number"].astype(float)
    df.loc[48, "instance_number"] = 22.5
    df.to_csv(path, index=False)
    with pytest.raises(LayoutError, match=r"'instance_number' must hold integers; row 50 has 22.5"):
        read_coordinates(path)
    df.loc[48, "instance_number"] = 22.0  # a whole number written as a float is that number
    df.to_csv(path, index=False)
    assert read_coordinates(path)["instance_number"].dtype == "int64"


def test_a_point_given_twice_keeps_the_first_with_a_warning_naming_both_rows(phantom_copy):
    from trainer.data.layout import LayoutWarning

    path = phantom_copy / "train_label_coordinates.csv"
    df = pd.read_csv(path)
    twin = df.iloc[[0, 1]].copy()
    twin.loc[twin.index[0], "x"] += 30  # disagrees with row 2
    pd.concat([df, twin]).to_csv(path, index=False)  # the copy of row 3 is an exact repeat
    with pytest.warns(LayoutWarning, match=rf"1 point\(s\) given twice with different values, the first row kept: "
                                           rf"row {len(df) + 2} .* disagrees with row 2"):
        out = read_coordinates(path)
    assert len(out) == len(df) and out["x"].iloc[0] == df["x"].iloc[0]

"""The metric against hand-computed values (to 1e-9) and sklearn's log_loss."""
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss

from trainer.metric import MetricError, build_solution, score, score_groups


def sol(rows):
    """rows: (row_id, grade 0/1/2)"""
    out = []
    for rid, g in rows:
        oh = [0.0, 0.0, 0.0]
        oh[g] = 1.0
        out.append((rid, *oh, [1.0, 2.0, 4.0][g]))
    return pd.DataFrame(out, columns=["row_id", "normal_mild", "moderate", "severe", "sample_weight"])


def sub(rows):
    return pd.DataFrame(rows, columns=["row_id", "normal_mild", "moderate", "severe"])


def test_spinal_only_by_hand():
    s = sol([("1_spinal_canal_stenosis_l1_l2", 0), ("1_spinal_canal_stenosis_l2_l3", 2)])
    p = sub([("1_spinal_canal_stenosis_l1_l2", 0.7, 0.2, 0.1), ("1_spinal_canal_stenosis_l2_l3", 0.2, 0.3, 0.5)])
    spinal = (1 * -math.log(0.7) + 4 * -math.log(0.5)) / 5
    # any_severe: label 1, weight 4 (the max), prediction max(0.1, 0.5) = 0.5
    any_severe = -math.log(0.5)
    r = score_groups(s, p)
    assert r.covered == ("spinal", "any_severe_spinal")
    assert r.groups["spinal"] == pytest.approx(spinal, abs=1e-12)
    assert r.groups["any_severe_spinal"] == pytest.approx(any_severe, abs=1e-12)
    assert r.score == pytest.approx((spinal + any_severe) / 2, abs=1e-9)


def test_rows_are_normalised_and_left_right_pooled():
    s = sol([("7_left_neural_foraminal_narrowing_l4_l5", 1), ("7_right_neural_foraminal_narrowing_l4_l5", 0),
             ("7_left_subarticular_stenosis_l5_s1", 2)])
    p = sub([("7_left_neural_foraminal_narrowing_l4_l5", 0.1, 0.3, 0.1),   # sums to 0.5 -> 0.6 moderate
             ("7_right_neural_foraminal_narrowing_l4_l5", 0.9, 0.05, 0.05),
             ("7_left_subarticular_stenosis_l5_s1", 0.25, 0.25, 0.5)])
    foraminal = (2 * -math.log(0.6) + 1 * -math.log(0.9)) / 3
    subarticular = -math.log(0.5)
    r = score_groups(s, p)
    assert r.covered == ("foraminal", "subarticular")
    assert r.score == pytest.approx((foraminal + subarticular) / 2, abs=1e-9)


def test_any_severe_uses_max_weight_and_max_prediction_per_study():
    rows = [(f"{st}_spinal_canal_stenosis_{lv}", g) for st, grades in ((1, (0, 1, 0, 0, 0)), (2, (0, 0, 0, 0, 0)))
            for lv, g in zip(("l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1"), grades)]
    s = sol(rows)
    p = sub([(rid, 0.6, 0.3, 0.1) if rid.startswith("1") else (rid, 0.65, 0.3, 0.05) for rid, _ in rows])
    # study 1: no severe -> label 0, weight max(1,2,1,1,1)=2, pred 0.1; study 2: label 0, weight 1, pred 0.05
    expected = (2 * -math.log(0.9) + 1 * -math.log(0.95)) / 3
    assert score_groups(s, p).groups["any_severe_spinal"] == pytest.approx(expected, abs=1e-12)


def test_clipping_of_zero_and_one():
    s = sol([("1_spinal_canal_stenosis_l1_l2", 2)])
    p = sub([("1_spinal_canal_stenosis_l1_l2", 1.0, 0.0, 0.0)])
    r = score_groups(s, p)
    eps = np.finfo(np.float64).eps
    assert r.groups["spinal"] == pytest.approx(-math.log(eps), rel=1e-12)
    assert np.isfinite(r.score)


def test_matches_sklearn_on_random_data():
    rng = np.random.default_rng(0)
    conds = ["spinal_canal_stenosis", "left_neural_foraminal_narrowing", "right_neural_foraminal_narrowing",
             "left_subarticular_stenosis", "right_subarticular_stenosis"]
    levels = ["l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1"]
    rows = [(f"{st}_{c}_{lv}", int(rng.choice(3, p=[0.7, 0.2, 0.1]))) for st in range(100, 140) for c in conds for lv in levels]
    s = sol(rows)
    probs = rng.dirichlet([2, 1, 1], size=len(rows))
    p = sub([(rid, *pr) for (rid, _), pr in zip(rows, probs)])
    r = score_groups(s, p)
    for g, names in (("spinal", conds[:1]), ("foraminal", conds[1:3]), ("subarticular", conds[3:])):
        m = s.row_id.str.contains("|".join(names))
        ref = log_loss(s.loc[m, ["normal_mild", "moderate", "severe"]].to_numpy(), probs[m.to_numpy()],
                       sample_weight=s.loc[m, "sample_weight"])
        assert r.groups[g] == pytest.approx(ref, abs=1e-9)
    assert r.covered == ("spinal", "foraminal", "subarticular", "any_severe_spinal")


def test_rows_are_aligned_by_row_id_and_extra_submission_rows_ignored():
    s = sol([("1_spinal_canal_stenosis_l1_l2", 0), ("1_spinal_canal_stenosis_l2_l3", 1)])
    a = sub([("1_spinal_canal_stenosis_l1_l2", 0.8, 0.1, 0.1), ("1_spinal_canal_stenosis_l2_l3", 0.3, 0.6, 0.1)])
    b = pd.concat([a.iloc[::-1], sub([("1_spinal_canal_stenosis_l3_l4", 0.1, 0.1, 0.8)])])  # unlabelled row
    assert score(s, a) == score(s, b)


def test_errors_name_what_is_wrong():
    s = sol([("1_spinal_canal_stenosis_l1_l2", 0)])
    with pytest.raises(MetricError, match="lacks 1 scored row"):
        score(s, sub([("2_spinal_canal_stenosis_l1_l2", 1, 0, 0)]))
    with pytest.raises(MetricError, match=r"submission lacks column\(s\) \['severe'\]"):
        score(s, pd.DataFrame({"row_id": ["x"], "normal_mild": [1], "moderate": [0]}))
    with pytest.raises(MetricError, match="non-finite"):
        score(s, sub([("1_spinal_canal_stenosis_l1_l2", np.nan, 0, 0)]))


def test_build_solution_from_train_csv(layout):
    full = build_solution(layout)
    labels = layout.labels
    assert len(full) == int((labels.severity >= 0).sum())
    assert set(full.sample_weight) <= {1.0, 2.0, 4.0}
    some = build_solution(layout, layout.study_ids[:2], conditions=["spinal_canal_stenosis"])
    assert len(some) <= 10 and some.row_id.str.contains("spinal_canal_stenosis").all()
    # a perfect submission scores ~0
    perfect = full[["row_id", "normal_mild", "moderate", "severe"]]
    assert score(full, perfect) < 1e-6


def _host_log_loss(y_true: np.ndarray, y_pred: np.ndarray, w: np.ndarray) -> float:
    """scikit-learn's log_loss as the host ran it in 2024 (<= 1.4): a 1-D y_pred is the positive
    class's probability; clip to [eps, 1 - eps], then normalise each row, then the weighted mean."""
    y_pred = np.asarray(y_pred, dtype=np.float64)
    if y_pred.ndim == 1:
        y_pred = np.stack([1 - y_pred, y_pred], axis=1)
        y_true = np.stack([1 - y_true, y_true], axis=1)
    eps = np.finfo(np.float64).eps
    y_pred = np.clip(y_pred, eps, 1 - eps)
    y_pred = y_pred / y_pred.sum(axis=1, keepdims=True)
    return float(np.average(-(y_true * np.log(y_pred)).sum(axis=1), weights=w))


def _host_score(solution: pd.DataFrame, submission: pd.DataFrame) -> float:
    """The host's metric, written as its published code is: condition losses on the rows as
    submitted (log_loss normalises them), any_severe_spinal from the submitted `severe` values."""
    cols = ["normal_mild", "moderate", "severe"]
    s = solution.set_index("row_id")
    p = submission.set_index("row_id").loc[s.index]
    cond = s.index.str.split("_", n=1).str[1].str.rsplit("_", n=2).str[0]
    group = np.where(cond.str.contains("spinal"), "spinal", np.where(cond.str.contains("foraminal"), "foraminal",
                                                                      "subarticular"))
    losses = [_host_log_loss(s.loc[group == g, cols].to_numpy(), p.loc[group == g, cols].to_numpy(),
                             s.loc[group == g, "sample_weight"].to_numpy()) for g in ("spinal", "foraminal", "subarticular")]
    study = s.index.str.split("_").str[0]
    m = group == "spinal"
    per = pd.DataFrame({"study": study[m], "y": s.loc[m, "severe"].to_numpy(), "w": s.loc[m, "sample_weight"].to_numpy(),
                        "p": p.loc[m, "severe"].to_numpy()}).groupby("study").max()
    losses.append(_host_log_loss(per["y"].to_numpy(), per["p"].to_numpy(), per["w"].to_numpy()))
    return float(np.mean(losses))


@pytest.mark.parametrize("severe_scale,row_scale", [(1.0, 1.0), (1.7, 1.0), (3.0, 2.5), (0.4, 0.3)])
def test_unnormalised_submission_scores_as_the_host_does(severe_scale, row_scale):
    """A post-processed submission (`severe` scaled without renormalising, rows scaled): the
    condition groups see normalised rows, any_severe_spinal the severe values as submitted."""
    rng = np.random.default_rng(1)
    conds = ["spinal_canal_stenosis", "left_neural_foraminal_narrowing", "right_neural_foraminal_narrowing",
             "left_subarticular_stenosis", "right_subarticular_stenosis"]
    levels = ["l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1"]
    rows = [(f"{st}_{c}_{lv}", int(rng.choice(3, p=[0.6, 0.25, 0.15]))) for st in range(200, 230)
            for c in conds for lv in levels]
    s = sol(rows)
    probs = rng.dirichlet([2, 1, 1], size=len(rows)) * row_scale
    probs[:, 2] *= severe_scale
    p = sub([(rid, *pr) for (rid, _), pr in zip(rows, probs)])
    r = score_groups(s, p)
    assert r.score == pytest.approx(_host_score(s, p), abs=1e-12)
    if severe_scale * row_scale != 1.0:  # the any_severe loss depends on the raw values: not row-invariant
        normalised = p.copy()
        normalised[["normal_mild", "moderate", "severe"]] = probs / probs.sum(1, keepdims=True)
        assert score_groups(s, normalised).groups["any_severe_spinal"] != pytest.approx(
            r.groups["any_severe_spinal"], abs=1e-6)



def test_values_above_one_are_clipped_before_rows_are_normalised():
    """As scikit-learn's log_loss did for the host: (2, 6, 2) is clipped to (1, 1, 1), then a third each."""
    s = sol([("7_left_neural_foraminal_narrowing_l4_l5", 1)])
    r = score_groups(s, sub([("7_left_neural_foraminal_narrowing_l4_l5", 2.0, 6.0, 2.0)]))
    assert r.groups["foraminal"] == pytest.approx(math.log(3), abs=1e-12)

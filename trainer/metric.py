"""The RSNA 2024 host metric (version 10), on DataFrames in the Kaggle form.

- solution: ``row_id, normal_mild, moderate, severe, sample_weight`` (one-hot truth; weight 1 / 2 / 4
  for a true Normal/Mild / Moderate / Severe); rows whose label is empty are absent (not scored).
- submission: ``row_id, normal_mild, moderate, severe``.

Exactly as the host computes it, with the scikit-learn `log_loss` of the competition (2024: clip
to [eps, 1 - eps], then normalise rows), unnormalised submissions included. Groups: ``spinal``,
``foraminal`` (left and right pooled), ``subarticular`` (pooled); each a weighted log loss
``sum(w * -log p_true) / sum(w)`` of the clipped and row-normalised predictions.
``any_severe_spinal``: per study, label 1 if any spinal level is Severe, weight = the largest
sample_weight of its spinal rows, prediction = the largest ``severe`` value *as submitted* (not
normalised: a post-processed submission that scales ``severe`` up scores as on the leaderboard),
clipped to [eps, 1 - eps]; weighted binary log loss. The score is the plain mean of the losses of
the groups the solution covers (``any_severe_spinal`` counts when ``spinal`` does).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .data.layout import CONDITIONS, GROUP_OF_CONDITION, LEVELS, TARGET_COLUMNS, Layout, parse_row_ids, row_id
from .errors import UserError

EPS = np.finfo(np.float64).eps  # sklearn's log_loss clip
SAMPLE_WEIGHTS = np.array([1.0, 2.0, 4.0])
GROUPS = ("spinal", "foraminal", "subarticular", "any_severe_spinal")


class MetricError(UserError):
    """Solution and submission do not fit together; the message names the rows or columns."""


@dataclass(frozen=True)
class ScoreResult:
    """A host-metric score with its parts: `score` is the plain mean of the ``groups`` losses (lower
    is better); ``covered`` names the groups the solution had rows for, in `GROUPS` order."""

    score: float
    groups: dict[str, float]  # the losses of the covered groups
    covered: tuple[str, ...]

    def __str__(self) -> str:
        parts = ", ".join(f"{g} {v:.4f}" for g, v in self.groups.items())
        return f"{self.score:.4f} ({parts})"


def score_groups(solution: pd.DataFrame, submission: pd.DataFrame) -> ScoreResult:
    """The host metric with its parts. Submission rows without a solution row are ignored (empty
    labels); solution rows missing from the submission are an error."""
    cols = list(TARGET_COLUMNS)
    for name, df, need in (("solution", solution, cols + ["row_id", "sample_weight"]),
                           ("submission", submission, cols + ["row_id"])):
        missing = [c for c in need if c not in df.columns]
        if missing:
            raise MetricError(f"{name} lacks column(s) {missing}")
    if solution["row_id"].duplicated().any():
        raise MetricError(f"solution has duplicated row_id {solution['row_id'][solution['row_id'].duplicated()].iloc[0]}")
    if submission["row_id"].duplicated().any():
        raise MetricError(f"submission has duplicated row_id {submission['row_id'][submission['row_id'].duplicated()].iloc[0]}")
    if len(solution) == 0:
        raise MetricError("solution has no rows to score")
    values = submission[cols].to_numpy(dtype=np.float64)
    if not np.isfinite(values).all() or (values < 0).any():
        bad = ~np.isfinite(values).all(axis=1) | (values < 0).any(axis=1)
        raise MetricError(f"submission has negative or non-finite probabilities, e.g. row_id "
                          f"{submission['row_id'][bad].iloc[0]}")
    merged = solution.merge(submission, on="row_id", how="left", suffixes=("", "_pred"))
    pred_cols = [c + "_pred" for c in cols]
    absent = merged[pred_cols].isna().any(axis=1)
    if absent.any():
        raise MetricError(f"submission lacks {int(absent.sum())} scored row(s), e.g. {merged.loc[absent, 'row_id'].iloc[0]}")
    raw = merged[pred_cols].to_numpy(dtype=np.float64)
    pred = np.clip(raw, EPS, 1 - EPS)
    pred = pred / pred.sum(axis=1, keepdims=True)
    truth = merged[cols].to_numpy(dtype=np.float64)
    weight = merged["sample_weight"].to_numpy(dtype=np.float64)
    parsed = parse_row_ids(merged["row_id"])
    group = parsed["condition"].map(GROUP_OF_CONDITION)
    if group.isna().any():
        raise MetricError(f"row_id {merged.loc[group.isna(), 'row_id'].iloc[0]!r} names no known condition")
    row_loss = -(truth * np.log(pred)).sum(axis=1)

    losses: dict[str, float] = {}
    for g in ("spinal", "foraminal", "subarticular"):
        m = (group == g).to_numpy()
        if m.any():
            losses[g] = float((weight[m] * row_loss[m]).sum() / weight[m].sum())
    if "spinal" in losses:
        m = (group == "spinal").to_numpy()
        study = parsed.loc[m, "study_id"].to_numpy()
        spinal = pd.DataFrame({"study": study, "label": truth[m, 2], "weight": weight[m], "p": raw[m, 2]})
        per_study = spinal.groupby("study").agg(label=("label", "max"), weight=("weight", "max"), p=("p", "max"))
        y, w, p = (per_study[c].to_numpy() for c in ("label", "weight", "p"))
        p = np.clip(p, EPS, 1 - EPS)
        losses["any_severe_spinal"] = float((w * -(y * np.log(p) + (1 - y) * np.log(1 - p))).sum() / w.sum())
    covered = tuple(g for g in GROUPS if g in losses)
    return ScoreResult(float(np.mean([losses[g] for g in covered])), {g: losses[g] for g in covered}, covered)


def score(solution: pd.DataFrame, submission: pd.DataFrame) -> float:
    """The RSNA 2024 score (lower is better)."""
    return score_groups(solution, submission).score


def build_solution(layout_or_labels, study_ids=None, conditions=CONDITIONS) -> pd.DataFrame:
    """The solution frame from train.csv for some studies (all by default), empty labels left out."""
    labels = layout_or_labels.labels if isinstance(layout_or_labels, Layout) else layout_or_labels
    if study_ids is not None:
        labels = labels[labels["study_id"].isin(set(int(s) for s in study_ids))]
    labels = labels[labels["condition"].isin(conditions) & (labels["severity"] >= 0)]
    sev = labels["severity"].to_numpy()
    onehot = np.eye(3)[sev]
    out = pd.DataFrame({
        "row_id": [row_id(s, c, lv) for s, c, lv in labels[["study_id", "condition", "level"]].itertuples(index=False)],
        "normal_mild": onehot[:, 0], "moderate": onehot[:, 1], "severe": onehot[:, 2],
        "sample_weight": SAMPLE_WEIGHTS[sev],
    })
    return out.sort_values("row_id", ignore_index=True)


def class_prior(labels: pd.DataFrame, conditions=CONDITIONS) -> dict[str, np.ndarray]:
    """Per condition, the frequencies of the three grades in `labels` (train.csv's long form),
    add-one smoothed so that no grade is impossible: the baseline every score is compared with,
    and the fallback prediction of a condition no model covers."""
    labels = labels[labels["severity"] >= 0]
    out = {}
    for cond in conditions:
        counts = np.bincount(labels.loc[labels["condition"] == cond, "severity"], minlength=3).astype(float)
        out[cond] = (counts + 1) / (counts.sum() + 3)
    return out


def predictions_frame(study_ids, levels, probs: np.ndarray, conditions=CONDITIONS) -> pd.DataFrame:
    """Kaggle-form rows from per-sample probabilities ``[N, len(conditions), 3]``."""
    rows = []
    for sid, lv, p in zip(study_ids, levels, probs):
        level = LEVELS[lv] if isinstance(lv, (int, np.integer)) else lv
        for c, cond in enumerate(conditions):
            rows.append((row_id(int(sid), cond, level), *map(float, p[c])))
    return pd.DataFrame(rows, columns=["row_id", *TARGET_COLUMNS])

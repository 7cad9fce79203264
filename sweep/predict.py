"""Predict: every member of an ensemble on the test studies (`trainer.infer`), combined with the
ensemble's weights, rows the ensemble does not cover filled with the training label frequencies,
written in the exact ``sample_submission.csv`` form. A member that could not build a row's crop
(a series missing or unreadable, no slice near the point) answers it with its training label
frequencies (its ``fallback`` column says why): one line per such study says what was missing
and what was done, and the result counts the rows. Crops are cut around a localiser's points
(`sweep.localize`), computed once and shared by every member."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from trainer.errors import UserError
from trainer.metric import TARGET_COLUMNS, class_prior

from .ensemble import combine, ensemble_weights, members
from . import artifacts as names
from .localize import GUESS, GUESS_COST, check_device
from .promote import PromoteError
from .tracking import Tracker


def check_ready(tracking_uri: str, name: str = "default", device: str = "cpu") -> list:
    """What `predict` checks before it reads any data or fetches any model: the device exists on
    this machine and the ensemble `name` has members. Returns the members (`ensemble.members`,
    without their frames).

    Raises:
        UserError: a device this machine lacks; PromoteError: no such ensemble, or no member yet;
        TrackingError: the tracking store does not exist or does not answer."""
    check_device(device)
    return members(tracking_uri, name, with_frames=False)


def predict(data_dir: str, out: str | Path, tracking_uri: str, name: str = "default", device: str = "cpu",
            log=print, localizer: str | None = None) -> dict[str, Any]:
    """Write the ensemble `name`'s submission for the test studies of `data_dir` to `out` (the
    ``sample_submission.csv`` form: ``row_id, normal_mild, moderate, severe``, 25 rows a study).
    `localizer` names where the crops are cut (`sweep.localize`: ``models:/...``, ``prior``, a
    checkpoint, ``runs:/ID``, ``best``, ``study:NAME``); None: the promoted localiser
    (``models:/spinesweep-localizer@champion``) when registered, else the best trial of the
    ``localizer`` study when there is one, else the mean-position guess, with one warning that
    says what the guess costs.

    Returns: path, rows, studies, members, weights, the conditions no member covers
    (``filled_with_label_prior``), the rows and studies that fell back to label frequencies, and
    which points were used (``points``).
    Raises:
        PromoteError: the ensemble has no members, or the folder lists no test study.
        UserError: an explicitly named localiser cannot be found.
    """
    from trainer.data.layout import CONDITIONS, LEVELS, Layout, parse_row_ids, row_id
    from trainer.infer import LevelPrior, PointTable, predict_studies
    from trainer.points.locate import localize

    from .localize import point_source

    ms = check_ready(tracking_uri, name, device)
    weights = ensemble_weights(tracking_uri, name, ms)
    layout = Layout(Path(data_dir))
    study_ids = sorted(layout.test_series["study_id"].unique().tolist())
    if not study_ids:
        raise PromoteError(f"{data_dir}: test_series_descriptions.csv lists no study")
    try:
        source, what = point_source(localizer, data_dir, tracking_uri, device)
    except UserError as e:  # none promoted, no localiser study, or none of its trials complete
        if localizer is not None:
            raise
        log(f"predict: WARNING no localiser ({e}); points placed by the mean-position guess: {GUESS_COST}")
        source, what = LevelPrior.fit(layout), GUESS
    log(f"predict: points placed by {what}")
    tmp_points = Path(tempfile.mkdtemp(prefix="spinesweep-points-")) / "points.csv"
    if isinstance(source, LevelPrior):  # members told so: a model's own default would look for a localiser
        prior, points_param = source, {"localizer": "prior"}
    else:  # computed once, shared by every member (pyfunc members read the file)
        localize(source, data_dir, "test", study_ids).to_csv(tmp_points, index=False)
        prior, points_param = PointTable.from_csv(tmp_points), {"points": str(tmp_points)}
    tracker = Tracker(tracking_uri)
    frames, used, fallbacks = [], [], []
    for m, w in zip(ms, weights):
        if w <= 0:
            log(f"predict: {m.label} has weight 0 in the ensemble: skipped")
            continue
        used.append(w)
        if m.source.rstrip("/").endswith("/model"):  # a pyfunc model, loaded through the registry
            uri = f"models:/{m.model}@trial_{m.trial}"
            log(f"predict: {m.label} ({uri}) on {len(study_ids)} test studies")
            model = tracker.load_model(uri)
            frames.append(model.predict(pd.DataFrame({"data_dir": [str(Path(data_dir).resolve())] * len(study_ids),
                                                      "study_id": study_ids}),
                                        params={"device": device, **_known_params(model, points_param)}))
            fallbacks.append(_fallback_rows(frames[-1], m.label))
            continue
        # a version promoted before models were logged: its checkpoints, as they were stored
        tmp = Path(tempfile.mkdtemp(prefix="spinesweep-predict-"))
        ckpts = [tracker.download(m.run_id, n, tmp) for n in tracker.list_artifacts(m.run_id, names.PROMOTED)
                 if n.endswith(".pt")]
        log(f"predict: {m.label} on {len(study_ids)} test studies ({len(ckpts)} fold checkpoints)")
        frames.append(predict_studies(ckpts, data_dir, study_ids, prior=prior, device=device))
        fallbacks.append(_fallback_rows(frames[-1], m.label))
        shutil.rmtree(tmp, ignore_errors=True)
    fell_back = pd.concat(fallbacks, ignore_index=True) if fallbacks else pd.DataFrame(columns=["row_id"])
    for line in fallback_lines(fell_back):
        log(line)
    pred = combine(frames, np.asarray(used)).set_index("row_id")
    fallback = class_prior(layout.labels)
    sample = layout.root / "sample_submission.csv"
    ids = [row_id(s, c, lv) for s in study_ids for c in CONDITIONS for lv in LEVELS]
    if sample.exists():
        listed = pd.read_csv(sample)["row_id"].tolist()
        if set(listed) == set(ids):
            ids = listed  # the exact order of the sample
    rows, filled = [], set()
    for rid, cond in zip(ids, parse_row_ids(ids)["condition"]):
        if rid in pred.index:
            rows.append([rid, *pred.loc[rid, list(TARGET_COLUMNS)].to_numpy(dtype=float)])
        else:
            filled.add(cond)
            rows.append([rid, *fallback[cond]])
    sub = pd.DataFrame(rows, columns=["row_id", *TARGET_COLUMNS])
    vals = sub[list(TARGET_COLUMNS)].to_numpy()
    vals = np.clip(np.nan_to_num(vals, nan=1.0 / 3), 1e-7, 1.0)
    sub[list(TARGET_COLUMNS)] = vals / vals.sum(1, keepdims=True)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sub.to_csv(out, index=False)
    shutil.rmtree(tmp_points.parent, ignore_errors=True)
    return {"path": str(out), "rows": len(sub), "studies": len(study_ids), "members": [m.label for m in ms],
            "weights": weights, "filled_with_label_prior": sorted(filled), "points": what,
            "fallback_rows": int(sub["row_id"].isin(set(fell_back["row_id"])).sum()),
            "fallback_studies": sorted({int(r.split("_")[0]) for r in fell_back["row_id"]})}


def _known_params(model, params: dict) -> dict:
    """The `params` a loaded pyfunc's signature declares (a model registered before the
    ``localizer`` param existed takes the guess by default anyway; MLflow would warn about the rest)."""
    sig = model.metadata.signature
    known = {p.name for p in sig.params.params} if sig is not None and sig.params is not None else set(params)
    return {k: v for k, v in params.items() if k in known}


def _fallback_rows(frame: pd.DataFrame, member: str) -> pd.DataFrame:
    """The rows a member answered with its training label frequencies (row_id, member, why).
    Models registered before the ``fallback`` column existed have none to report."""
    if "fallback" not in frame.columns:
        return pd.DataFrame(columns=["row_id", "member", "why"])
    hit = frame[frame["fallback"].fillna("").astype(str) != ""]
    return pd.DataFrame({"row_id": hit["row_id"].to_numpy(), "member": member, "why": hit["fallback"].to_numpy()})


def fallback_lines(rows: pd.DataFrame) -> list[str]:
    """One line per test study with fallback rows: what was missing (each distinct reason, its
    conditions and levels) and what was done."""
    from trainer.data.layout import parse_row_ids

    if rows.empty:
        return []
    parsed = parse_row_ids(rows["row_id"]).reset_index(drop=True)
    rows = rows.reset_index(drop=True).assign(study=parsed["study_id"].astype(int), condition=parsed["condition"],
                                              level=parsed["level"])
    lines = []
    for study, g in rows.groupby("study", sort=True):
        parts = []
        for why, h in g.groupby("why", sort=False):
            conds = ", ".join(dict.fromkeys(h["condition"]))
            levels = sorted(set(h["level"]))
            where = "all 5 levels" if len(levels) == 5 else ", ".join(levels)
            parts.append(f"{why}: {conds} at {where}")
        lines.append(f"predict: study {study}: " + "; ".join(parts) + f" -> {g['row_id'].nunique()} rows given the "
                     "training label frequencies (no crop to show the model)")
    return lines

"""Predict: every member of an ensemble on the test studies (`trainer.infer`), combined with the
ensemble's weights, rows the ensemble does not cover filled with the training label frequencies,
written in the exact ``sample_submission.csv`` form."""
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
from .promote import PromoteError
from .tracking import Tracker


GUESS_COST = ("the mean-position guess misses the labelled sagittal points by a median 1.4 disc spacings on "
              "the real training set (1.2 on the phantom), so most crops miss their level and the classifier "
              "scores near its class prior (issue 20: 0.925 against 0.459 with labelled points)")


def predict(data_dir: str, out: str | Path, tracking_uri: str, name: str = "default", device: str = "cpu",
            log=print, localizer: str | None = None) -> dict[str, Any]:
    """Write the ensemble's submission for the test studies of `data_dir` to `out`. `localizer`
    names where the crops are cut (`sweep.localize`: ``prior``, a checkpoint, ``runs:/ID``,
    ``best``); None: the best trial of the ``localizer`` study when there is one, else the
    mean-position guess, with one warning that says what the guess costs."""
    from trainer.data.layout import CONDITIONS, LEVELS, Layout, parse_row_ids, row_id
    from trainer.infer import LevelPrior, PointTable, predict_studies
    from trainer.points.locate import localize

    from .localize import point_source

    ms = members(tracking_uri, name, with_frames=False)
    if not ms:
        raise PromoteError(f"ensemble {name!r} has no members: promote a trial first (optuna-run promote SPACE)")
    weights = ensemble_weights(tracking_uri, name, ms)
    layout = Layout(Path(data_dir))
    study_ids = sorted(layout.test_series["study_id"].unique().tolist())
    if not study_ids:
        raise PromoteError(f"{data_dir}: test_series_descriptions.csv lists no study")
    try:
        source, what = point_source(localizer, data_dir, tracking_uri, device)
    except UserError as e:  # no localiser study, or none of its trials complete
        if localizer is not None:
            raise
        log(f"predict: WARNING no localiser ({e}); points placed by the mean-position guess: {GUESS_COST}")
        source, what = LevelPrior.fit(layout), "the mean-position guess (LevelPrior)"
    log(f"predict: points placed by {what}")
    tmp_points = Path(tempfile.mkdtemp(prefix="spinesweep-points-")) / "points.csv"
    if isinstance(source, LevelPrior):
        prior, points_param = source, {}
    else:  # computed once, shared by every member (pyfunc members read the file)
        localize(source, data_dir, "test", study_ids).to_csv(tmp_points, index=False)
        prior, points_param = PointTable.from_csv(tmp_points), {"points": str(tmp_points)}
    tracker = Tracker(tracking_uri)
    frames, used = [], []
    for m, w in zip(ms, weights):
        if w <= 0:
            log(f"predict: {m.label} has weight 0 in the ensemble: skipped")
            continue
        used.append(w)
        if m.source.rstrip("/").endswith("/model"):  # a pyfunc model, loaded through the registry
            import mlflow.pyfunc

            uri = f"models:/{m.model}@trial_{m.trial}"
            log(f"predict: {m.label} ({uri}) on {len(study_ids)} test studies")
            mlflow.set_tracking_uri(tracking_uri)
            model = mlflow.pyfunc.load_model(uri)
            frames.append(model.predict(pd.DataFrame({"data_dir": [str(Path(data_dir).resolve())] * len(study_ids),
                                                      "study_id": study_ids}), params={"device": device, **points_param}))
            continue
        # a version promoted before models were logged: its checkpoints, as they were stored
        tmp = Path(tempfile.mkdtemp(prefix="spinesweep-predict-"))
        ckpts = [tracker.download(m.run_id, n, tmp) for n in tracker.list_artifacts(m.run_id, "promoted")
                 if n.endswith(".pt")]
        log(f"predict: {m.label} on {len(study_ids)} test studies ({len(ckpts)} fold checkpoints)")
        frames.append(predict_studies(ckpts, data_dir, study_ids, prior=prior, device=device))
        shutil.rmtree(tmp, ignore_errors=True)
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
            "weights": weights, "filled_with_label_prior": sorted(filled), "points": what}

"""Points for studies that have none: a trained localiser (or the mean-position guess) found by
name, written in the ``train_label_coordinates.csv`` form (`optuna-run localize`), and the point
source `predict` crops around (`--localizer`).

A localiser is named by
- ``prior``: the mean-position guess (`trainer.infer.LevelPrior`; sagittal points only, the axial
  crops then fall back to the canal point carried to the nearest axial slice);
- a checkpoint file or a folder of them (a localiser trial's ``checkpoint*.pt``, one per fold;
  several are averaged);
- ``runs:/RUN_ID``: the checkpoints a localiser trial logged to MLflow;
- ``best`` (``study:NAME`` for another study than ``localizer``): the best complete trial of a
  localiser study in MLflow.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from trainer.errors import UserError

from .tracking import Tracker

DEFAULT_STUDY = "localizer"


def best_localizer_run(tracking_uri: str, study: str = DEFAULT_STUDY) -> str:
    """The run id of the best complete trial of a localiser study (lowest score). Raises
    UserError when the study has no MLflow experiment or no complete trial."""
    tracker = Tracker(tracking_uri)
    exp = tracker.get_experiment(study)
    if exp is None:
        raise UserError(f"no localiser study {study!r} in MLflow ({tracking_uri}): run `optuna-run localizer "
                        f"--n-trials 3` first, or pass --model (a checkpoint, runs:/RUN_ID, or prior)")
    runs = tracker.search_runs([exp.experiment_id], "tags.trial != '' and attributes.status = 'FINISHED' "
                               "and params.task = 'localize'", order_by=["metrics.score ASC"], max_results=1)
    if not runs:
        raise UserError(f"localiser study {study!r} has no complete trial")
    return runs[0].info.run_id


def run_checkpoints(tracking_uri: str, run_id: str, dst: Path) -> list[Path]:
    """Download a localiser run's fold checkpoints into `dst`; raises UserError when it has none."""
    tracker = Tracker(tracking_uri)
    names = [n for n in tracker.list_artifacts(run_id) if n.rsplit("/", 1)[-1].startswith("checkpoint")
             and n.endswith(".pt")]
    if not names:
        raise UserError(f"run {run_id} logged no checkpoint*.pt artifact: not a localiser trial")
    return [tracker.download(run_id, n, dst) for n in names]


def point_source(spec: str | None, data_dir: str | Path, tracking_uri: str, device: str = "cpu") -> tuple[Any, str]:
    """(point source for `trainer.infer.predict_studies` / `trainer.points.locate.localize`, a
    description of it) from a localiser name (module doc); None means ``best``."""
    from trainer.data.layout import Layout
    from trainer.points.locate import Localizer, load_point_source

    spec = spec or "best"
    if spec == "prior" or Path(spec).exists():
        try:
            return load_point_source(spec, Layout(Path(data_dir)), device), (
                "the mean-position guess (LevelPrior)" if spec == "prior" else f"localiser {spec}")
        except ValueError as e:
            raise UserError(str(e)) from None
    if spec == "best" or spec.startswith("study:"):
        study = DEFAULT_STUDY if spec == "best" else spec.split(":", 1)[1]
        run_id = best_localizer_run(tracking_uri, study)
        what = f"localiser: best trial of study {study!r} (run {run_id})"
    elif spec.startswith("runs:/"):
        run_id = spec[len("runs:/"):].strip("/").split("/")[0]
        what = f"localiser run {run_id}"
    else:
        raise UserError(f"localiser {spec!r}: expected prior, best, study:NAME, runs:/RUN_ID, or a checkpoint "
                        "file or folder that exists")
    tmp = Path(tempfile.mkdtemp(prefix="spinesweep-localizer-"))
    try:
        return Localizer.from_checkpoints(run_checkpoints(tracking_uri, run_id, tmp), device), what
    except ValueError as e:
        raise UserError(f"{what}: {e}") from None


def localize_to_csv(data_dir: str | Path, out: str | Path, tracking_uri: str, model: str | None = None,
                    split: str = "test", device: str = "cpu") -> dict[str, Any]:
    """Write the points of every study of `split` as ``train_label_coordinates.csv`` rows to `out`;
    returns what was written (path, studies, rows, the localiser used)."""
    from trainer.points.locate import localize

    source, what = point_source(model, data_dir, tracking_uri, device)
    rows = localize(source, data_dir, split)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows.to_csv(out, index=False)
    return {"path": str(out), "studies": int(rows["study_id"].nunique()), "rows": len(rows), "localizer": what,
            "split": split}

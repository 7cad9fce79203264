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

A localiser's out-of-fold points (what a classifier study with ``data.val_points: oof`` crops its
validation studies around) are found by `oof_points_file`, the one place a ``runs:/`` or
``models:/`` URI becomes a local ``train_label_coordinates.csv``-form file.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from trainer.errors import UserError

from . import artifacts as names

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


OOF_POINTS = "oof_coordinates"  # a localiser fold's OOF points: oof_coordinates_fold<k>.csv (trainer/points/fit.py)
URI_SCHEMES = ("runs:/", "models:/")


def is_points_uri(value: str) -> bool:
    """True for a ``runs:/`` or ``models:/`` URI (what `oof_points_file` resolves), False for a path."""
    return str(value).startswith(URI_SCHEMES)


def _oof_artifacts(tracker: Tracker, run_id: str) -> list[str]:
    """A localiser run's out-of-fold point files (``oof_coordinates*.csv`` or ``oof_points*.csv``):
    those of a promotion (under ``promoted/``, at any depth of it: every fold) when there are some,
    else the trial's own ``oof_coordinates_fold<k>.csv`` (the folds it was evaluated on)."""
    def is_points(path: str) -> bool:
        base = path.rsplit("/", 1)[-1]
        return base.startswith((OOF_POINTS, "oof_points")) and base.endswith(".csv")

    top = tracker.list_artifacts(run_id)
    promoted, folders = [], [a for a in top if a == names.PROMOTED]
    while folders:  # promoted/ and below: a registered localiser's points file, wherever promotion put it
        folder = folders.pop()
        for a in tracker.list_artifacts(run_id, folder):
            if is_points(a):
                promoted.append(a)
            elif "." not in a.rsplit("/", 1)[-1] and a.count("/") < 4:
                folders.append(a)
    return sorted(promoted) or sorted(a for a in top if is_points(a))


def model_version_run(tracking_uri: str, uri: str) -> str:
    """The run id of a registered model version named by ``models:/NAME/VERSION`` or
    ``models:/NAME@ALIAS``. Raises UserError when the registry has no such version."""
    tracker = Tracker(tracking_uri)
    ref = uri[len("models:/"):].strip("/")
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            version = tracker.client.get_model_version_by_alias(name, alias)
        elif "/" in ref:
            name, number = ref.rsplit("/", 1)
            version = tracker.client.get_model_version(name, number)
        else:
            raise UserError(f"{uri}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{uri}: no such model version in the registry ({tracking_uri}): {str(e)[:200]}") from None
    if not version.run_id:
        raise UserError(f"{uri}: the model version has no run (registered outside spinesweep?)")
    return version.run_id


def oof_points_file(uri: str, tracking_uri: str, dst: str | Path) -> Path:
    """A local ``train_label_coordinates.csv``-form file of a localiser's out-of-fold points, for
    ``data.val_points_file``. `uri` is
    - a path: returned as it is (the trainer reads and checks it);
    - ``runs:/RUN_ID``: a localiser trial's run: its ``oof_coordinates_fold<k>.csv`` (one per fold
      it was evaluated on), or those its promotion logged under ``promoted/``;
    - ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``: a registered localiser version: the same
      files of the version's run.
    The files are joined into ``dst/oof_points_<run id>.csv`` (written once: a second call with the
    same run reuses it). Every point of an out-of-fold file comes from a localiser that never
    trained on its study, whichever fold each study sat in.

    Raises:
        UserError: an unknown scheme, no such run or version, or a run with no out-of-fold points
            (not a localiser trial)."""
    import pandas as pd

    uri = str(uri)
    if not is_points_uri(uri):
        if "://" in uri:
            raise UserError(f"data.val_points_file: {uri!r}: expected a local CSV, runs:/RUN_ID or models:/NAME/VERSION")
        return Path(uri)
    run_id = (model_version_run(tracking_uri, uri) if uri.startswith("models:/")
              else uri[len("runs:/"):].strip("/").split("/")[0])
    if not run_id:
        raise UserError(f"data.val_points_file: {uri!r}: no run id")
    dst = Path(dst)
    out = dst / f"oof_points_{run_id}.csv"
    if out.exists():
        return out
    tracker = Tracker(tracking_uri)
    try:
        found = _oof_artifacts(tracker, run_id)
    except Exception as e:
        raise UserError(f"data.val_points_file: {uri}: run {run_id} cannot be read ({str(e)[:200]})") from None
    if not found:
        raise UserError(f"data.val_points_file: {uri}: run {run_id} logged no {OOF_POINTS}*.csv: not a localiser "
                        "trial (optuna-run localizer), or one made before localiser trials logged their points")
    tmp = Path(tempfile.mkdtemp(prefix="spinesweep-oof-points-", dir=_mkdir(dst)))
    try:
        frames = [pd.read_csv(tracker.download(run_id, name, tmp)) for name in found]
        points = pd.concat(frames, ignore_index=True).drop_duplicates(
            ["study_id", "series_id", "condition", "level"], keep="first")
        part = tmp / out.name
        points.to_csv(part, index=False)
        part.replace(out)  # atomic: a concurrent launcher never reads half a file
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def local_val_points(cfg, run, tracking_uri: str):
    """`cfg` (a logged run's config) ready to train here: a run scored on a localiser's out-of-fold
    points (``data.val_points: oof``) whose file came from MLflow (its ``val_points_source`` tag)
    and is not on this machine gets the same URI downloaded again (`oof_points_file`), so
    `reproduce` and `promote` score on the same localiser's points. Other configs come back as they are."""
    from trainer.data.cache import default_cache_dir

    source = run.data.tags.get("val_points_source")
    if cfg.data.val_points != "oof" or not source or Path(cfg.data.val_points_file).is_file():
        return cfg
    local = oof_points_file(source, tracking_uri, default_cache_dir(cfg.data.cache_dir) / "val_points")
    return cfg.with_overrides({"data.val_points_file": str(local)})

"""Points for studies that have none: a trained localiser (or the mean-position guess) found by
name, written in the ``train_label_coordinates.csv`` form (`optuna-run localize`), and the point
source `predict` and the registered classifier crop around (`--localizer`, the pyfunc's `localizer`).

A localiser is named by
- ``prior``: the mean-position guess (`trainer.infer.LevelPrior`; sagittal points only, the axial
  crops then fall back to the canal point carried to the nearest axial slice);
- ``models:/spinesweep-localizer@champion`` (any ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``
  of a localiser version): a promoted localiser (`optuna-run promote localizer`), its fold
  checkpoints from the Model Registry; ``champion`` is the newest one promoted;
- a checkpoint file or a folder of them (a localiser trial's ``checkpoint*.pt``, one per fold;
  several are averaged);
- ``runs:/RUN_ID``: the checkpoints a localiser trial logged to MLflow;
- ``best`` (``study:NAME`` for another study than ``localizer``): the best complete trial of a
  localiser study in MLflow.

No name (None) means the promoted localiser when the registry has one, else ``best``; `predict`
then falls back to the guess with one warning (`GUESS_COST`).

A localiser's out-of-fold points (what a classifier study with ``data.val_points: oof`` crops its
validation studies around) are found by `oof_points_file`, the one place a ``runs:/`` or
``models:/`` URI becomes a local ``train_label_coordinates.csv``-form file.
"""
from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from trainer.errors import UserError

from . import artifacts as names
from .tracking import Tracker, redact

DEFAULT_STUDY = "localizer"
LOCALIZER_MODEL = "spinesweep-localizer"  # the registered model of every promoted localiser, whatever its study
CHAMPION = "champion"  # its alias: the newest promoted version
CHAMPION_URI = f"models:/{LOCALIZER_MODEL}@{CHAMPION}"
GUESS = "the mean-position guess (LevelPrior)"
GUESS_COST = ("the mean-position guess misses the labelled sagittal points by a median 1.4 disc spacings on "
              "the real training set (1.2 on the phantom), so most crops miss their level and the classifier "
              "scores near or beyond its class prior (README, Localisation: 1.28 on the guess against 0.54 on "
              "labelled points and 0.54 on a localiser's)")
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w\-]+)|/(?P<version>\d+))/?$")


def best_localizer_run(tracking_uri: str, study: str = DEFAULT_STUDY) -> str:
    """The run id of the best complete trial of a localiser study (lowest score). Raises
    UserError when the study has no MLflow experiment or no complete trial."""
    tracker = Tracker(tracking_uri)
    exp = tracker.get_experiment(study)
    if exp is None:
        others = localizer_studies(tracker)
        hint = f"; this store has {', '.join('study:' + n for n in others)}" if others else ""
        raise UserError(f"no localiser study {study!r} in MLflow ({redact(tracking_uri)}){hint}: run `optuna-run "
                        f"localizer --n-trials 3` then `optuna-run promote localizer` first, or name a localiser "
                        f"({CHAMPION_URI}, a checkpoint, runs:/RUN_ID, study:NAME, or prior)")
    runs = tracker.search_runs([exp.experiment_id], "tags.trial != '' and attributes.status = 'FINISHED' "
                               "and params.task = 'localize'", order_by=["metrics.score ASC"], max_results=1)
    if not runs:
        if tracker.search_runs([exp.experiment_id], "tags.trial != '' and attributes.status = 'FINISHED'", max_results=1):
            raise UserError(f"study {study!r} is not a localiser study (its trials are not task: localize; "
                            f"`optuna-run localizer` runs one)")
        raise UserError(f"localiser study {study!r} has no complete trial")
    return runs[0].info.run_id


def localizer_studies(tracker: Tracker) -> list[str]:
    """The names of the experiments (studies) in `tracker`'s store that hold a localiser trial
    (``params.task = 'localize'``), sorted: what ``study:NAME`` may name (a --smoke study is
    ``localizer-smoke``)."""
    by_id = {i: name for name, i in tracker.experiment_ids().items()}
    if not by_id:
        return []
    runs = tracker.search_runs(list(by_id), "tags.trial != '' and params.task = 'localize'", max_results=1000)
    return sorted({by_id[r.info.experiment_id] for r in runs})


def run_checkpoints(tracking_uri: str, run_id: str, dst: Path) -> list[Path]:
    """Download a localiser run's fold checkpoints into `dst`; raises UserError (TrackingError)
    when the store has no such run or the run has no checkpoint."""
    tracker = Tracker(tracking_uri)
    tracker.get_run(run_id)  # a TrackingError naming the id when this store has no such run
    names = [n for n in tracker.list_artifacts(run_id) if n.rsplit("/", 1)[-1].startswith("checkpoint")
             and n.endswith(".pt")]
    if not names:
        raise UserError(f"run {run_id} logged no checkpoint*.pt artifact: not a localiser trial")
    return [tracker.download(run_id, n, dst) for n in names]


def champion_registered(tracking_uri: str) -> bool:
    """Whether the registry holds a promoted localiser (`CHAMPION_URI`). A SQLite store that does not
    exist holds none (and is not created: a pyfunc loaded from a folder asks MLflow's default store)."""
    from .stores import missing_sqlite
    from .tracking import TrackingError, check_tracking_uri

    try:
        check_tracking_uri(tracking_uri)  # MLFLOW_TRACKING_URI may name a folder: it holds no registry
    except TrackingError:
        return False
    if missing_sqlite(tracking_uri):
        return False
    return Tracker(tracking_uri).model_version(LOCALIZER_MODEL, CHAMPION) is not None


def reads_tracking(spec: str | None) -> bool:
    """Whether the localiser named `spec` (module doc) is looked up in the tracking store: every
    name but ``prior`` and a local checkpoint file or folder."""
    return spec is None or spec == "best" or str(spec).startswith(("models:/", "runs:/", "study:"))


def localizer_version(tracking_uri: str, uri: str):
    """The registered localiser version a ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` URI names.

    Raises:
        UserError: a malformed URI, no such model, version or alias, or a version that is not a
            localiser's (a classifier's: it has no points to give)."""
    m = _MODEL_URI.match(uri)
    if not m:
        raise UserError(f"localiser {uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION "
                        f"(e.g. {CHAMPION_URI})")
    name, ref = m["name"], m["alias"] or m["version"]
    mv = Tracker(tracking_uri).model_version(name, ref)
    if mv is None:
        hint = " (promote one: optuna-run promote localizer)" if name == LOCALIZER_MODEL else ""
        raise UserError(f"localiser {uri}: the model registry ({redact(tracking_uri)}) has no model {name!r} with "
                        f"{'alias' if m['alias'] else 'version'} {ref!r}{hint}")
    task = mv.tags.get("task", "localize" if name == LOCALIZER_MODEL else "classify")
    if task != "localize":
        raise UserError(f"localiser {uri}: {name} version {mv.version} is not a localiser (task {task}: a "
                        f"classifier's model); promoted localisers are {LOCALIZER_MODEL}, e.g. {CHAMPION_URI}")
    return mv


def check_device(device: str) -> None:
    """Raises UserError for a device name torch does not know, or CUDA where there is none."""
    from trainer.training import resolve_device

    try:
        resolve_device(device)
    except RuntimeError as e:
        msg = str(e).splitlines()[0]
        raise UserError(msg if msg.startswith("device ") else f"device {device!r}: {msg}") from None


def point_source(spec: str | None, data_dir: str | Path, tracking_uri: str, device: str = "cpu") -> tuple[Any, str]:
    """(point source for `trainer.infer.predict_studies` / `trainer.points.locate.localize`, a
    description of it) from a localiser name (module doc). None: the promoted localiser
    (`CHAMPION_URI`) when registered, else ``best``.

    Raises:
        UserError: the name is unknown or names nothing usable; for None, no localiser was promoted
            and no localiser study has a complete trial (the message says how to make one)."""
    from trainer.data.layout import Layout
    from trainer.points.locate import Localizer, load_point_source

    check_device(device)
    if spec is None:
        if champion_registered(tracking_uri):
            spec = CHAMPION_URI
        else:
            try:
                return point_source("best", data_dir, tracking_uri, device)
            except UserError as e:
                raise UserError(f"no promoted localiser ({CHAMPION_URI}) and {e}") from None
    if spec == "prior" or (not spec.startswith(("models:/", "runs:/")) and Path(spec).exists()):
        try:
            return load_point_source(spec, Layout(Path(data_dir)), device), (
                GUESS if spec == "prior" else f"localiser {spec}")
        except ValueError as e:
            raise UserError(str(e)) from None
    with tempfile.TemporaryDirectory(prefix="spinesweep-localizer-") as tmp:
        if spec.startswith("models:/"):
            mv = localizer_version(tracking_uri, spec)
            what = (f"the promoted localiser {spec} ({mv.name} version {mv.version}: study "
                    f"{mv.tags.get('study', '?')!r}, trial {mv.tags.get('trial', '?')})")
            folder = Tracker(tracking_uri).download_uri(f"{mv.source.rstrip('/')}/artifacts/checkpoints", tmp)
            paths = sorted(Path(folder).glob("*.pt"))
        else:
            if spec == "best" or spec.startswith("study:"):
                study = DEFAULT_STUDY if spec == "best" else spec.split(":", 1)[1]
                run_id = best_localizer_run(tracking_uri, study)
                what = f"localiser: best trial of study {study!r} (run {run_id})"
            elif spec.startswith("runs:/"):
                run_id = spec[len("runs:/"):].strip("/").split("/")[0]
                what = f"localiser run {run_id}"
            else:
                raise UserError(f"localiser {spec!r}: expected prior, best, study:NAME, runs:/RUN_ID, a models:/ URI of "
                                f"a promoted localiser ({CHAMPION_URI}), or a checkpoint file or folder that exists")
            paths = run_checkpoints(tracking_uri, run_id, Path(tmp))
        try:  # loaded into memory: the downloaded files can go
            return Localizer.from_checkpoints(paths, device), what
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


# the stem of a localiser's out-of-fold points files: oof_coordinates.csv (a promotion, every study),
# oof_coordinates_fold<k>.csv (a trial's folds, trainer/points/fit.py)
OOF_POINTS = Path(names.OOF_POINTS).stem
URI_SCHEMES = ("runs:/", "models:/")


def is_points_uri(value: str) -> bool:
    """True for a ``runs:/`` or ``models:/`` URI (what `oof_points_file` resolves), False for a path."""
    return str(value).startswith(URI_SCHEMES)


def _oof_artifacts(tracker: Tracker, run_id: str) -> list[str]:
    """A localiser run's out-of-fold point files (``oof_coordinates*.csv``): its promotion's, under
    ``promoted/`` (every fold), when it was promoted, else the trial's own
    ``oof_coordinates_fold<k>.csv`` (the folds it was evaluated on)."""
    def is_points(path: str) -> bool:
        base = path.rsplit("/", 1)[-1]
        return base.startswith(OOF_POINTS) and base.endswith(".csv")

    top = tracker.list_artifacts(run_id)
    promoted = [a for a in tracker.list_artifacts(run_id, names.PROMOTED) if is_points(a)] if names.PROMOTED in top else []
    return sorted(promoted) or sorted(a for a in top if is_points(a))


def oof_points_file(uri: str, tracking_uri: str, dst: str | Path) -> Path:
    """A local ``train_label_coordinates.csv``-form file of a localiser's out-of-fold points, for
    ``data.val_points_file``. `uri` is
    - a path: returned as it is (the trainer reads and checks it);
    - ``runs:/RUN_ID``: a localiser trial's run: its ``oof_coordinates_fold<k>.csv`` (one per fold
      it was evaluated on), or the ``oof_coordinates.csv`` its promotion logged under ``promoted/``;
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
    run_id = (localizer_version(tracking_uri, uri).run_id if uri.startswith("models:/")
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

"""Promoted trials as real MLflow models: pyfuncs whose `predict` takes Kaggle-form inputs (a data
folder in the RSNA layout and study ids).

A classifier (`PromotedModel`, registered as ``spinesweep-<study>``) returns submission rows:

    model = mlflow.pyfunc.load_model("models:/spinesweep-demo@trial_5")
    rows = model.predict(pd.DataFrame({"data_dir": ["data/phantom"], "study_id": [1631507118]}))
    # row_id, normal_mild, moderate, severe: the 25 rows of each study the model covers, and
    # fallback: empty, or why the row holds the training label frequencies (its crop could not
    # be built: a series missing or unreadable, no slice near the point)

The checkpoints of every fold it was trained on are the model's artifacts; predictions are the
mean over them (`trainer.infer.predict_studies`). `params={"split": "train", "device": "cuda"}`
predicts training studies or on a GPU. The crops are cut around points: `params={"points":
"points.csv"}` takes them from a file (a ``train_label_coordinates.csv``-form file, `optuna-run
localize`); else `localizer` names a localiser (`sweep.localize`: ``models:/...``, ``runs:/ID``,
``best``, ``prior`` for the mean-position guess); its default is the promoted localiser
(``models:/spinesweep-localizer@champion``) when the registry has one, else the guess, with one
warning saying what the guess costs.

A localiser (`LocalizerModel`, registered as ``spinesweep-localizer``) returns point rows:

    model = mlflow.pyfunc.load_model("models:/spinesweep-localizer@champion")
    points = model.predict(pd.DataFrame({"data_dir": ["data/phantom"], "study_id": [1631507118]}))
    # study_id, series_id, instance_number, condition, level, x, y: train_label_coordinates.csv's
    # columns and spelling, as `optuna-run localize` writes them

Its fold checkpoints (heatmaps averaged, `trainer.points.locate.Localizer`) and its out-of-fold
points over every training study (``points``, the same form) are its artifacts.

Either model needs the spinesweep package where it is loaded (its pip requirements say so); its
signature and input example are stored with it.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

from trainer.data.layout import TARGET_COLUMNS

from . import artifacts as names

INPUT_COLUMNS = ("data_dir", "study_id")
CLASSIFIER_CODE = Path(__file__).with_name("model_code.py")  # models-from-code: the file MLflow runs to load it
LOCALIZER_CODE = Path(__file__).with_name("localizer_model_code.py")


def _check_input(model_input: pd.DataFrame) -> None:
    missing = [c for c in INPUT_COLUMNS if c not in model_input.columns]
    if missing:
        raise ValueError(f"model input needs columns {list(INPUT_COLUMNS)}; missing {missing}")


class PromotedModel(mlflow.pyfunc.PythonModel):
    """The pyfunc of a promoted trial: its fold checkpoints, predicting submission rows (module docstring)."""

    def load_context(self, context) -> None:
        """Find the fold checkpoints (``checkpoint_fold*.pt``) in the ``checkpoints`` artifact."""
        self.checkpoints = sorted(Path(context.artifacts["checkpoints"]).glob("checkpoint_fold*.pt"))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """Submission rows (``row_id``, the class columns, ``fallback``) of the studies in `model_input`
        (columns ``data_dir``, ``study_id``), the mean over the fold checkpoints. `params`: ``split``
        (default test), ``device`` (default cpu), ``points`` (a localiser's points csv: wins),
        ``localizer`` (a localiser's name, `sweep.localize`; empty: the promoted localiser when the
        registry has one, else the mean-position guess with one warning).

        Raises:
            ValueError: `model_input` lacks ``data_dir`` or ``study_id``; `trainer.errors.UserError`
                (a ValueError): ``localizer`` names nothing usable."""
        from trainer.infer import predict_studies

        params = params or {}
        _check_input(model_input)
        split, device = params.get("split") or "test", params.get("device") or "cpu"
        frames, groups = [], list(model_input.groupby("data_dir", sort=False))
        if params.get("points"):  # a localiser's points (optuna-run localize)
            from trainer.infer import PointTable

            source = PointTable.from_csv(params["points"])
        elif groups:  # one source for every folder (a localiser places any study; the guess is fitted per folder)
            source = self._point_source(params.get("localizer") or "", groups[0][0], device)
        for data_dir, group in groups:
            frames.append(predict_studies(self.checkpoints, data_dir, [int(s) for s in group["study_id"]],
                                          split=split, device=device, prior=source))
        if not frames:
            return pd.DataFrame(columns=["row_id", *TARGET_COLUMNS, "fallback"])
        return pd.concat(frames, ignore_index=True)

    def _point_source(self, spec: str, data_dir: str, device: str):
        """The point source `spec` names (`sweep.localize.point_source`); empty: the promoted localiser
        when the registry (MLflow's current tracking URI) has one, else the guess, with one warning.
        None stands for the guess: `predict_studies` fits it on the folder's training coordinates."""
        from .localize import CHAMPION_URI, GUESS_COST, champion_registered, point_source
        from .tracking import redact

        uri = mlflow.get_tracking_uri()
        if not spec:
            if not champion_registered(uri):
                warnings.warn(f"no promoted localiser ({CHAMPION_URI}) in {redact(uri)}: points placed by the "
                              f"mean-position guess; {GUESS_COST}", UserWarning, stacklevel=3)
                return None
            spec = CHAMPION_URI
        if spec == "prior":
            return None
        return point_source(spec, data_dir, uri, device)[0]


class LocalizerModel(mlflow.pyfunc.PythonModel):
    """The pyfunc of a promoted localiser: its fold checkpoints, predicting point rows (module docstring)."""

    def load_context(self, context) -> None:
        """Find the fold checkpoints (``checkpoint_fold*.pt``) in the ``checkpoints`` artifact."""
        self.checkpoints = sorted(Path(context.artifacts["checkpoints"]).glob("checkpoint_fold*.pt"))
        self._loaded: dict = {}

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """The points of the studies in `model_input` (columns ``data_dir``, ``study_id``): rows of
        `LOCALIZER_OUTPUT` in ``train_label_coordinates.csv``'s spelling, as `optuna-run localize`
        writes them. `params`: ``split`` (test, default, or train), ``device`` (default cpu).

        Raises:
            ValueError: `model_input` lacks ``data_dir`` or ``study_id``, or an unknown split."""
        from trainer.points.locate import Localizer, localize

        params = params or {}
        _check_input(model_input)
        split, device = params.get("split") or "test", params.get("device") or "cpu"
        if device not in self._loaded:
            self._loaded[device] = Localizer.from_checkpoints(self.checkpoints, device)
        frames = [localize(self._loaded[device], data_dir, split, [int(s) for s in group["study_id"]])
                  for data_dir, group in model_input.groupby("data_dir", sort=False)]
        if not frames:
            return pd.DataFrame(columns=[c for c, _ in LOCALIZER_OUTPUT])
        return pd.concat(frames, ignore_index=True)


LOCALIZER_OUTPUT = (("study_id", "long"), ("series_id", "long"), ("instance_number", "long"),
                    ("condition", "string"), ("level", "string"), ("x", "double"), ("y", "double"))


def signature(task: str = "classify"):
    """The MLflow signature of a `task`'s model. Inputs ``data_dir``, ``study_id``; params ``split``,
    ``device``. A classifier: outputs ``row_id``, the class columns and an optional ``fallback``;
    params also ``points`` and ``localizer``. A localiser (``localize``): outputs `LOCALIZER_OUTPUT`."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("string", "data_dir"), ColSpec("long", "study_id")])
    common = [ParamSpec("split", "string", "test"), ParamSpec("device", "string", "cpu")]
    if task == "localize":
        return ModelSignature(inputs=inputs, outputs=Schema([ColSpec(t, c) for c, t in LOCALIZER_OUTPUT]),
                              params=ParamSchema(common))
    return ModelSignature(
        inputs=inputs,
        outputs=Schema([ColSpec("string", "row_id"), *(ColSpec("double", c) for c in TARGET_COLUMNS),
                        ColSpec("string", "fallback", required=False)]),
        params=ParamSchema([*common, ParamSpec("points", "string", ""), ParamSpec("localizer", "string", "")]))


def requirements() -> list[str]:
    """Pip requirements pinned to the versions installed here (``name==version``)."""
    from .tracking import package_versions

    return [f"{k}=={v}" for k, v in package_versions().items()]


def save(path: Path, checkpoints: Path, example: pd.DataFrame, oof: Path, solution: Path, task: str = "classify",
         points: Path | None = None) -> None:
    """Write the model folder of a `task`'s promotion: MLmodel, the code that names its class, and as
    artifacts the checkpoints and the out-of-fold predictions with their labels (what an ensemble of
    registered models weighs); a localiser also its out-of-fold points (`points`, the
    ``train_label_coordinates.csv`` form)."""
    artifacts = {"checkpoints": str(checkpoints), "oof": str(oof), "solution": str(solution)}
    if task == "localize":
        if points is None:
            raise ValueError("a localiser's model needs its out-of-fold points")
        artifacts["points"] = str(points)
    code = LOCALIZER_CODE if task == "localize" else CLASSIFIER_CODE
    mlflow.pyfunc.save_model(str(path), python_model=str(code), artifacts=artifacts, signature=signature(task),
                             input_example=example, pip_requirements=requirements())


def member_frames(source: str, tracking_uri: str, dst: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A registered model version's OOF predictions and labels, from the version's own source."""
    from .tracking import Tracker

    tracker = Tracker(tracking_uri)
    frames = [pd.read_csv(tracker.download_uri(f"{source.rstrip('/')}/artifacts/{name}", dst))
              for name in (names.OOF, names.SOLUTION)]
    return frames[0], frames[1]

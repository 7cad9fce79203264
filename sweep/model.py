"""A promoted trial as a real MLflow model: a pyfunc whose `predict` takes Kaggle-form inputs
(a data folder in the RSNA layout and study ids) and returns submission rows.

    model = mlflow.pyfunc.load_model("models:/spinesweep-demo@trial_5")
    rows = model.predict(pd.DataFrame({"data_dir": ["data/phantom"], "study_id": [1631507118]}))
    # row_id, normal_mild, moderate, severe: the 25 rows of each study the model covers, and
    # fallback: empty, or why the row holds the training label frequencies (its crop could not
    # be built: a series missing or unreadable, no slice near the point)

The checkpoints of every fold it was trained on are the model's artifacts; predictions are the
mean over them (`trainer.infer.predict_studies`). `params={"split": "train", "device": "cuda"}`
predicts training studies or on a GPU; `params={"points": "points.csv"}` crops around a
localiser's points (a ``train_label_coordinates.csv``-form file, `optuna-run localize`) instead
of the mean-position guess. The model needs the spinesweep package where it is loaded
(its pip requirements say so); its signature and input example are stored with it.
"""
from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import pandas as pd

from trainer.data.layout import TARGET_COLUMNS

from . import artifacts as names

INPUT_COLUMNS = ("data_dir", "study_id")


class PromotedModel(mlflow.pyfunc.PythonModel):
    """The pyfunc of a promoted trial: its fold checkpoints, predicting submission rows (module docstring)."""

    def load_context(self, context) -> None:
        """Find the fold checkpoints (``checkpoint_fold*.pt``) in the ``checkpoints`` artifact."""
        self.checkpoints = sorted(Path(context.artifacts["checkpoints"]).glob("checkpoint_fold*.pt"))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """Submission rows (``row_id``, the class columns, ``fallback``) of the studies in `model_input`
        (columns ``data_dir``, ``study_id``), the mean over the fold checkpoints. `params`: ``split``
        (default test), ``device`` (default cpu), ``points`` (a localiser's points csv; empty: the mean-position guess).

        Raises:
            ValueError: `model_input` lacks ``data_dir`` or ``study_id``."""
        from trainer.infer import predict_studies

        params = params or {}
        missing = [c for c in INPUT_COLUMNS if c not in model_input.columns]
        if missing:
            raise ValueError(f"model input needs columns {list(INPUT_COLUMNS)}; missing {missing}")
        points = None
        if params.get("points"):  # a localiser's points (optuna-run localize), else the mean-position guess
            from trainer.infer import PointTable

            points = PointTable.from_csv(params["points"])
        frames = []
        for data_dir, group in model_input.groupby("data_dir", sort=False):
            frames.append(predict_studies(self.checkpoints, data_dir, [int(s) for s in group["study_id"]],
                                          split=params.get("split", "test"), device=params.get("device", "cpu"),
                                          prior=points))
        if not frames:
            return pd.DataFrame(columns=["row_id", *TARGET_COLUMNS, "fallback"])
        return pd.concat(frames, ignore_index=True)


def signature():
    """The model's MLflow signature: inputs ``data_dir``, ``study_id``; outputs ``row_id``, the class columns
    and an optional ``fallback``; params ``split``, ``device``, ``points``."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "data_dir"), ColSpec("long", "study_id")]),
        outputs=Schema([ColSpec("string", "row_id"), *(ColSpec("double", c) for c in TARGET_COLUMNS),
                        ColSpec("string", "fallback", required=False)]),
        params=ParamSchema([ParamSpec("split", "string", "test"), ParamSpec("device", "string", "cpu"),
                            ParamSpec("points", "string", "")]))


def requirements() -> list[str]:
    """Pip requirements pinned to the versions installed here (``name==version``)."""
    from .tracking import package_versions

    return [f"{k}=={v}" for k, v in package_versions().items()]


def save(path: Path, checkpoints: Path, example: pd.DataFrame, oof: Path, solution: Path) -> None:
    """Write the model folder: MLmodel, the pickled class, and as artifacts the checkpoints and the
    out-of-fold predictions with their labels (what an ensemble of registered models weighs)."""
    mlflow.pyfunc.save_model(str(path), python_model=str(Path(__file__).with_name("model_code.py")),
                             artifacts={"checkpoints": str(checkpoints), "oof": str(oof), "solution": str(solution)},
                             signature=signature(), input_example=example, pip_requirements=requirements())


def member_frames(source: str, tracking_uri: str, dst: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A registered model version's OOF predictions and labels, from the version's own source."""
    from .tracking import Tracker

    tracker = Tracker(tracking_uri)
    frames = [pd.read_csv(tracker.download_uri(f"{source.rstrip('/')}/artifacts/{name}", dst))
              for name in (names.OOF, names.SOLUTION)]
    return frames[0], frames[1]

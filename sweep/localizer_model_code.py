"""The promoted localiser's code, logged with it (MLflow's models-from-code: nothing pickled).
Loading the model runs this file, which names the model class `sweep/model.py` defines."""
import mlflow

from sweep.model import LocalizerModel

mlflow.models.set_model(LocalizerModel())

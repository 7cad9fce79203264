"""The shared trainer: config, data, models, augmentations, metric and `fit`. Knows nothing of
Optuna or MLflow."""
from .config import ConfigError, TrainConfig

__all__ = ["ConfigError", "TrainConfig", "fit", "FitResult"]


def __getattr__(name):  # torch-heavy imports only when used
    if name in ("fit", "FitResult"):
        from . import fit as _fit

        return getattr(_fit, name)
    raise AttributeError(name)

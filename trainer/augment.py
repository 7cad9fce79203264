"""Albumentations pipelines by preset name or as a list of ops, applied to a sample's whole
(H, W, slices) stack at once, so every slice gets the same transform.

Only the ops listed in `OPS` can be named (configs cannot import arbitrary code). Presets leave out
flips on purpose: a horizontal flip of the axial block swaps the patient's left and right, and so
the left/right labels; add `HorizontalFlip` as an op only for conditions where that is harmless.
MixUp mixes whole batches and lives in the trainer (`augment.mixup_alpha`, `augment.mixup_p`).
"""
from __future__ import annotations

import warnings

import albumentations as A

from .config import ConfigError
from .errors import did_you_mean

OPS: dict[str, type] = {
    "HorizontalFlip": A.HorizontalFlip,
    "VerticalFlip": A.VerticalFlip,
    "RandomBrightnessContrast": A.RandomBrightnessContrast,
    "ShiftScaleRotate": A.ShiftScaleRotate,
    "Affine": A.Affine,
    "Blur": A.Blur,
    "GaussNoise": A.GaussNoise,
    "OpticalDistortion": A.OpticalDistortion,
    "CoarseDropout": A.CoarseDropout,
}

_LIGHT = [
    dict(name="RandomBrightnessContrast", p=0.5, brightness_limit=0.2, contrast_limit=0.2),
    dict(name="Affine", p=0.5, scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-10, 10)),
]
_MEDIUM = _LIGHT + [
    dict(name="Blur", p=0.2, blur_limit=3),
    dict(name="GaussNoise", p=0.2, std_range=(0.02, 0.06)),
    dict(name="CoarseDropout", p=0.3, num_holes_range=(1, 4), hole_height_range=(0.05, 0.15),
         hole_width_range=(0.05, 0.15)),
]
_HEAVY = [
    dict(name="RandomBrightnessContrast", p=0.7, brightness_limit=0.3, contrast_limit=0.3),
    dict(name="Affine", p=0.7, scale=(0.85, 1.15), translate_percent=(-0.08, 0.08), rotate=(-15, 15)),
    dict(name="OpticalDistortion", p=0.3, distort_limit=0.2),
] + _MEDIUM[2:]

PRESETS: dict[str, list[dict]] = {"none": [], "light": _LIGHT, "medium": _MEDIUM, "heavy": _HEAVY}


def resolve_ops(cfg) -> list[dict]:
    """The op list an AugmentConfig stands for: its `ops` when given, else its preset's."""
    if cfg.ops:
        return [dict(op) for op in cfg.ops]
    if cfg.preset not in PRESETS:
        hint = did_you_mean(cfg.preset, PRESETS, n=2)
        raise ConfigError(f"augment.preset: unknown preset {cfg.preset!r}{hint} (known: {', '.join(PRESETS)})")
    return [dict(op) for op in PRESETS[cfg.preset]]


def build_augment(cfg, seed: int | None = None) -> A.Compose | None:
    """An `A.Compose` for the config, or None when nothing is to be applied. Raises ValueError
    (a ConfigError) naming the op and argument on bad input (without running anything)."""
    ops = []
    for i, spec in enumerate(resolve_ops(cfg)):
        spec = dict(spec)
        name = spec.pop("name", None)
        if name not in OPS:
            hint = did_you_mean(name, OPS, n=2)
            raise ConfigError(f"augment.ops[{i}]: unknown op {name!r}{hint} (known: {', '.join(OPS)})")
        p = spec.get("p", 0.5)
        if not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ConfigError(f"augment.ops[{i}] ({name}): p must be in [0, 1], got {p!r}")
        spec = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # albumentations' deprecation chatter (ShiftScaleRotate)
                ops.append(OPS[name](**spec))
        except Exception as e:
            raise ConfigError(f"augment.ops[{i}] ({name}): {e}") from None
    if not ops:
        return None
    return A.Compose(ops, seed=seed)


def describe(transform: A.Compose | None) -> dict:
    """The serialised pipeline (`A.to_dict`), recorded with a run so it says exactly what ran."""
    return {} if transform is None else A.to_dict(transform)

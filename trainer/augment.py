"""Albumentations pipelines by preset name or as a list of ops, applied to a sample's whole
(H, W, slices) stack at once, so every slice gets the same transform.

Only the ops listed in `OPS` can be named (configs cannot import arbitrary code). Presets leave out
flips on purpose: a horizontal flip of the axial block swaps the patient's left and right, and so
the left/right labels; add `HorizontalFlip` as an op only for conditions where that is harmless.
MixUp mixes whole batches and lives in the trainer (`augment.mixup_alpha`, `augment.mixup_p`).
"""
from __future__ import annotations

import inspect
import math
import warnings
from typing import Any, Callable

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


def _fraction_of_255(v) -> float:
    return round(float(v) / 255.0, 6)


def _range_v1(value, low_default=None) -> tuple:
    """albumentations 1.x's "a number or a pair": a number v is the range (low_default or v, v)."""
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return (value if low_default is None else low_default, value)


# albumentations 1.x arguments that the installed albumentations (2.x) no longer takes, by
# (op, argument) ("*": any op): (what replaced it, or None; how a 1.x value converts, or None when
# its meaning does not carry over). Only for the hints of `build_augment`'s errors and for
# `translate_v1` (import-log); *detecting* a stale argument is albumentations' own signature.
V1_ARGUMENTS: dict[tuple[str, str], tuple[str | None, Callable | None]] = {
    # 1.x: variance in pixel units (uint8); 2.x: standard deviation as a fraction of the maximum
    ("GaussNoise", "var_limit"): ("std_range", lambda v: {"std_range": tuple(
        round(math.sqrt(max(float(x), 0.0)) / 255.0, 6) for x in _range_v1(v, 0.0))}),
    ("GaussNoise", "mean"): ("mean_range", lambda v: {"mean_range": (_fraction_of_255(v), _fraction_of_255(v))}),
    # 1.x: min_* None means min = max; ints are pixels, floats fractions of the side, as in 2.x
    ("CoarseDropout", "max_holes"): ("num_holes_range", None),
    ("CoarseDropout", "min_holes"): ("num_holes_range", None),
    ("CoarseDropout", "max_height"): ("hole_height_range", None),
    ("CoarseDropout", "min_height"): ("hole_height_range", None),
    ("CoarseDropout", "max_width"): ("hole_width_range", None),
    ("CoarseDropout", "min_width"): ("hole_width_range", None),
    ("CoarseDropout", "fill_value"): ("fill", lambda v: {"fill": v}),
    ("CoarseDropout", "mask_fill_value"): ("fill_mask", lambda v: {"fill_mask": v}),
    ("OpticalDistortion", "shift_limit"): (None, None),
    ("Affine", "cval"): ("fill", lambda v: {"fill": v}),
    ("Affine", "cval_mask"): ("fill_mask", lambda v: {"fill_mask": v}),
    ("Affine", "mode"): ("border_mode", lambda v: {"border_mode": v}),
    ("*", "value"): ("fill", lambda v: {"fill": v}),
    ("*", "mask_value"): ("fill_mask", lambda v: {"fill_mask": v}),
    ("*", "always_apply"): ("p=1", lambda v: {"p": 1.0} if v else {}),
}
_COARSE_RANGES = {"num_holes_range": ("min_holes", "max_holes"), "hole_height_range": ("min_height", "max_height"),
                  "hole_width_range": ("min_width", "max_width")}


def _v1(name: str, arg: str):
    return V1_ARGUMENTS.get((name, arg)) or V1_ARGUMENTS.get(("*", arg))


def accepted_arguments(name: str) -> list[str]:
    """The arguments the installed albumentations' op `name` (one of `OPS`) takes: its signature,
    which is what albumentations itself checks keyword arguments against."""
    return [k for k in inspect.signature(OPS[name].__init__).parameters if k not in ("self", "strict")]


def translate_v1(name: str, args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(arguments for the installed albumentations, 1.x arguments whose meaning does not carry
    over) of op `name` given albumentations 1.x arguments. Arguments the installed version still
    takes pass unchanged; renamed ones are converted where `V1_ARGUMENTS` says how (GaussNoise
    ``var_limit`` in pixel variance -> ``std_range`` as fractions of 255; CoarseDropout
    ``max_holes``/``min_holes`` -> ``num_holes_range`` with 1.x's "min defaults to max", and the
    same for heights and widths; ``value`` -> ``fill``)."""
    accepted = set(accepted_arguments(name)) if name in OPS else set()
    out: dict[str, Any] = {}
    kept: dict[str, Any] = {}
    for new, (low, high) in _COARSE_RANGES.items() if name == "CoarseDropout" else ():
        if high in args and new in accepted:
            hi = args[high]
            lo = args.get(low) if args.get(low) is not None else hi
            out[new] = (lo, hi)
        elif low in args:
            kept[low] = args[low]
    for arg, value in args.items():
        if arg == "name" or (name == "CoarseDropout" and arg in {a for pair in _COARSE_RANGES.values() for a in pair}):
            continue
        if arg in accepted:
            out[arg] = value
            continue
        rule = _v1(name, arg)
        if rule is not None and rule[1] is not None:
            out.update(rule[1](value))
        else:
            kept[arg] = value
    return out, kept


def argument_hint(name: str, arg: str) -> str:
    """For an argument op `name` does not take: its albumentations-2 replacement, or a close accepted name
    (``; ...``, or empty)."""
    rule = _v1(name, arg)
    if rule is not None and rule[0]:
        return f"; albumentations 2 replaced it with {rule[0]}"
    if rule is not None:
        return "; albumentations 2 removed it, with no replacement"
    return did_you_mean(arg, accepted_arguments(name), n=2)


def _stale_arguments(i: int, name: str, args: list[str]) -> ConfigError:
    """The error naming every argument of op `i` the installed albumentations does not take, each
    with its albumentations-2 replacement or a close accepted name."""
    each = "; ".join(f"argument {a!r} is not accepted by albumentations {A.__version__}{argument_hint(name, a)}"
                     for a in args)
    return ConfigError(f"augment.ops[{i}] ({name}): {each} (it takes: {', '.join(accepted_arguments(name))})")


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
        accepted = accepted_arguments(name)
        stale = [arg for arg in spec if arg not in accepted]  # albumentations would warn and use its defaults
        if stale:
            raise _stale_arguments(i, name, stale)
        spec = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.filterwarnings("ignore", message=".*special case of Affine")  # ShiftScaleRotate's chatter
                # strict: albumentations itself refuses any argument it would otherwise drop
                ops.append(OPS[name](**spec, strict=True))
        except Exception as e:
            raise ConfigError(f"augment.ops[{i}] ({name}): {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                              f"{_pydantic_detail(e)}") from None
    if not ops:
        return None
    return A.Compose(ops, seed=seed)


def _pydantic_detail(e: Exception) -> str:
    """albumentations wraps pydantic's multi-line report; keep its field lines on one line."""
    lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip() and "errors.pydantic.dev" not in ln]
    return f" ({'; '.join(lines[:4])})" if lines else ""


def check_augment(cfg) -> None:
    """Raise ConfigError for an AugmentConfig that `build_augment` would refuse (an unknown op,
    a probability outside [0, 1], an argument the installed albumentations does not take or a
    value it rejects). Builds the ops, runs nothing: a study calls it before any trial."""
    build_augment(cfg)


def describe(transform: A.Compose | None) -> dict:
    """The serialised pipeline (`A.to_dict`), recorded with a run so it says exactly what ran."""
    return {} if transform is None else A.to_dict(transform)

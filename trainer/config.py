"""`TrainConfig`: every knob the manual log turned, typed, with defaults.

A config round-trips through YAML (nested) and through a flat ``section.key=value`` dict (the
MLflow params); a run is reproduced from that flat dict alone. Unknown keys and wrong types fail
with a `ConfigError` naming the key. Configs are immutable: `replace` and `with_overrides` return
new objects, so a study never mutates a shared config.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import UserError
from .data.layout import CONDITIONS, PLANE_OF_CONDITION, PLANE_OF_SERIES

PLANES = ("sag_t2", "sag_t1", "axial")
# which plane shows each condition (crop blocks are built only for the planes needed)
PLANE_FOR_CONDITION = {c: PLANE_OF_SERIES[s] for c, s in PLANE_OF_CONDITION.items()}


class ConfigError(UserError):
    """A config key is unknown or has a value of the wrong type; the message names the key."""


PIXELS = {"pixels": True}  # metadata of the DataConfig fields that change a sample's pixels


@dataclass(frozen=True)
class DataConfig:
    """Fields marked `PIXELS` decide a sample's pixels: `trainer.data.crops.CropSpec` is made of
    them (and the planes in use), so a new such field is declared here and nowhere else."""

    data_dir: str = "data/phantom"
    conditions: tuple[str, ...] = CONDITIONS
    planes: tuple[str, ...] = ()  # empty: the planes the conditions need
    window_ratio: float = field(default=0.15, metadata=PIXELS)  # half the crop's side = ratio x the image's side (sagittal)
    axial_window_ratio: float = field(default=0.35, metadata=PIXELS)
    sag_t1_slices: int = field(default=3, metadata=PIXELS)  # per side (left and right foramen)
    sag_t2_slices: int = field(default=5, metadata=PIXELS)
    axial_slices: int = field(default=3, metadata=PIXELS)
    img_size: int = field(default=128, metadata=PIXELS)
    normalize: Literal["minmax255", "standardize"] = "minmax255"
    fold: int = 0
    n_folds: int = 4
    folds_seed: int = 42
    max_studies: int = 0  # 0: all; a cap for smoke runs
    # the points the validation fold's crops are cut around: `labelled` (train_label_coordinates.csv)
    # or `oof`, a localiser's out-of-fold points read from `val_points_file` (a CSV in the
    # train_label_coordinates.csv form: `optuna-run localize`'s output, a localiser trial's
    # oof_coordinates_fold<k>.csv), so the fold is scored as the leaderboard scores it. Training
    # crops always stay on the labelled points. The trainer reads a local file only; a study
    # resolves ``runs:/`` and ``models:/`` URIs before its trials (`sweep.localize.oof_points_file`).
    val_points: Literal["labelled", "oof"] = "labelled"
    val_points_file: str = ""
    cache_dir: str = ""  # empty: $SPINESWEEP_CACHE or ~/.cache/spinesweep
    cache_budget_gb: float = 0.0  # the volume cache's disk budget; 0: $SPINESWEEP_CACHE_BUDGET or 64 GiB

    def check_val_points(self) -> None:
        """Raise ConfigError naming ``data.val_points_file`` when ``val_points`` is ``oof`` without
        a file. Checked on a config about to train (`trainer.fit.fold_datasets`, and a study's
        every assembled config, `sweep.space.SearchSpace.config`), not when a config is built: configs
        are assembled in layers (a space's fixed values, the sampled ones, ``--set``), and one layer
        may say ``oof`` while another names the file."""
        if self.val_points == "oof" and not self.val_points_file.strip():
            raise ConfigError("data.val_points_file: required with data.val_points: oof (a CSV of a localiser's "
                              "out-of-fold points in the train_label_coordinates.csv form; in a study also a "
                              "runs:/RUN_ID or models:/ URI of a localiser)")

    def used_planes(self) -> tuple[str, ...]:
        """The planes to build crops for, in `PLANES` order: `planes` when given, else those the conditions need."""
        if self.planes:
            return tuple(p for p in PLANES if p in self.planes)
        need = {PLANE_FOR_CONDITION[c] for c in self.conditions}
        return tuple(p for p in PLANES if p in need)


@dataclass(frozen=True)
class ModelConfig:
    """The classifier network: timm backbone and weights, slices per image, head and pooling."""

    backbone: str = "tf_efficientnet_b0.ns_jft_in1k"
    pretrained: bool | Literal["auto"] = True
    weights_dir: str = ""  # a folder of pretrained weights (<backbone>.safetensors/.pth), before any cache or hub
    in_chans: int = 1  # slices per backbone image (2.5-D: 3)
    head: str = "lstm"
    pooling: Literal["avg", "max", "gem"] = "avg"
    dropout: float = 0.2
    rnn_hidden: int = 128
    rnn_layers: int = 1
    attention_hidden: int = 64


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser, schedule and loss (shared by the localiser): lr, epochs, warmup share, class weights, EMA."""

    lr: float = 1e-3
    epochs: int = 10
    batch_size: int = 8
    warmup_ratio: float = 0.1
    weight_decay: float = 1e-2
    scheduler: Literal["cosine", "constant", "linear"] = "cosine"
    loss: Literal["ce", "focal"] = "ce"
    focal_gamma: float = 2.0
    class_weights: tuple[float, float, float] = (1.0, 2.0, 4.0)
    label_smoothing: float = 0.0
    grad_clip: float = 1.0  # 0: off
    ema: float = 0.0  # 0: off, else the decay (e.g. 0.99)


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation: an albumentations preset or explicit ops, mixup, crop jitter."""

    preset: str = "light"  # none / light / medium / heavy
    ops: tuple[dict, ...] = ()  # [{name: HorizontalFlip, p: 0.5, ...}]: replaces the preset when given
    mixup_alpha: float = 0.0
    mixup_p: float = 0.0
    crop_shift: float = 0.0  # training crops' centres move by up to this fraction of the half side
    crop_scale: float = 0.0  # training crops' windows scale by a factor in [1 - s, 1 + s]


@dataclass(frozen=True)
class LocalizerConfig:
    """The keypoint model (`task: localize`): per slice, one Gaussian heatmap per level (canal on
    Sagittal T2/STIR, foramen on Sagittal T1) or per side (recess on Axial T2), fading on the
    neighbouring slices, so that the peak picks the slice as well as the point. It shares
    `model.backbone`, `model.pretrained`, `model.in_chans` (neighbouring slices per image), the
    optimiser, `data` (folder, folds, conditions: which points) and `seed` with the classifier."""

    img_size: int = 96  # every slice resized to img_size x img_size
    stride: Literal[2, 4] = 2  # heatmap cell side in input pixels (4: the stride-4 head alone; bench/localize.py)
    sigma: float = 2.0  # the heatmap Gaussian's sd, in heatmap cells (`stride` input pixels each)
    slice_sigma_mm: float = 2.0  # a point's heatmap fades with its distance from a slice (sd, mm)
    affine: float = 0.5  # augmentation strength in [0, 1]: scale +-20%, shift +-10%, rotation +-15 deg, contrast
    negatives: float = 0.3  # share of the slices far from every point that each epoch trains on
    score: Literal["p90_mm", "median_mm"] = "p90_mm"  # the validation score (point error, all points)


@dataclass(frozen=True)
class TrainConfig:
    """One training run: the sections above plus task, seed, device, AMP, workers, checkpoint selection."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    localizer: LocalizerConfig = field(default_factory=LocalizerConfig)
    task: Literal["classify", "localize"] = "classify"  # the model family `fit` trains
    seed: int = 42
    device: str = "auto"  # auto / cpu / cuda / cuda:N
    amp: bool = True  # used on CUDA only
    num_workers: int = -1  # DataLoader workers; -1: auto (CUDA: this process's core share - 1, at most 8; CPU: 0)
    select_by: Literal["score", "loss"] = "score"
    output_dir: str = ""  # where checkpoints go; empty: a temporary folder per run

    # ---- construction ----
    @classmethod
    def from_dict(cls, d: dict | None) -> "TrainConfig":
        """From a nested dict (sections of keys); missing keys keep their defaults.

        Raises:
            ConfigError: an unknown key, a wrong type or an invalid value."""
        return _build(cls, d or {}, "")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        """From a YAML file of config sections.

        Raises:
            ConfigError: a missing or unreadable file, invalid YAML (with its line and column), a top
                level that is not a mapping, or a bad key (each prefixed with the path)."""
        path = Path(path)
        d = read_yaml(path) or {}
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: top level must be a mapping of config sections")
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> "TrainConfig":
        """From ``{"optim.lr": "0.001", ...}``: values may be strings (MLflow params) or typed."""
        return cls().with_overrides(flat)

    # ---- views ----
    def to_dict(self) -> dict:
        """A nested dict of plain values (tuples as lists), the inverse of `from_dict`."""
        return _to_plain(self)

    def to_yaml(self) -> str:
        """The nested dict as YAML, in field order (what `from_yaml` reads)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_flat(self, as_str: bool = True) -> dict[str, Any]:
        """``section.key -> str`` for every field, lists and dicts as JSON (what MLflow params hold);
        with ``as_str=False`` the plain values instead (tuples as lists)."""
        out: dict[str, Any] = {}

        def walk(obj, prefix):
            for f in dataclasses.fields(obj):
                v = getattr(obj, f.name)
                key = prefix + f.name
                if dataclasses.is_dataclass(v):
                    walk(v, key + ".")
                else:
                    out[key] = _flat_str(_to_plain(v)) if as_str else _to_plain(v)

        walk(self, "")
        return out

    # ---- changes ----
    def with_overrides(self, overrides: dict[str, Any]) -> "TrainConfig":
        """Apply ``section.key -> value`` overrides; string values are parsed by the field's type."""
        d = self.to_dict()
        for key, value in overrides.items():
            parts = key.split(".")
            node, ftype = d, TrainConfig
            for i, p in enumerate(parts):
                fields = {f.name: f for f in dataclasses.fields(ftype)} if dataclasses.is_dataclass(ftype) else {}
                if p not in fields:
                    raise ConfigError(_unknown(".".join(parts[: i + 1]), fields))
                hint = _hints(ftype)[p]
                if i < len(parts) - 1:
                    if not dataclasses.is_dataclass(hint):
                        raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, not a section")
                    node, ftype = node[p], hint
                else:
                    if dataclasses.is_dataclass(hint):
                        raise ConfigError(f"{key}: is a section; set one of its keys")
                    node[p] = _parse_str(value, hint, key) if isinstance(value, str) else value
        return TrainConfig.from_dict(d)


# ---------------------------------------------------------------- helpers


def read_yaml(path: str | Path, error: type[UserError] = ConfigError) -> Any:
    """The parsed content of a YAML file (None when it is empty): a config, a search space.

    Raises:
        `error` (ConfigError by default), in one line naming the file: it does not exist, is a
        folder, is not UTF-8 text or cannot be read, or its YAML is invalid (with line and column).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except IsADirectoryError:
        raise error(f"{path}: a folder, not a YAML file") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not a text file (YAML is UTF-8 text)") from None
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        why = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise error(f"{path}: invalid YAML{at}: {why}") from None


@functools.cache
def _hints(cls) -> dict[str, Any]:
    """`typing.get_type_hints` of a config class, evaluated once (the annotations are strings)."""
    return typing.get_type_hints(cls)


def _unknown(key: str, fields) -> str:
    from .errors import did_you_mean

    hint = did_you_mean(key.rsplit(".", 1)[-1], fields) or f"; known: {', '.join(fields)}"
    return f"{key}: unknown config key{hint}"


def _flat_str(v) -> str:
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _parse_str(s: str, hint, key: str):
    """A string from the command line or MLflow into the field's type."""
    origin = typing.get_origin(hint)
    if hint is str:
        return s
    if origin is Literal or _is_union(hint):
        try:
            return yaml.safe_load(s)
        except yaml.YAMLError:
            return s
    if hint in (int, float):
        try:
            return hint(s.strip())  # YAML 1.1 would read "1e30" as a string
        except ValueError:
            raise ConfigError(f"{key}: expected {'an integer' if hint is int else 'a number'}, got {s!r}") from None
    if origin in (tuple, list) or hint is bool:
        try:
            return yaml.safe_load(s) if hint is not bool else _parse_bool(s, key)
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: cannot parse {s!r} ({e})") from None
    return s


def _parse_bool(s: str, key: str) -> bool:
    low = s.strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"{key}: expected true/false, got {s!r}")


def _is_union(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _check(value, hint, key: str):
    """Return `value` coerced to `hint` or raise ConfigError naming `key`."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if _is_union(hint):
        for a in args:
            try:
                return _check(value, a, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} matches none of {_type_name(hint)}")
    if origin is Literal:
        if value in args and type(value) is type(args[args.index(value)]):
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if hint is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_check(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
        return _build(hint, value, key + ".")
    raise ConfigError(f"{key}: unsupported type {hint}")


def _type_name(hint) -> str:
    return " | ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(hint))


def _build(cls, d: dict, prefix: str):
    if dataclasses.is_dataclass(d):
        return d
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in d.items():
        if k not in fields:
            raise ConfigError(_unknown(prefix + str(k), fields))
        kwargs[k] = _check(v, hints[k], prefix + k)
    obj = cls(**kwargs)
    _validate(obj, prefix)
    return obj


def _validate(obj, prefix: str) -> None:
    """Value checks that types cannot express; builds nothing."""
    if isinstance(obj, DataConfig):
        for c in obj.conditions:
            if c not in CONDITIONS:
                raise ConfigError(_unknown(f"{prefix}conditions: {c}", CONDITIONS).replace("config key", "condition"))
        if not obj.conditions:
            raise ConfigError(f"{prefix}conditions: at least one condition is needed")
        for p in obj.planes:
            if p not in PLANES:
                raise ConfigError(f"{prefix}planes: {p!r} is not one of {list(PLANES)}")
        for k in ("window_ratio", "axial_window_ratio"):
            if not 0 < getattr(obj, k) <= 1:
                raise ConfigError(f"{prefix}{k}: must be in (0, 1], got {getattr(obj, k)}")
        for k in ("sag_t1_slices", "sag_t2_slices", "axial_slices", "img_size", "n_folds"):
            if getattr(obj, k) < 1:
                raise ConfigError(f"{prefix}{k}: must be >= 1, got {getattr(obj, k)}")
        if obj.cache_budget_gb < 0:
            raise ConfigError(f"{prefix}cache_budget_gb: must be >= 0 (0: the default), got {obj.cache_budget_gb}")
        if not 0 <= obj.fold < obj.n_folds:
            raise ConfigError(f"{prefix}fold: must be in [0, n_folds={obj.n_folds}), got {obj.fold}")
    elif isinstance(obj, OptimConfig):
        for k in ("lr", "epochs", "batch_size"):
            if getattr(obj, k) <= 0:
                raise ConfigError(f"{prefix}{k}: must be > 0, got {getattr(obj, k)}")
        if not 0 <= obj.warmup_ratio < 1:
            raise ConfigError(f"{prefix}warmup_ratio: must be in [0, 1), got {obj.warmup_ratio}")
        if not 0 <= obj.ema < 1:
            raise ConfigError(f"{prefix}ema: must be in [0, 1), got {obj.ema}")
    elif isinstance(obj, ModelConfig):
        if obj.in_chans < 1:
            raise ConfigError(f"{prefix}in_chans: must be >= 1, got {obj.in_chans}")
        if not 0 <= obj.dropout < 1:
            raise ConfigError(f"{prefix}dropout: must be in [0, 1), got {obj.dropout}")
    elif isinstance(obj, AugmentConfig):
        for k in ("crop_shift", "crop_scale"):
            if not 0 <= getattr(obj, k) < 1:
                raise ConfigError(f"{prefix}{k}: must be in [0, 1), got {getattr(obj, k)}")
    elif isinstance(obj, LocalizerConfig):
        if obj.img_size < 32 or obj.img_size % 32:
            raise ConfigError(f"{prefix}img_size: must be a multiple of 32 and >= 32, got {obj.img_size}")
        for k in ("sigma", "slice_sigma_mm"):
            if getattr(obj, k) <= 0:
                raise ConfigError(f"{prefix}{k}: must be > 0, got {getattr(obj, k)}")
        for k in ("affine", "negatives"):
            if not 0 <= getattr(obj, k) <= 1:
                raise ConfigError(f"{prefix}{k}: must be in [0, 1], got {getattr(obj, k)}")
    elif isinstance(obj, TrainConfig):
        if obj.num_workers < -1:
            raise ConfigError(f"{prefix}num_workers: must be >= 0, or -1 for auto, got {obj.num_workers}")


def _to_plain(v):
    if dataclasses.is_dataclass(v):
        return {f.name: _to_plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (list, tuple)):
        return [_to_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _to_plain(x) for k, x in v.items()}
    return v

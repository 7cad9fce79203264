"""Search spaces: one YAML file per named study, loaded and validated without training.

    # header comment: the command that runs it
    description: what the study asks
    direction: minimize
    fixed:                      # any TrainConfig key, dotted
      data.conditions: [spinal_canal_stenosis]
    params:                     # Optuna's distributions, suggested in this order
      optim.lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
      model.head: {type: categorical, choices: [linear, lstm, gru]}
      model.rnn_hidden: {type: int, low: 32, high: 256, step: 32, when: {model.head: [lstm, gru]}}
    sampler: {name: tpe, seed: 0}
    pruner: {name: median, n_warmup_steps: 1}
    folds: [0]
    n_trials: 20
    timeout: null               # seconds
    smoke: {}                   # extra fixed values for --smoke, on top of the built-in caps

A parameter with `when` is suggested only when every named key (an earlier parameter or a fixed
value) has one of the listed values; otherwise it keeps the fixed/default value.

Per-op augmentation probabilities use keys ``augment.ops.<Op>.p`` (a float in [0, 1]) for ops
listed in the fixed ``augment.ops``.
"""
from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml

from trainer.config import ConfigError, TrainConfig, read_yaml
from trainer.errors import UserError, did_you_mean

SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"

SAMPLERS = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "qmc": optuna.samplers.QMCSampler,
    "gp": optuna.samplers.GPSampler,
}
PRUNERS = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "wilcoxon": optuna.pruners.WilcoxonPruner,
    "none": optuna.pruners.NopPruner,
}
TOP_KEYS = {"description", "direction", "fixed", "params", "sampler", "pruner", "folds", "n_trials", "timeout", "smoke"}

# --smoke: any space, capped to run in seconds on a CPU
SMOKE = {
    "optim.epochs": 1, "data.img_size": 32, "data.max_studies": 8, "model.backbone": "test_efficientnet",
    "model.pretrained": False, "data.sag_t2_slices": 1, "data.sag_t1_slices": 1, "data.axial_slices": 1,
    "optim.batch_size": 8, "model.rnn_hidden": 16, "num_workers": 0,
}


class SpaceError(UserError):
    """A search space file is invalid; the message names the file and key."""


@dataclass(frozen=True)
class Settings:
    """What one invocation adds to a space's configs (picklable: workers receive it)."""

    data_dir: str | None = None
    smoke: bool = False
    pinned: dict[str, Any] = field(default_factory=dict)  # --set key=value: never sampled
    device: str | None = None  # the worker's (a pinned GPU, or the CPU for --workers); --set device wins

    def never_sampled(self, space: "SearchSpace") -> set[str]:
        """The keys no trial samples: the pinned (--set) keys and, with --smoke, the built-in `SMOKE`
        caps and the space's own `smoke` keys."""
        return set(self.pinned) | (set(SMOKE) | set(space.smoke) if self.smoke else set())


@dataclass(frozen=True)
class Param:
    """One sampled parameter of a space, as validated from its ``params`` entry.

    `key` is a dotted TrainConfig key or ``augment.ops.<Op>.p``; `low`/`high`/`step`/`log` bound a
    float or int parameter (an int's step defaults to 1), `choices` a categorical one; `when` maps
    keys to the values they must hold for the parameter to be sampled (empty: always)."""

    key: str
    type: str  # float / int / categorical
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()
    when: dict[str, tuple] = field(default_factory=dict)

    def distribution(self) -> optuna.distributions.BaseDistribution:
        """The Optuna distribution this parameter samples from (the one `suggest` uses)."""
        if self.type == "float":
            return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return optuna.distributions.IntDistribution(self.low, self.high, log=self.log, step=self.step or 1)
        return optuna.distributions.CategoricalDistribution(self.choices)

    def suggest(self, trial: optuna.Trial):
        """This parameter's value for the trial, from its distribution."""
        if self.type == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.key, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_categorical(self.key, list(self.choices))

    def active(self, values: dict[str, Any]) -> bool:
        """Whether the parameter is sampled given `values` (dotted key -> value so far): every `when`
        key holds one of its listed values."""
        return all(values.get(k) in allowed for k, allowed in self.when.items())

    def contains(self, value) -> bool:
        """Whether a value lies inside this distribution (used to place legacy runs in a space)."""
        if self.type == "categorical":
            return value in self.choices
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return False
        if not self.low <= value <= self.high:
            return False
        if self.step:
            k = (value - self.low) / self.step
            return abs(k - round(k)) < 1e-9
        return self.type == "float" or float(value).is_integer()


@dataclass(frozen=True)
class SearchSpace:
    """One search space file, loaded and validated (`load_space`).

    `name` is the file's stem; `params` are suggested in file order; `sampler` and `pruner` are
    ``{"name": ..., **arguments}`` (keys of `SAMPLERS` and `PRUNERS`); `folds` the folds each trial
    trains; `timeout` in seconds (None: none); `smoke` the space's extra --smoke values;
    `file_hash` the first 12 hex digits of the file's SHA-1 (recorded with the study and its runs)."""

    name: str
    path: Path
    description: str
    direction: str
    fixed: dict[str, Any]
    params: tuple[Param, ...]
    sampler: dict
    pruner: dict
    folds: tuple[int, ...]
    n_trials: int
    timeout: float | None
    smoke: dict[str, Any]
    file_hash: str

    def config(self, settings: "Settings | None" = None, sampled: dict[str, Any] | None = None) -> TrainConfig:
        """A trial's config, the one place it is assembled. In this order, each over the last:
        TrainConfig's defaults, the space's `fixed` values, the `sampled` values, the --smoke caps
        (the built-in ones, then the space's `smoke`), the worker's device, the pinned (--set)
        values, the data folder. Smoke caps and pinned keys are never sampled (`Settings.never_sampled`)."""
        settings = settings or Settings()
        cfg = TrainConfig().with_overrides(self.fixed).with_overrides(sampled or {})
        if settings.smoke:
            cfg = cfg.with_overrides({**SMOKE, **self.smoke})
        if settings.device and "device" not in settings.pinned:
            cfg = cfg.with_overrides({"device": settings.device})
        cfg = cfg.with_overrides(settings.pinned)
        if settings.data_dir:
            cfg = cfg.with_overrides({"data.data_dir": settings.data_dir})
        check_buildable(cfg)
        cfg.data.check_val_points()  # on the assembled config: `fixed` may say oof and --set name the file
        return cfg

    def suggest(self, trial: optuna.Trial, base: TrainConfig, never=()) -> dict[str, Any]:
        """The sampled values of one trial. Inactive conditional parameters are left out, and so
        are the keys in `never` (pinned with --set or capped by --smoke)."""
        values: dict[str, Any] = base.to_flat(as_str=False)
        out: dict[str, Any] = {}
        op_p: dict[str, float] = {}
        for p in self.params:
            if p.key in never or not p.active(values):
                continue
            v = p.suggest(trial)
            values[p.key] = v
            if _op_name(p.key):
                op_p[_op_name(p.key)] = v
            else:
                out[p.key] = v
        if op_p:
            out["augment.ops"] = [dict(op, p=op_p.get(op["name"], op.get("p", 0.5))) for op in base.augment.ops]
        return out

    def make_sampler(self, seed: int | None = None) -> optuna.samplers.BaseSampler:
        """The space's sampler; `seed` replaces the space's own seed (each worker process passes
        its stream's seed: `sampling.stream_seed`)."""
        args = dict(self.sampler)
        if seed is not None:
            args["seed"] = seed
        return SAMPLERS[args.pop("name")](**args)

    def make_pruner(self) -> optuna.pruners.BasePruner:
        """The space's Optuna pruner, built from its `pruner` mapping."""
        args = dict(self.pruner)
        return PRUNERS[args.pop("name")](**args)

    @property
    def fold_wise(self) -> bool:
        """Wilcoxon compares trials fold by fold: it gets one report per fold, not per epoch."""
        return self.pruner["name"] == "wilcoxon"


def check_buildable(cfg: TrainConfig) -> None:
    """Raise ConfigError, naming the key, for a config whose named parts cannot be built: a
    backbone (with its pretrained tag) timm does not have, an unknown head, an augmentation op or
    argument the installed albumentations refuses. Builds no model; called on every assembled
    config, so a study refuses before its first trial instead of failing each one."""
    from trainer.augment import check_augment
    from trainer.models import check_backbone, check_head

    for key, check, value in (("model.backbone", check_backbone, cfg.model.backbone),
                              ("model.head", check_head, cfg.model.head),
                              ("augment", check_augment, cfg.augment)):
        try:
            check(value)
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(msg if msg.startswith(key) else f"{key}: {msg}") from None


def available_spaces() -> list[str]:
    """The names (file stems) of every ``*.yaml`` under `SPACES_DIR`, subfolders included, sorted."""
    return sorted(p.stem for p in SPACES_DIR.rglob("*.yaml"))


def resolve_space_path(name_or_path: str) -> Path:
    """The file of a space given by name (searched under `SPACES_DIR`, subfolders included) or by path
    (one ending in ``.yaml``/``.yml``, or any existing path).

    Raises:
        SpaceError: the path is not a file, or no space has that name (the message suggests close
            names and lists those there are)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise SpaceError(f"{p}: search space file not found")
        return p
    hits = sorted(SPACES_DIR.rglob(f"{name_or_path}.yaml"))
    if not hits:
        names = available_spaces()
        hint = did_you_mean(name_or_path, names)
        raise SpaceError(f"unknown search space {name_or_path!r}{hint} (available: {', '.join(names)})")
    return hits[0]


def load_space(name_or_path: str) -> SearchSpace:
    """Load and validate a space: every key, distribution and name, building nothing."""
    path = resolve_space_path(name_or_path)
    where = str(path)
    raw = read_yaml(path, SpaceError)
    if raw is None:
        raise SpaceError(f"{where}: the file is empty; a space needs at least `params` (see search_spaces/demo.yaml)")
    if not isinstance(raw, dict):
        raise SpaceError(f"{where}: top level must be a mapping")
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise SpaceError(f"{where}: unknown key(s) {sorted(unknown)} (known: {sorted(TOP_KEYS)})")

    def err(key: str, msg: str) -> SpaceError:
        return SpaceError(f"{where}: {key}: {msg}")

    direction = raw.get("direction", "minimize")
    if direction not in ("minimize", "maximize"):
        raise err("direction", f"must be minimize or maximize, got {direction!r}")
    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise err("fixed", "must be a mapping of config keys to values")
    try:
        base = TrainConfig().with_overrides(fixed)
        check_buildable(base)
    except ConfigError as e:
        raise err("fixed", str(e)) from None
    smoke = raw.get("smoke") or {}
    try:
        TrainConfig().with_overrides({**fixed, **SMOKE, **smoke})
    except ConfigError as e:
        raise err("smoke", str(e)) from None

    params = []
    seen = set(fixed)
    raw_params = raw.get("params") or {}
    if not isinstance(raw_params, dict):
        raise err("params", "must be a mapping of config keys to distributions")
    for key, spec in raw_params.items():
        if key in fixed:
            raise err(f"params.{key}", "is also in `fixed`: a key is either fixed or sampled, not both")
        params.append(_param(key, spec, base, seen, err, {q.key: q for q in params}, fixed))
        seen.add(key)

    sampler = _named(raw.get("sampler") or {"name": "tpe"}, SAMPLERS, "sampler", err)
    pruner = _named(raw.get("pruner") or {"name": "median"}, PRUNERS, "pruner", err)
    folds = tuple(raw.get("folds", (0,)))
    if not folds or not all(isinstance(f, int) and 0 <= f < base.data.n_folds for f in folds):
        raise err("folds", f"must be a non-empty list of folds in [0, {base.data.n_folds}), got {list(folds)}")
    n_trials = raw.get("n_trials", 20)
    if not isinstance(n_trials, int) or n_trials < 1:
        raise err("n_trials", f"must be a positive integer, got {n_trials!r}")
    timeout = raw.get("timeout")
    if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
        raise err("timeout", f"must be a positive number of seconds or null, got {timeout!r}")
    return SearchSpace(
        name=path.stem, path=path.resolve(), description=str(raw.get("description", "")).strip(),
        direction=direction, fixed=fixed, params=tuple(params), sampler=sampler, pruner=pruner,
        folds=folds, n_trials=n_trials, timeout=timeout, smoke=smoke,
        file_hash=hashlib.sha1(path.read_text(encoding="utf-8").encode()).hexdigest()[:12],
    )


def _op_name(key: str) -> str | None:
    parts = key.split(".")
    return parts[2] if len(parts) == 4 and parts[:2] == ["augment", "ops"] and parts[3] == "p" else None


def _param(key: str, spec, base: TrainConfig, seen: set, err, earlier: dict | None = None,
           fixed: dict | None = None) -> Param:
    from trainer.augment import PRESETS
    from trainer.models import check_backbone, check_head

    where = f"params.{key}"
    if not isinstance(spec, dict):
        raise err(where, "must be a mapping with a 'type'")
    allowed = {"type", "low", "high", "log", "step", "choices", "when"}
    extra = set(spec) - allowed
    if extra:
        raise err(where, f"unknown field(s) {sorted(extra)} (known: {sorted(allowed)})")
    kind = spec.get("type")
    when = {k: tuple(v if isinstance(v, list) else [v]) for k, v in (spec.get("when") or {}).items()}
    for k, allowed in when.items():
        if k not in seen:
            raise err(f"{where}.when", f"{k!r} is neither a fixed value nor an earlier parameter")
        other = (earlier or {}).get(k)
        if other is not None and other.type == "categorical":
            missing = [v for v in allowed if v not in other.choices]
            if missing:
                raise err(f"{where}.when", f"{k} value(s) {missing} are not among its choices {list(other.choices)}")
        elif k in (fixed or {}) and fixed[k] not in allowed:
            raise err(f"{where}.when", f"{k} is fixed to {fixed[k]!r}, so this parameter would never be sampled")

    def check_value(v):
        parts = key.split(".")
        if parts[:2] == ["augment", "ops"] and not _op_name(key):
            from trainer.augment import OPS, accepted_arguments, argument_hint

            stale = len(parts) == 4 and parts[2] in OPS and parts[3] not in accepted_arguments(parts[2])
            hint = argument_hint(parts[2], parts[3]) if stale else ""
            raise err(where, f"only an op's probability can be sampled (augment.ops.<Op>.p), not {key!r}{hint}; "
                             "set the op's other arguments in the fixed augment.ops, or sample augment.preset")
        if _op_name(key):
            names = [op.get("name") for op in base.augment.ops]
            if _op_name(key) not in names:
                raise err(where, f"op {_op_name(key)!r} is not in the fixed augment.ops ({names})")
            if not 0 <= v <= 1:
                raise err(where, f"an op probability must lie in [0, 1], got {v}")
            return
        try:
            base.with_overrides({key: v})
        except ConfigError as e:
            raise err(where, str(e)) from None

    if kind in ("float", "int"):
        low, high, log, step = spec.get("low"), spec.get("high"), bool(spec.get("log", False)), spec.get("step")
        for name, v in (("low", low), ("high", high)):
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise err(where, f"{name} must be a number, got {v!r}")
            if kind == "int" and not float(v).is_integer():
                raise err(where, f"{name} must be an integer for an int parameter, got {v!r}")
        if low > high:
            raise err(where, f"low {low} > high {high}")
        if log and low <= 0:
            raise err(where, f"log scale needs low > 0, got {low}")
        if step is not None and (not isinstance(step, (int, float)) or isinstance(step, bool) or step <= 0 or log):
            raise err(where, f"step must be a number > 0 and cannot be combined with log, got {step!r}")
        if kind == "int" and step is not None and not float(step).is_integer():
            raise err(where, f"step must be an integer for an int parameter, got {step!r}")
        if kind == "int":
            low, high = int(low), int(high)
            step = int(step) if step is not None else None
        else:
            low, high = float(low), float(high)
        check_value(low)
        check_value(high)
        return Param(key, kind, low, high, log, step, (), when)
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise err(where, "choices must be a non-empty list")
        for c in choices:
            if not isinstance(c, (str, int, float, bool)) and c is not None:
                raise err(where, f"choice {c!r}: Optuna choices must be str, int, float, bool or null")
            check_value(c)
            try:
                if key == "model.backbone":
                    check_backbone(c)
                elif key == "model.head":
                    check_head(c)
                elif key == "augment.preset" and c not in PRESETS:
                    raise ValueError(f"unknown augment preset {c!r} (known: {', '.join(PRESETS)})")
            except ValueError as e:
                raise err(where, str(e)) from None
        return Param(key, kind, choices=tuple(choices), when=when)
    raise err(where, f"type must be float, int or categorical, got {kind!r}")


def _named(spec, table: dict, what: str, err) -> dict:
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or "name" not in spec:
        raise err(what, "must be a name or a mapping with 'name'")
    name = spec["name"]
    if name not in table:
        raise err(f"{what}.name", f"unknown {what} {name!r} (known: {', '.join(table)})")
    args = {k: v for k, v in spec.items() if k != "name"}
    params = inspect.signature(table[name].__init__).parameters
    bad = [k for k in args if k not in params]
    if bad:
        raise err(what, f"{name} takes no argument(s) {bad} (takes: {', '.join(p for p in params if p != 'self')})")
    try:
        table[name](**args)
    except Exception as e:
        raise err(what, f"{name}({args}): {e}") from None
    return dict(spec)

"""The parsed log into MLflow (one run per entry) and into an Optuna study (a warm start).

MLflow: experiment ``legacy`` by default; a run per entry named like the entry (``exp127``,
``exp164-2``), started at the entry's date; params are the resolved TrainConfig keys, metrics the
``[RESULT]`` values, tags the rest (date, lineage, keep mark, dataset version, notes, source lines,
unmapped settings verbatim); the entry's own text is the run's description. Importing again
creates nothing new: an entry whose text is unchanged is skipped, an edited one is replaced.

Optuna: the entries that fall inside a space's distributions become COMPLETE trials of its study
(user attribute ``source=legacy``), valued by the CV the space's folds stand for (fold 0 for
``folds: [0]``, the 4-fold OOF CV for all four). They do not count towards a study's N.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from trainer.errors import UserError

from .mapping import Resolved, resolve
from .parse import Entry, parse_log

DEFAULT_EXPERIMENT = "legacy"
MAPPING_VERSION = "1"  # bump when mapping rules change: re-importing then replaces every run


def entry_metrics(entry: Entry) -> dict[str, float]:
    """``cv_fold0``, ``cv_fold1..3``, ``cv_oof``, ``lb`` (the first value of each kind the entry
    states) and every further value under a qualified key: ``_re1`` for a re-run, ``_vl``/``_ll``
    when picked by valid loss / log loss, ``_2`` for a second value of the same kind. ``score``
    repeats ``cv_fold0`` so legacy and study runs share a column in the MLflow UI."""
    out: dict[str, float] = {}

    def put(key: str, value: float | None, suffix: str) -> None:
        if value is None:
            return
        out.setdefault(key, value)  # the primary value of its kind: the first stated
        if suffix:
            k, n = key + suffix, 2
            while k in out and out[k] != value:
                k, n = f"{key}{suffix}_{n}", n + 1
            out[k] = value
        elif out[key] != value:
            k, n = f"{key}_2", 3
            while k in out and out[k] != value:
                k, n = f"{key}_{n}", n + 1
            out[k] = value

    for r in entry.results:
        suffix = (f"_re{r.rerun}" if r.rerun else "") + (f"_{r.selection}" if r.selection else "")
        put(f"cv_fold{r.fold}" if r.scope == "fold" else "cv_oof", r.cv, suffix)
        put("lb", r.lb, suffix)
        put("valid_loss", r.valid_loss, suffix)
        for fold, d in sorted(r.fold_details.items()):
            put(f"cv_fold{fold}", d.get("cv"), f"_{r.selection}" if r.selection else "")
            put(f"valid_loss_fold{fold}", d.get("vl"), f"_{r.selection}" if r.selection else "")
    if "cv_fold0" in out:
        out["score"] = out["cv_fold0"]
    return out


def _date_ms(entry: Entry) -> int | None:
    if not entry.date:
        return None
    t = datetime.strptime(entry.date, "%Y-%m-%d").replace(hour=12, tzinfo=timezone.utc)
    return int(t.timestamp() * 1000) + entry.lineno  # keeps the file order within a day


def _entry_text(lines: list[str], entry: Entry) -> str:
    return "\n".join(lines[entry.lineno - 1:entry.end_lineno]).rstrip()


@dataclass
class ImportSummary:
    """What `import_log` did. ``entries``: entries parsed; ``created``/``updated``/``unchanged``: runs
    made, replaced (the entry's text or mapping changed) and left as they were; ``with_result``: entries
    stating at least one metric; ``renamed``: entries whose name is not ``expNNN`` (repeated numbers,
    ``exp164-2``); ``unmapped_*``: setting lines no mapping rule understood (lower-cased; total, distinct,
    the 8 most common with their counts); ``run_ids``: entry name -> MLflow run id."""

    file: str
    experiment: str
    entries: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    with_result: int = 0
    renamed: list[str] = field(default_factory=list)
    unmapped_lines: int = 0
    unmapped_distinct: int = 0
    unmapped_top: list[tuple[str, int]] = field(default_factory=list)
    run_ids: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict, without ``run_ids``."""
        return {k: v for k, v in self.__dict__.items() if k != "run_ids"}


def _tags(r: Resolved, source: Path, text_hash: str) -> dict[str, str]:
    e = r.entry
    inherits = r.inherits_from or ""
    if inherits and r.implicit_base:
        inherits += " (implicit: the entry before it)"
    tags = {
        "source": "legacy", "legacy.entry": e.name, "legacy.number": str(e.number),
        "date": e.date or "", "based_on": e.based_on or "", "inherits_from": inherits,
        "keep": e.keep or "", "dataset_version": r.own.dataset_version or e.dataset_version or "",
        "source.file": source.name, "source.lines": f"{e.lineno}-{e.end_lineno}",
        "results": "\n".join(x.text for x in e.results),
        "notes": "\n".join(e.notes), "legacy.changed": "\n".join(e.changed),
        "legacy.unmapped": "\n".join(r.own.unmapped), "legacy.hash": text_hash,
    }
    if r.own.folds_evaluated:
        tags["folds_evaluated"] = str(r.own.folds_evaluated)
    return {k: v for k, v in tags.items() if v}


def import_log(path: str | Path, tracking_uri: str | None = None,
               experiment: str = DEFAULT_EXPERIMENT) -> tuple[ImportSummary, list[Resolved]]:
    """Import every entry of the log as an MLflow run (idempotent); returns a summary and the
    resolved entries (for `enqueue`)."""
    from collections import Counter

    from trainer.config import TrainConfig

    from ..tracking import Tracker

    path = Path(path)
    entries = parse_log(path)
    resolved = resolve(entries)
    lines = path.read_text(encoding="utf-8").splitlines()
    tracker = Tracker(tracking_uri, create=True)
    exp_id = tracker.ensure_experiment(experiment)
    tracker.set_experiment_tag(exp_id, "spinesweep.kind", "legacy")
    existing: dict[str, Any] = {}
    for run in tracker.search_runs([exp_id], "tags.source = 'legacy'"):
        existing[run.data.tags.get("legacy.entry", "")] = run
    summary = ImportSummary(file=str(path), experiment=experiment, entries=len(entries))
    unmapped: Counter = Counter()
    for r in resolved:
        e = r.entry
        text = _entry_text(lines, e)
        text_hash = hashlib.sha256(f"{MAPPING_VERSION}\n{r.inherits_from}\n{text}\n{sorted(r.params.items())}"
                                   .encode()).hexdigest()[:16]
        metrics = entry_metrics(e)
        summary.with_result += bool(metrics)
        unmapped.update(u.lower() for u in r.own.unmapped)
        if e.name != f"exp{e.number:03d}":
            summary.renamed.append(e.name)
        old = existing.get(e.name)
        if old is not None and old.data.tags.get("legacy.hash") == text_hash:
            summary.unchanged += 1
            summary.run_ids[e.name] = old.info.run_id
            continue
        if old is not None:
            tracker.delete_run(old.info.run_id)
        flat = TrainConfig().with_overrides(r.params).to_flat()
        params = {k: flat[k] for k in r.params}
        tags = {**_tags(r, path, text_hash), "mlflow.note.content": f"```\n{text}\n```"}
        run_id = tracker.create_run(exp_id, e.name, tags, start_time=_date_ms(e))
        tracker.log_batch(run_id, params=params, metrics=metrics)
        tracker.terminate(run_id, "FINISHED", _date_ms(e))
        summary.run_ids[e.name] = run_id
        if old is not None:
            summary.updated += 1
        else:
            summary.created += 1
    summary.unmapped_lines = sum(unmapped.values())
    summary.unmapped_distinct = len(unmapped)
    summary.unmapped_top = unmapped.most_common(8)
    return summary, resolved


# ------------------------------------------------------------------ warm start


@dataclass
class EnqueueSummary:
    """What `enqueue` did for one space and study. ``value``: the metric the trials are valued by
    (``cv_oof`` or ``cv_foldN``; ``-`` when the space's folds map to none); ``added``: entries added as
    trials; ``already``: entries the study had; ``outside``: entry -> why it was not added."""

    space: str
    study: str
    value: str
    added: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    outside: dict[str, str] = field(default_factory=dict)  # entry -> why

    def as_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict."""
        return dict(self.__dict__)


def _value_key(folds: tuple[int, ...]) -> str | None:
    if tuple(sorted(folds)) == (0, 1, 2, 3):
        return "cv_oof"
    if len(folds) == 1:
        return f"cv_fold{folds[0]}"
    return None


def _flat(key: str, value: Any) -> str:
    from trainer.config import TrainConfig

    return TrainConfig().with_overrides({key: value}).to_flat()[key]


def place_in_space(r: Resolved, space) -> tuple[dict[str, Any], str | None]:
    """The space's parameters an entry states (all inside their distributions), or why it lies
    outside the space."""
    for key, fixed in space.fixed.items():
        if key in r.params and _flat(key, r.params[key]) != _flat(key, fixed):
            return {}, f"{key}={_flat(key, r.params[key])} but the space fixes {_flat(key, fixed)}"
    values = {**space.fixed, **r.params}
    params: dict[str, Any] = {}
    for p in space.params:
        if not p.active(values) or p.key not in r.params:
            continue  # conditional and off, or the log does not say: left out of the trial
        v = r.params[p.key]
        if not p.contains(v):
            where = (f"not among the space's {len(p.choices)} choices" if p.type == "categorical"
                     else f"outside [{p.low}, {p.high}]")
            return {}, f"{p.key}={v} {where}"
        params[p.key] = v
    if not params:
        return {}, "states none of the space's parameters"
    return params, None


def enqueue(resolved: list[Resolved], space_name, storage_url: str | None = None,
            study_name: str | None = None, run_ids: dict[str, str] | None = None) -> EnqueueSummary:
    """Add the entries inside the space (a name, a path or a loaded `SearchSpace`) as COMPLETE
    trials of its study (created if needed), before any sampled trial. Idempotent: an entry
    already in the study is not added twice.

    Raises:
        SpaceError: the space cannot be loaded."""
    import optuna

    from ..space import SearchSpace, load_space
    from ..storage import make_storage
    from ..workspace import resolve_storage

    space = space_name if isinstance(space_name, SearchSpace) else load_space(space_name)
    study_name = study_name or space.name
    key = _value_key(space.folds)
    summary = EnqueueSummary(space=space.name, study=study_name, value=key or "-")
    storage = make_storage(resolve_storage(storage_url))
    study = None
    have: set = set()
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
        have = {t.user_attrs.get("legacy_entry") for t in study.get_trials(deepcopy=False)}
    except KeyError:
        pass
    for r in resolved:
        name = r.entry.name
        metrics = entry_metrics(r.entry)
        if key is None or key not in metrics:
            summary.outside[name] = f"no {key or 'CV for folds ' + str(list(space.folds))} stated"
            continue
        params, why = place_in_space(r, space)
        if why:
            summary.outside[name] = why
            continue
        if name in have:
            summary.already.append(name)
            continue
        if study is None:  # created only when there is something to add
            study = optuna.create_study(study_name=study_name, storage=storage, direction=space.direction)
            study.set_user_attr("space", space.name)
        elif study.direction.name.lower() != space.direction:
            raise UserError(f"study {study_name!r} is to {study.direction.name.lower()}, the space {space.name} "
                             f"to {space.direction}: choose another --study-name")
        dists = {p.key: p.distribution() for p in space.params if p.key in params}
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions=dists, value=metrics[key],
            user_attrs={"source": "legacy", "legacy_entry": name, "date": r.entry.date or "",
                        **({"mlflow_run_id": run_ids[name]} if run_ids and name in run_ids else {})}))
        summary.added.append(name)
    return summary

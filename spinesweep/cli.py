"""`optuna-run`: the one command line of spinesweep.

    optuna-run study SPACE [--n-trials N] [--workers K | --gpus 0,1] [--smoke] [--set key=value ...]
    optuna-run SPACE ...          (the same: a bare space name is the `study` command)
    optuna-run COMMAND ...        (optuna-run --help lists them; optuna-run COMMAND --help)

Shaped like Optuna's own CLI: every command is registered by name with `@command`, which names
the shared flags it takes (the parent parsers in `PARENTS`: `--data`, `--storage`,
`--tracking-uri`, `--study-name`; every command gets `--json`) and the function that adds its own
arguments, defined just above its handler. Handlers are plain module functions
``handler(args) -> exit code``; `parse(argv)` gives the namespace a handler takes, and `main(argv)`
runs one in this process. `emit` is the one way a command prints its result, as JSON with
``--json``. A `UserError` (bad input) or a bad argument is one line with exit code 2; any other
exception is a bug and keeps its traceback.

This module sits above `trainer/`, `sweep/` and `dashboards/` (it writes the dashboard when a
study ends); none of them imports it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sweep.workspace import (DEFAULT_PHANTOM, check_study_name, ensure_data, resolve_storage,
                             resolve_tracking_uri)
from trainer.errors import UserError

DEFAULT_LOG = Path(__file__).resolve().parent.parent / "legacy" / "manual_log.md"


# ------------------------------------------------------------------ argument types and output


def _whole_number(text: str, minimum: int, words: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{words} (got {value})")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    return _whole_number(text, 1, "must be positive")


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0 (a count that may be zero, a seed)."""
    return _whole_number(text, 0, "must be 0 or more")


def positive_float(text: str) -> float:
    """argparse type: a number > 0 (seconds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive (got {value:g})")
    return value


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``["optim.lr=3e-4", ...]`` -> ``{"optim.lr": "3e-4"}``.

    Raises:
        UserError: an item without ``=`` or without a key.
    """
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r}: expected key=value, e.g. optim.lr=3e-4")
        out[key.strip()] = value
    return out


def emit(args: argparse.Namespace, result: Any, text: Callable[[], None] | None = None) -> int:
    """Print a command's result: as JSON with ``--json`` (anything `json` can write, other
    objects through `str`) on the real standard output (`main` sends everything else a command
    prints to stderr then, so stdout parses), otherwise by calling `text` (which prints the
    human form). Returns 0."""
    if getattr(args, "json", False) or text is None:
        print(json.dumps(result, indent=2, default=str), file=getattr(args, "result_stream", None) or sys.stdout,
              flush=True)
    else:
        text()
    return 0


def print_table(rows: list[dict]) -> None:
    """Rows of dicts as aligned columns (``param:`` prefixes dropped from the header; floats with
    4 decimals; None as '-')."""
    def cell(v) -> str:
        if v is None:
            return "-"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    header = [k[6:] if k.startswith("param:") else k for k in rows[0]]
    table = [[cell(v) for v in r.values()] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


# ------------------------------------------------------------------ parent parsers and registration


def _parent(*add: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    for a in add:
        a(p)
    return p


PARENTS = {
    "data": _parent(lambda p: p.add_argument(
        "--data", metavar="DIR", help="RSNA-format data folder (default: the phantom in data/phantom, built on first use)")),
    "storage": _parent(lambda p: p.add_argument(
        "--storage", metavar="URL", help="Optuna storage URL (default: sqlite:///studies.db in the working folder)")),
    "tracking": _parent(lambda p: p.add_argument(
        "--tracking-uri", metavar="URI", help="MLflow tracking URI (default: SQLite under mlruns/ in the working folder)")),
    "study_name": _parent(lambda p: p.add_argument(
        "--study-name", metavar="NAME", help="the study's name (default: the space's name; a --smoke study is "
                                             "named SPACE-smoke)")),
    "json": _parent(lambda p: p.add_argument("--json", action="store_true", help="print the result as JSON")),
}


@dataclass(frozen=True)
class Command:
    """A registered command: its help line, the shared flags it takes (keys of `PARENTS`), the
    function that adds its own arguments, and its handler."""

    name: str
    help: str
    parents: tuple[str, ...]
    arguments: Callable[[argparse.ArgumentParser], None] | None
    handler: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, parents: tuple[str, ...] = (),
            arguments: Callable[[argparse.ArgumentParser], None] | None = None):
    """Register the decorated ``handler(args) -> exit code`` as the command `name`.

    Raises:
        ValueError: a second command of the same name (a registry refuses duplicates).
    """
    def register(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        if name in COMMANDS:
            raise ValueError(f"command {name!r} registered twice")
        COMMANDS[name] = Command(name, help, tuple(parents), arguments, handler)
        return handler
    return register


def _tracking(args) -> str:
    """The command's tracking URI (--tracking-uri, or the SQLite store under mlruns/). A server must
    answer within seconds (`probe_server`): MLflow's client would otherwise retry a refused
    connection for minutes before the command said anything.

    Raises:
        TrackingError: a folder (MLflow's file store) or an unknown scheme, or an http(s) tracking
            server that does not answer (or is not MLflow)."""
    from sweep.tracking import check_tracking_uri, probe_server

    uri = resolve_tracking_uri(getattr(args, "tracking_uri", None))
    check_tracking_uri(uri)  # a folder or an unknown scheme: one line, before any slow step
    if uri.startswith(("http://", "https://")):
        probe_server(uri)
    return uri


def _storage(args) -> str:
    return resolve_storage(getattr(args, "storage", None))


# ------------------------------------------------------------------ the study


def _study_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("space", help="a name in search_spaces/ or a path to a YAML file")
    p.add_argument("--n-trials", type=positive_int, metavar="N",
                   help="the study's total number of trials (default: the space's)")
    p.add_argument("--timeout", type=positive_float, metavar="S", help="stop asking for trials after this many seconds")
    p.add_argument("--gpus", metavar="IDS", help="one worker process per GPU id, e.g. 0,1,2,3 (repeat an id for several: 0,0,1,1)")
    p.add_argument("--trials-per-gpu", type=positive_int, metavar="K",
                   help="K concurrent trials on each GPU of --gpus (default: every visible GPU); "
                        "small models leave a large GPU mostly idle with one")
    p.add_argument("--workers", type=positive_int, metavar="K", help="CPU worker processes (cores split between them)")
    p.add_argument("--smoke", action="store_true", help="caps for a quick check: 1 epoch, tiny images and model")
    p.add_argument("--set", action="append", metavar="key=value", help="pin a config value, never sampled (repeatable)")
    p.add_argument("--resume", action="store_true", help="add to an existing study (N stays the study's total)")


@command("study", "an Optuna study of a search space (also: optuna-run SPACE)",
         parents=("data", "storage", "tracking", "study_name"), arguments=_study_arguments)
def study(args: argparse.Namespace) -> int:
    from sweep.study import run_study

    outcome = run_study(args.space, args.n_trials, data=args.data, study_name=args.study_name,
                        storage=args.storage, tracking_uri=args.tracking_uri, workers=args.workers,
                        gpus=args.gpus, trials_per_gpu=args.trials_per_gpu, smoke=args.smoke,
                        pinned=parse_overrides(args.set or []), resume=args.resume, timeout=args.timeout,
                        log=lambda line: print(line, flush=True))
    dashboard = write_dashboard(outcome)
    return emit(args, _study_summary(outcome, dashboard), lambda: _print_summary(outcome, args, dashboard))


def write_dashboard(outcome) -> str | None:
    """Every study ends with its report written (dashboards/STUDY.html); a failure here is a
    warning, never a lost study."""
    from dashboards.report import write_report
    from sweep.tracking import Tracker

    name = outcome.study.study_name
    out = Path("dashboards") / f"{name}.html"
    try:
        write_report(outcome.study, out, tracker=Tracker(outcome.tracking_uri))
        return str(out)
    except Exception as e:  # the study is in the stores already
        print(f"warning: the dashboard could not be written ({type(e).__name__}: {e}); "
              f"retry with: optuna-run dashboard {name}", file=sys.stderr)
        return None


def _study_summary(outcome, dashboard: str | None) -> dict:
    from sweep.trials import best_trial

    best = best_trial(outcome.study)
    return {"study": outcome.study.study_name, "counts": outcome.counts, "seconds": round(outcome.seconds, 2),
            "parent_run_id": outcome.parent_run_id, "experiment_id": outcome.experiment_id,
            "best": None if best is None else {"trial": best.number, "score": best.value, "params": best.params,
                                               "run_id": best.user_attrs.get("mlflow_run_id")},
            "dashboard": dashboard}


def _print_summary(outcome, args, dashboard: str | None = None) -> None:
    from sweep.tracking import redact, view_url
    from sweep.trials import best_imported, best_trial

    study, name = outcome.study, outcome.study.study_name
    notes = {"LEGACY": " (imported from the manual log)", "SKIPPED": " (sampled duplicates, not run)"}
    counts = ", ".join(f"{v} {k.lower()}" + notes.get(k, "")
                       for k, v in outcome.counts.items() if v)
    print(f"\nstudy {name}: {counts} ({outcome.seconds / 60:.1f} min)")
    best = best_trial(study)  # the study's own trials, as promote, runs and the dashboard pick it
    imported = best_imported(study)
    if imported is not None:
        print(f"best imported entry {imported.user_attrs.get('legacy_entry', '?')} (trial {imported.number}, "
              f"imported from the manual log, not run here): score {imported.value:.4f}")
    if best is None:
        print("no trial completed")
        return
    prior = best.user_attrs.get("prior_score")
    ratio = f", {best.value / prior:.2f} x the prior's {prior:.4f}" if prior else ""
    print(f"best trial {best.number}: score {best.value:.4f}{ratio}")
    for k, v in best.params.items():
        print(f"  {k} = {v}")
    print(f"  MLflow run {best.user_attrs.get('mlflow_run_id')}")
    uri = "" if args.tracking_uri is None else f" --tracking-uri {redact(args.tracking_uri)}"
    print("\nnext:")
    if dashboard:
        print(f"  dashboard written: {dashboard}   (open file://{Path(dashboard).resolve()} in a browser)")
    print(f"  optuna-run ui{uri}            # the MLflow UI on http://127.0.0.1:5000: every trial, curves, artifacts"
          f"\n      then {view_url('http://127.0.0.1:5000', outcome.experiment_id)}"
          f"   (this study's trials, best first, score and sampled parameters as columns)"
          f"\n  optuna-run runs {name}{uri}      # the trials as a table"
          f"\n  optuna-run dashboard {name}      # rewrite the dashboard after more trials")


# ------------------------------------------------------------------ data and training


def _make_phantom_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="the folder to write (created)")
    p.add_argument("--studies", type=positive_int, default=DEFAULT_PHANTOM["studies"],
                   help="training studies (default: %(default)s)")
    p.add_argument("--test-studies", type=non_negative_int, default=DEFAULT_PHANTOM["test_studies"],
                   help="test studies, unlabelled (default: %(default)s)")
    p.add_argument("--seed", type=non_negative_int, default=DEFAULT_PHANTOM["seed"], help="the same seed writes the same data (default: %(default)s)")
    p.add_argument("--jobs", type=positive_int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    p.add_argument("--scale", choices=["small", "real"], default="small",
                   help="small (default): 192-288 px, a few RLE files, fast on a CPU; real: the competition's "
                        "sizes (384-640 px, 13-21 sagittal slices, 1-3 axial series of mostly 15-50 slices, "
                        "every file RLE lossless 12-bit)")


@command("make-phantom", "write a phantom dataset in the RSNA 2024 layout", arguments=_make_phantom_arguments)
def make_phantom(args: argparse.Namespace) -> int:
    import time

    from trainer.data.phantom import make_phantom as write

    t0 = time.perf_counter()
    summary = write(Path(args.dir), studies=args.studies, test_studies=args.test_studies,
                    seed=args.seed, jobs=args.jobs, scale=args.scale, progress=not args.json)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return emit(args, summary, lambda: print(
        f"phantom dataset ({args.scale}) in {args.dir}: {summary['studies']} train + {summary['test_studies']} "
        f"test studies, {summary['series']} series, {summary['files']} DICOM files "
        f"({summary['bytes'] / 2**20:.0f} MB), {summary['points']} labelled points, grades {summary['grades']} "
        f"({summary['seconds']} s)"))


def _data_check_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", help="cache folder (default: $SPINESWEEP_CACHE or ~/.cache/spinesweep)")
    p.add_argument("--cache-budget", metavar="SIZE",
                   help="disk budget of the volume cache, e.g. 200GB; least recently used series are evicted "
                        "beyond it (default: $SPINESWEEP_CACHE_BUDGET or 64GB; trials: data.cache_budget_gb)")
    p.add_argument("--jobs", type=positive_int, default=len(os.sched_getaffinity(0)),
                   help="processes that decode DICOM series not cached yet (default: every core)")


def data_check(args: argparse.Namespace) -> int:
    """`optuna-run data check`."""
    from trainer.config import DataConfig
    from trainer.data.check import check_data
    from trainer.data.crops import CropSpec
    from trainer.data.volumes import cache_budget, parse_size

    data = ensure_data(args.data)
    spec = CropSpec.from_config(DataConfig(data_dir=str(data)))
    budget = parse_size(args.cache_budget) if args.cache_budget else cache_budget()
    summary = check_data(data, spec, cache_dir=args.cache_dir or "", progress=not args.json,
                         jobs=args.jobs, budget=budget)

    def text() -> None:
        print(f"data check of {summary['data_dir']}")
        for k in ("studies", "series", "points", "samples", "crops_expected", "crops_built", "unlabelled_blocks"):
            print(f"  {k:<18} {summary[k]}")
        print(f"  {'failures':<18} {sum(summary['failures'].values())} {summary['failures'] or ''}")
        for reason, examples in summary["failure_examples"].items():
            more = summary["failures"][reason] - len(examples)
            print(f"    {reason}: e.g. " + "; ".join(examples) + (f" (and {more} more)" if more > 0 else ""))
        if summary["fallbacks"]:
            print(f"  {'fallbacks':<18} {summary['fallbacks']}")
        print(f"  decoded {summary['series_decoded']} series ({summary['decode_jobs']} processes, "
              f"{summary['decode_seconds']} s), {summary['series_from_cache']} from cache; cache "
              f"{summary['cache_bytes'] / 2**30:.2f} of {summary['cache_budget'] / 2**30:.0f} GiB; {summary['seconds']} s")
    return emit(args, summary, text)


def _data_audit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--oof", metavar="FILE.csv", help="a localiser's out-of-fold points (a trial's oof.csv, or coordinate rows as "
                   "`optuna-run localize` writes them): also flag labelled points far from them")
    p.add_argument("--far-mm", type=positive_float, default=15.0,
                   help="how far is far from the localiser (default: %(default)s mm)")
    p.add_argument("--out", default="audit.csv", help="the review list (default: audit.csv)")


def data_audit(args: argparse.Namespace) -> int:
    """`optuna-run data audit`."""
    from trainer.points.audit import audit_folder
    from trainer.points.metrics import competition_form

    found = audit_folder(ensure_data(args.data), args.oof, args.far_mm)
    # the label file's spelling ("Spinal Canal Stenosis", "L1/L2"), so the list joins train_label_coordinates.csv
    rows = competition_form(found)
    rows[["reason", "detail", "badness"]] = found[["reason", "detail", "badness"]]
    rows.to_csv(args.out, index=False)
    counts = found["reason"].value_counts().to_dict()
    return emit(args, {"path": args.out, "points": len(found), "by_reason": counts}, lambda: print(
        f"{args.out}: {len(found)} labelled points to review, worst first {counts or ''}"))


DATA_ACTIONS: dict[str, tuple[str, Callable, Callable]] = {
    "check": ("decode every series into the volume cache, cut every crop, report failures by reason",
              _data_check_arguments, data_check),
    "audit": ("labelled points that are impossible or far from a localiser's, worst first, as a CSV",
              _data_audit_arguments, data_audit),
}


def _data_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True, parser_class=_Parser)
    for name, (help_, arguments, handler) in DATA_ACTIONS.items():
        action = sub.add_parser(name, parents=[PARENTS["data"], PARENTS["json"]], help=help_, description=help_)
        arguments(action)
        action.set_defaults(action=handler)


@command("data", "data folder tools (data check, data audit)", arguments=_data_arguments)
def data(args: argparse.Namespace) -> int:
    return args.action(args)


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TrainConfig YAML (default: built-in defaults)")
    p.add_argument("--output-dir", help="where the checkpoint goes (default: a temporary folder)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=3e-4")


@command("train", "one training run of a config (the manual log's workflow); --json: the per-epoch table "
         "goes to stderr", parents=("data",), arguments=_train_arguments)
def train(args: argparse.Namespace) -> int:
    from sweep.space import check_buildable
    from trainer.config import TrainConfig
    from trainer.models.weights import check_pretrained
    from trainer.report import EpochTable, result_summary

    cfg = TrainConfig.from_yaml(args.config) if args.config else TrainConfig()
    overrides = parse_overrides(args.overrides)
    if args.output_dir:
        overrides["output_dir"] = args.output_dir
    cfg = cfg.with_overrides(overrides)  # validates before any data is touched
    check_buildable(cfg)  # names checked before anything is built or downloaded
    check_pretrained([cfg.model.backbone], [cfg.model.pretrained], cfg.model.weights_dir,
                     warn=lambda line: print(line, file=sys.stderr))
    if args.data or cfg.data.data_dir == TrainConfig().data.data_dir:  # the phantom, built on first use
        cfg = cfg.with_overrides({"data.data_dir": str(ensure_data(args.data))})
    from trainer.fit import fit

    table = EpochTable(sys.stderr if args.json else sys.stdout)
    result = fit(cfg, callbacks=[table], progress=table.progress)
    table.close()
    summary = result_summary(result)

    def text() -> None:
        print(f"best epoch {summary['best_epoch']}: score {summary['score']:.4f} "
              f"(prior {summary['prior_score']:.4f}, ratio {summary['score'] / summary['prior_score']:.3f})")
        print("  " + ", ".join(f"{k} {v:.4f}" for k, v in summary["groups"].items()))
        print(f"  checkpoint {summary['checkpoint']}")
    return emit(args, summary, text)


# ------------------------------------------------------------------ looking at results


def _runs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("space", help="space (or study) name: its MLflow experiment")
    p.add_argument("--top", type=positive_int, default=None, metavar="K", help="only the K best")
    p.add_argument("--where", metavar="FILTER",
                   help="an MLflow search filter, e.g. \"params.`model.backbone` = 'tf_efficientnet_b3.ns_jft_in1k'\"")
    p.add_argument("--lineage", metavar="ENTRY", help="(imported log) an entry and its chain of bases")


@command("runs", "a study's trials (or the imported log's entries) from MLflow as a table", parents=("tracking",),
         arguments=_runs_arguments)
def runs(args: argparse.Namespace) -> int:
    from sweep.query import lineage, runs_table

    if args.lineage:
        rows = lineage(args.lineage, experiment=args.space, tracking_uri=_tracking(args))
    else:
        rows = runs_table(args.space, tracking_uri=_tracking(args), top=args.top, where=args.where)
    return emit(args, rows, lambda: print_table(rows) if rows else print("no runs"))


def _reproduce_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_id", help="the trial's MLflow run id (optuna-run runs SPACE lists them)")


@command("reproduce", "re-run a logged trial from its logged config (the run's config.yaml)", parents=("tracking", "data"),
         arguments=_reproduce_arguments)
def reproduce(args: argparse.Namespace) -> int:
    from sweep.query import reproduce as rerun

    out = rerun(args.run_id, tracking_uri=_tracking(args), data_dir=args.data,
                log=lambda line: print(line, file=sys.stderr, flush=True))  # stdout: the result only
    return emit(args, out, lambda: print(
        f"run {args.run_id}: logged score {out['logged_score']:.6f}, reproduced {out['score']:.6f} "
        f"(difference {abs(out['score'] - out['logged_score']):.2e})"))


def _dashboard_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", help="the study (by default a space's study has the space's name)")
    p.add_argument("--out", help="the HTML file (default: dashboards/STUDY.html)")


@command("dashboard", "a self-contained HTML report of a study (plotly, works offline)",
         parents=("storage", "tracking"), arguments=_dashboard_arguments)
def dashboard(args: argparse.Namespace) -> int:
    from dashboards.report import write_report
    from sweep.storage import open_study
    from sweep.stores import missing_sqlite
    from sweep.tracking import Tracker, redact

    study = open_study(_storage(args), args.study)
    uri = _tracking(args)
    tracker = None if missing_sqlite(uri) else Tracker(uri)  # a study without MLflow runs still has a report
    out = Path(args.out or f"dashboards/{check_study_name(args.study)}.html")
    summary = write_report(study, out, tracker=tracker, tracking_uri=redact(uri))
    return emit(args, summary, lambda: print(
        f"dashboard of study {args.study}: {out} ({len(summary['figures'])} figures"
        + (f"; empty: {', '.join(summary['empty'])}" if summary["empty"] else "") + ")"
        + f"\nopen it in a browser: file://{out.resolve()}"))


# ------------------------------------------------------------------ from a study to a submission


def _promote_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("space", help="the space (its study) or a study name")
    p.add_argument("--trial", type=int, metavar="N", help="trial number (default: the best)")
    p.add_argument("--run-id", help="or the trial's MLflow run id")
    p.add_argument("--folds", choices=["all", "evaluated"], default="all",
                   help="train the folds the trial was not evaluated on (all, default) or not")
    p.add_argument("--ensemble", default="default", help="the ensemble it joins (default: default)")
    # not the shared --data: here it has no default (the trial's own data folder is used)
    p.add_argument("--data", metavar="DIR", help="data folder, if it moved since the study")


@command("promote", "a trial to the model registry, trained on every fold (an ensemble member; a localiser: "
         "spinesweep-localizer@champion)",
         parents=("storage", "tracking", "study_name"), arguments=_promote_arguments)
def promote(args: argparse.Namespace) -> int:
    from sweep.promote import promote as promote_trial

    r = promote_trial(args.study_name or args.space, _storage(args), _tracking(args), trial=args.trial,
                      run_id=args.run_id, all_folds=args.folds == "all", data_dir=args.data, ensemble=args.ensemble)

    def text() -> None:
        if r.already:
            print(f"trial {r.trial} (run {r.run_id}) is already promoted: {r.model} version {r.version}; nothing done")
            return
        trained = f", trained fold(s) {r.trained_folds} as child runs" if r.trained_folds else ""
        aliases = ", ".join(r.aliases)
        if r.task == "localize":
            print(f"promoted localiser trial {r.trial} -> {r.model} version {r.version} (aliases {aliases}){trained}"
                  f"\n  OOF point error over folds {r.folds}: {r.oof_score:.2f} mm "
                  + " ".join(f"{k} {v:.3g}" for k, v in r.groups.items())
                  + f"\n  its out-of-fold points: models:/{r.model}/{r.version} artifact oof_coordinates.csv")
            print("next: optuna-run predict --out submission.csv    # crops cut around its points "
                  "(models:/spinesweep-localizer@champion)")
            return
        print(f"promoted trial {r.trial} -> {r.model} version {r.version} (alias {aliases}, ensemble "
              f"{args.ensemble!r}){trained}\n  OOF score over folds {r.folds}: {r.oof_score:.4f} "
              + " ".join(f"{k} {v:.4f}" for k, v in r.groups.items()))
        print("next: optuna-run ensemble    # combine the promoted members")
    return emit(args, r.__dict__, text)


def _ensemble_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default="default", help="the ensemble (default: default)")
    p.add_argument("--weights", choices=["equal", "optimize"], default="optimize",
                   help="optimize (default): fitted on OOF, kept only if a cross-fit over studies says so")


@command("ensemble", "combine the promoted members on their OOF predictions", parents=("tracking",),
         arguments=_ensemble_arguments)
def ensemble(args: argparse.Namespace) -> int:
    from sweep.ensemble import ensemble as combine

    r = combine(_tracking(args), args.name, args.weights)

    def text() -> None:
        groups = list(r.groups)
        # points: where each member's validation crops were cut (labelled points, or a localiser's
        # out-of-fold points as on the leaderboard: data.val_points), so its score's kind
        rows = [{"member": m["member"], "points": m.get("points", "labelled"), "weight": w, "score": m["score"],
                 **{g: m.get(g) for g in groups}} for m, w in zip(r.members, r.weights)]
        kinds = sorted({row["points"] for row in rows})
        rows.append({"member": f"ensemble {r.name!r} ({r.method})", "points": ",".join(kinds),
                     "weight": sum(r.weights), "score": r.score, **r.groups})
        print_table(rows)
        if len(kinds) > 1:
            print("note: the members were scored on different validation points (points column: labelled points vs "
                  "a localiser's out-of-fold points): their scores, and weights fitted on them, compare unlike things")
        if r.held_out:
            print("held-out (cross-fit over studies: weights fitted on the other studies): "
                  + ", ".join(f"{k} {v:.4f}" for k, v in r.held_out.items()) + f" -> {r.method}")
        print(f"logged as MLflow run {r.run_id} (experiment ensembles)\nnext: optuna-run predict --out submission.csv")
    return emit(args, r.__dict__, text)


def _predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ensemble", default="default", help="the ensemble (default: default)")
    p.add_argument("--out", default="submission.csv", help="the submission file (default: submission.csv)")
    p.add_argument("--device", default="cpu", help="torch device for inference (default: cpu)")
    p.add_argument("--localizer", metavar="URI",
                   help="where the crops are cut: models:/spinesweep-localizer@champion (any models:/ URI of a "
                        "promoted localiser), a localiser checkpoint file or folder, runs:/RUN_ID, study:NAME, best, "
                        "or prior (the mean-position guess); default: the promoted localiser when registered, else "
                        "the best trial of the study 'localizer', else the guess (with a warning)")


@command("predict", "the ensemble on the test studies: a Kaggle submission", parents=("tracking", "data"),
         arguments=_predict_arguments)
def predict(args: argparse.Namespace) -> int:
    from sweep.predict import check_ready
    from sweep.predict import predict as submit

    uri = _tracking(args)
    check_ready(uri, args.ensemble, args.device)  # before the data is built (the phantom: seconds)
    data_dir = ensure_data(args.data)
    out = submit(str(data_dir), args.out, uri, args.ensemble, args.device, localizer=args.localizer)
    filled = (f"; conditions no member covers, filled with the training label frequencies: "
              f"{', '.join(out['filled_with_label_prior'])}" if out["filled_with_label_prior"] else "")
    fell_back = (f"; {out['fallback_rows']} rows of {len(out['fallback_studies'])} studies fell back to the "
                 "training label frequencies (their crops could not be built: see above)" if out["fallback_rows"] else "")
    return emit(args, out, lambda: print(
        f"submission {out['path']}: {out['rows']} rows for {out['studies']} test studies, "
        f"{len(out['members'])} member(s), weights {[round(w, 3) for w in out['weights']]}{filled}{fell_back}; "
        f"points by {out['points']}"))


def _localize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", choices=["test", "train"], default="test", help="which studies (default: test)")
    p.add_argument("--model", metavar="URI", help="the localiser: models:/spinesweep-localizer@champion (any "
                   "models:/ URI of a promoted localiser), a checkpoint file or folder, runs:/RUN_ID, study:NAME, best "
                   "(the best trial of the study 'localizer'), or prior (the mean-position guess); default: the "
                   "promoted localiser when registered, else best")
    p.add_argument("--out", required=True, metavar="FILE.csv", help="the points file to write")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")


@command("localize", "every study's points by a localiser, in the train_label_coordinates.csv form",
         parents=("tracking", "data"), arguments=_localize_arguments)
def localize(args: argparse.Namespace) -> int:
    from sweep.localize import CHAMPION_URI, localize_to_csv, reads_tracking
    from sweep.tracking import TrackingError, require_store

    uri = _tracking(args)
    if reads_tracking(args.model):  # said before the data is built
        try:
            require_store(uri)
        except TrackingError as e:
            raise UserError(f"localiser {args.model or CHAMPION_URI + ' (the default), else best'}: {e}; or name "
                            f"a localiser checkpoint, or prior, with --model") from None
    out = localize_to_csv(ensure_data(args.data), args.out, uri, args.model, args.split, args.device)
    return emit(args, out, lambda: print(
        f"{out['path']}: {out['rows']} points of {out['studies']} {out['split']} studies, by {out['localizer']}"))


# ------------------------------------------------------------------ the manual log


def _import_log_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", nargs="?", help="the log (default: legacy/manual_log.md)")
    p.add_argument("--experiment", default="legacy", help="MLflow experiment (default: legacy)")
    p.add_argument("--enqueue", metavar="SPACE", help="add the entries inside SPACE to its study as completed trials")
    p.add_argument("--verbose", action="store_true", help="list every entry outside the space")


@command("import-log", "the manual experiment log as MLflow runs (and a study warm start)",
         parents=("tracking", "storage", "study_name"), arguments=_import_log_arguments)
def import_log(args: argparse.Namespace) -> int:
    from sweep.legacy.importer import enqueue
    from sweep.legacy.importer import import_log as import_entries

    from sweep.space import load_space

    path = Path(args.file) if args.file else DEFAULT_LOG
    if not path.is_file():
        raise UserError(f"{path}: no such log file")
    space = load_space(args.enqueue) if args.enqueue else None  # a bad name is said before any store is made
    summary, resolved = import_entries(path, tracking_uri=_tracking(args), experiment=args.experiment)
    out = {"import": summary.as_dict()}
    if space is not None:
        out["enqueue"] = enqueue(resolved, space, storage_url=_storage(args), study_name=args.study_name,
                                 run_ids=summary.run_ids).as_dict()
    return emit(args, out, lambda: _print_import(summary, out.get("enqueue"), args.verbose))


def _print_import(s, q: dict | None, verbose: bool) -> None:
    print(f"{s.file}: {s.entries} entries -> MLflow experiment {s.experiment!r}: {s.created} runs created, "
          f"{s.updated} updated, {s.unchanged} unchanged; {s.with_result} entries with a result")
    if s.renamed:
        print(f"  repeated entry numbers kept apart as: {', '.join(s.renamed)}")
    print(f"  {s.unmapped_lines} setting lines kept verbatim (tag legacy.unmapped), {s.unmapped_distinct} distinct; "
          f"most frequent:")
    for text, n in s.unmapped_top:
        print(f"    {n:4d}  {text}")
    if q:
        print(f"warm start of study {q['study']!r} (space {q['space']}, value {q['value']}): "
              f"{len(q['added'])} trials added, {len(q['already'])} already there, {len(q['outside'])} entries outside")
        by_reason: dict[str, list[str]] = {}
        for name, why in q["outside"].items():
            by_reason.setdefault(why, []).append(name)
        for why, names in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
            shown = names if verbose or len(names) <= 6 else names[:5] + [f"... {len(names) - 5} more"]
            print(f"    {len(names):4d}  {why}: {', '.join(shown)}")
        if q["added"]:
            print(f"next: optuna-run {q['space']} --n-trials N   # the sampler starts from these trials")
    print(f"query: optuna-run runs {s.experiment} --top 5    |    optuna-run runs {s.experiment} --lineage exp127")


# ------------------------------------------------------------------ MLflow servers


def serve(cmd: list[str], grace: float = 10.0) -> int:
    """Run an MLflow server command in its own process group until it ends, or until this process
    gets SIGTERM, SIGINT or SIGHUP: then the whole group (the server and its workers) is stopped,
    so `kill` of optuna-run never leaves a server answering on its port. The server runs without
    MLflow's job runner unless asked (`sweep.tracking.server_env`). Returns the server's exit code
    (0 when stopped by a signal)."""
    import signal
    import subprocess

    from sweep.tracking import server_env

    try:  # the server writes where this command's output goes: stderr under --json (`main`), so
        # stdout carries the start line's JSON alone
        out = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stream without a file descriptor
        out = None
    child = subprocess.Popen(cmd, start_new_session=True, env=server_env(), stdout=out)

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        return child.wait()
    except KeyboardInterrupt:
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(child.pid, sig)
            except ProcessLookupError:
                break
            try:
                child.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):  # a worker of the server that outlived it
            os.killpg(child.pid, signal.SIGKILL)
        print("optuna-run: server stopped", file=sys.stderr, flush=True)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _bind(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=positive_int, default=5000, help="port (default: 5000)")


def _announce(args, info: dict, line: str) -> None:
    """A server's start line: JSON with --json (one object, before the server's own output)."""
    if args.json:
        emit(args, info)
    else:
        print(line, flush=True)


@command("ui", "the MLflow UI on the project's tracking store", parents=("tracking",), arguments=_bind)
def ui(args: argparse.Namespace) -> int:
    from sweep.tracking import redact, require_store

    uri = _tracking(args)
    require_store(uri)
    url = f"http://{args.host}:{args.port}"
    _announce(args, {"url": url, "tracking_uri": redact(uri)},
              f"MLflow UI on {url} (store {redact(uri)}); Ctrl-C stops it")
    return serve([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
                  "--port", str(args.port)])


def _server_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend-store-uri", required=True, help="e.g. postgresql://user:pw@dbhost/mlflow")
    p.add_argument("--artifacts-destination", required=True, help="a folder (or s3://...) the server writes to")
    _bind(p)
    p.add_argument("--workers", type=positive_int, default=2, help="server worker processes (default: 2)")


@command("server", "an MLflow tracking server for studies shared by several hosts (runs in a database, "
         "artifacts proxied by the server, so hosts need no shared file system)", arguments=_server_arguments)
def server(args: argparse.Namespace) -> int:
    from sweep.stores import normalize_db_url
    from sweep.tracking import Tracker, redact

    backend = normalize_db_url(args.backend_store_uri)
    artifacts = args.artifacts_destination
    if "://" not in artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        artifacts = Path(artifacts).resolve().as_uri()
    try:
        Tracker(backend, create=True)  # creates the schema once (under a lock), whoever starts first
    except Exception as e:
        raise UserError(f"--backend-store-uri {redact(backend)} cannot be opened: {type(e).__name__}: "
                        f"{redact(str(e).splitlines()[0] if str(e) else '')}") from None
    public = args.host not in ("127.0.0.1", "localhost", "::1")
    shown = args.host if args.host != "0.0.0.0" else "<this host>"
    _announce(args, {"url": f"http://{args.host}:{args.port}", "backend_store_uri": redact(backend),
                     "artifacts_destination": artifacts},
              f"MLflow tracking server on http://{args.host}:{args.port} (runs in {redact(backend)}, artifacts in "
              f"{artifacts}); hosts use --tracking-uri http://{shown}:{args.port}")
    if public:
        print("warning: the server is reachable from the network and MLflow has no authentication here: "
              "keep it behind a firewall or an SSH tunnel", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, "--artifacts-destination",
           artifacts, "--serve-artifacts", "--host", args.host, "--port", str(args.port),
           "--workers", str(args.workers)]
    return serve(cmd + (["--allowed-hosts", "*"] if public else []))


# ------------------------------------------------------------------ parsers and main


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in the project's one-line form (exit 2), not usage + message."""

    def error(self, message: str):
        where = "" if self.prog == "optuna-run" else f"{self.prog.removeprefix('optuna-run ')}: "
        self.exit(2, f"optuna-run: error: {where}{message} (see {self.prog} --help)\n")


def versions() -> dict[str, str]:
    """What `--version` prints: spinesweep's version and git commit, Python's, and the key
    libraries' (`sweep.tracking.package_versions`, the ``version.*`` tags every run records)."""
    import platform

    from sweep.tracking import git_commit, package_versions

    found = package_versions()
    return {"spinesweep": found.pop("spinesweep", "?"), "git": git_commit() or "unknown",
            "python": platform.python_version(), **found}


def _print_versions(args: argparse.Namespace) -> int:
    v = versions()
    return emit(args, v, lambda: print("\n".join(
        [f"spinesweep {v.pop('spinesweep')} (git {v.pop('git')}), python {v.pop('python')}"]
        + [f"  {k} {x}" for k, x in v.items()])))


def build_parser() -> argparse.ArgumentParser:
    """The `optuna-run` parser: every registered command, each with its shared flags and `--json`."""
    p = _Parser(
        prog="optuna-run", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Hyperparameter search and experiment tracking for spine MRI (Optuna + MLflow).\n\n"
                    "  optuna-run SPACE [--n-trials N] [options]   an Optuna study of a search space "
                    "(the `study` command; optuna-run study --help)\n"
                    "  optuna-run COMMAND [options]                the commands below",
        epilog="A study: optuna-run demo --n-trials 12; then optuna-run ui, optuna-run runs demo, optuna-run promote demo.")
    p.add_argument("--version", action="store_true", help="print spinesweep's and its key libraries' versions, and exit")
    # --json before the command (optuna-run --json runs demo) as after it; a command's own --json sets `json`
    p.add_argument("--json", action="store_true", dest="json_first", help="print the result as JSON")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands", parser_class=_Parser)
    for c in COMMANDS.values():
        cp = sub.add_parser(c.name, help=c.help, description=c.help,
                            parents=[PARENTS[x] for x in c.parents] + [PARENTS["json"]])
        if c.arguments is not None:
            c.arguments(cp)
        cp.set_defaults(func=c.handler)
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    """The namespace a handler takes. A first word that is neither a command nor a flag is a
    search space: ``optuna-run demo ...`` is ``optuna-run study demo ...``.

    Raises:
        SystemExit: a bad argument (code 2, after one line on stderr) or --help (code 0).
    """
    argv = list(argv)
    parser = build_parser()
    first = _first_word(parser, argv)
    if first is not None and argv[first] not in COMMANDS:
        argv.insert(0, "study")  # optuna-run demo ..., and flags before the space: optuna-run --smoke demo
    return parser.parse_args(argv)


def _first_word(parser: argparse.ArgumentParser, argv: list[str]) -> int | None:
    """The index of the first word of `argv` that is neither a flag nor a flag's value (a command
    or a search space), or None. A flag's arity is looked up in the top-level parser, then in the
    `study` command's (the flags that may come before a space); ``--flag=value`` is one word."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    known = {**sub.choices["study"]._option_string_actions, **parser._option_string_actions}
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            return i + 1 if i + 1 < len(argv) else None
        if not word.startswith("-") or word == "-":
            return i
        action = known.get(word.split("=", 1)[0])
        takes_value = action is not None and action.nargs != 0 and "=" not in word
        i += 2 if takes_value else 1
    return None


def _quiet_optuna() -> None:
    """Optuna's INFO lines ("A new study created ...") and its experimental-feature warnings about
    the heartbeat every storage here is opened with are not a command's output: its own lines say
    what happened (a study's progress lines, a command's result)."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning,
                            message=r".*(heartbeat|RetryHeartbeatStaleTrialCallback)")


def main(argv: list[str] | None = None) -> int:
    """Run one `optuna-run` command in this process; returns its exit code (0 done, 2 bad input or
    arguments, 130 interrupted)."""
    try:
        args = parse(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # argparse's own exit: --help or a bad argument
        return e.code if isinstance(e.code, int) else 2
    args.json = getattr(args, "json", False) or args.json_first
    if args.version:
        return _print_versions(args)
    if not getattr(args, "func", None):
        build_parser().print_help()
        return 2
    _quiet_optuna()
    try:
        if not args.json:
            return args.func(args)
        # --json: stdout carries the result alone (`emit`); progress and notes go to stderr
        args.result_stream = sys.stdout
        with contextlib.redirect_stdout(sys.stderr):
            return args.func(args)
    except UserError as e:  # bad input: one line; anything else is a bug and keeps its traceback
        print(f"optuna-run: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("optuna-run: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

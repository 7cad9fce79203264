"""`optuna-run`: the one command line of spinesweep.

    optuna-run SPACE [--n-trials N] [--workers K | --gpus 0,1] [--smoke] [--set key=value ...]
    optuna-run COMMAND ...        (optuna-run --help lists them; optuna-run COMMAND --help)

Each command is a function decorated with `@command`: it adds its own arguments to its parser
(flags several commands share come from the parent parsers in `PARENTS`) and returns its handler,
so a command's arguments sit next to what it does with them. A `UserError` (bad input) is printed
in one line with exit code 2; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Callable

from trainer.errors import UserError

DEFAULT_PHANTOM = dict(studies=50, test_studies=5, seed=0)
DEFAULT_LOG = Path(__file__).resolve().parent.parent / "legacy" / "manual_log.md"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# ------------------------------------------------------------------ shared helpers


def check_study_name(name: str) -> str:
    """Study names become file names (dashboards/NAME.html, lock files): no path tricks."""
    if not _SAFE_NAME.match(name) or ".." in name:
        raise UserError(f"study name {name!r}: use letters, digits, '.', '-' and '_' (at most 128, "
                        "not starting with '.' or '-', no '..')")
    return name


def default_data_dir() -> Path:
    return Path(os.environ.get("SPINESWEEP_DATA", "data/phantom"))


def ensure_data(data: str | None) -> Path:
    """The data folder to use; the default phantom is built on first use."""
    if data:
        path = Path(data)
        if not path.is_dir():
            raise UserError(f"--data {data}: folder not found")
        return path
    path = default_data_dir()
    if not (path / "train.csv").exists():
        from trainer.data.phantom import make_phantom

        print(f"building the phantom dataset in {path} ({DEFAULT_PHANTOM['studies']} studies) ...", flush=True)
        make_phantom(path, jobs=os.cpu_count() or 1, **DEFAULT_PHANTOM)
    return path


def parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r}: expected key=value, e.g. optim.lr=3e-4")
        out[key.strip()] = value
    return out


def check_stores(args) -> None:
    """Before any trial: a SQLite file given on the command line goes in a folder that exists (a
    typo is not silently created), and an HTTP tracking server answers within seconds."""
    from .stores import sqlite_path
    from .tracking import probe_server

    for flag, url in (("--storage", args.storage), ("--tracking-uri", args.tracking_uri)):
        db = sqlite_path(url) if url else None
        if db is not None and not db.parent.is_dir():
            raise UserError(f"{flag} {url}: folder {db.parent} does not exist (create it first)")
    if (args.tracking_uri or "").startswith(("http://", "https://")):
        probe_server(args.tracking_uri)


def storage_url(args) -> str:
    from .study import DEFAULT_STORAGE

    return args.storage or DEFAULT_STORAGE


def tracking_uri(args) -> str:
    from .tracking import default_tracking_uri

    return args.tracking_uri or default_tracking_uri()


def print_table(rows: list[dict]) -> None:
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
    "json": _parent(lambda p: p.add_argument("--json", action="store_true", help="print JSON instead of text")),
}
COMMANDS: dict[str, tuple[str, tuple[str, ...], Callable]] = {}


def command(name: str, help: str, parents: tuple[str, ...] = ()):
    """Register a subcommand. The decorated function takes its parser, adds its arguments and
    returns its handler ``handler(args) -> exit code``."""
    def register(define: Callable[[argparse.ArgumentParser], Callable]) -> Callable:
        COMMANDS[name] = (help, parents, define)
        return define
    return register


# ------------------------------------------------------------------ the study (optuna-run SPACE)


def define_study(p: argparse.ArgumentParser) -> Callable:
    p.add_argument("space", help="a name in search_spaces/ or a path to a YAML file")
    p.add_argument("--n-trials", type=int, metavar="N", help="the study's total number of trials (default: the space's)")
    p.add_argument("--study-name", help="default: the space's name (SPACE-smoke with --smoke)")
    p.add_argument("--timeout", type=float, metavar="S", help="stop asking for trials after this many seconds")
    p.add_argument("--gpus", metavar="IDS", help="one worker process per GPU id, e.g. 0,1,2,3 (repeat an id for several: 0,0,1,1)")
    p.add_argument("--trials-per-gpu", type=int, metavar="K",
                   help="K concurrent trials on each GPU of --gpus (default: every visible GPU); "
                        "small models leave a large GPU mostly idle with one")
    p.add_argument("--workers", type=int, metavar="K", help="CPU worker processes (cores split between them)")
    p.add_argument("--smoke", action="store_true", help="caps for a quick check: 1 epoch, tiny images and model")
    p.add_argument("--set", action="append", metavar="key=value", help="pin a config value, never sampled (repeatable)")
    p.add_argument("--resume", action="store_true", help="add to an existing study (N stays the study's total)")

    def run(args) -> int:
        import dataclasses

        import optuna

        from .space import Settings, load_space
        from .study import launch, plan_workers
        from .tracking import git_commit, package_versions

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress lines below say it all
        for flag, value in (("--n-trials", args.n_trials), ("--timeout", args.timeout)):
            if value is not None and not value > 0:
                raise UserError(f"{flag} must be positive (got {value:g})")
        space = load_space(args.space)  # validates everything before any trial starts
        workers = plan_workers(args.gpus, args.workers, args.trials_per_gpu)
        settings = Settings(smoke=args.smoke, pinned=parse_overrides(args.set or []))
        space.config(settings)  # validates the --set keys before any trial starts
        data = ensure_data(args.data)
        settings = dataclasses.replace(settings, data_dir=str(data))
        study_name = check_study_name(args.study_name or (f"{space.name}-smoke" if args.smoke else space.name))
        n_trials = args.n_trials if args.n_trials is not None else space.n_trials
        from trainer.data.cache import data_fingerprint
        from trainer.data.layout import Layout

        layout = Layout(data)
        layout.validate()  # the label CSVs, once: no trial starts on data `data check` rejects
        check_stores(args)

        tags = {"git_commit": git_commit(), "data_fingerprint": data_fingerprint(layout),
                "space_file": space.path.name, "space_file_hash": space.file_hash,
                **{f"version.{k}": v for k, v in package_versions().items()}}
        print(f"study {study_name}: space {space.name} ({space.path}), {n_trials} trials, "
              f"{len(workers)} worker(s) [{', '.join(w.name for w in workers)}], data {data}", flush=True)
        outcome = launch(space, n_trials, study_name=study_name, storage_url=storage_url(args),
                         tracking_uri=tracking_uri(args), settings=settings, resume=args.resume, workers=workers,
                         timeout=args.timeout or space.timeout, tags=tags)
        dashboard = _write_dashboard(outcome, study_name)
        _print_summary(outcome, study_name, args, dashboard)
        return 0

    return run


def _write_dashboard(outcome, study_name: str) -> str | None:
    """Every study ends with its report written (dashboards/STUDY.html); a failure here is a
    warning, never a lost study."""
    from dashboards.report import write_report

    from .tracking import Tracker

    out = Path("dashboards") / f"{study_name}.html"
    try:
        write_report(outcome.study, out, tracker=Tracker(outcome.tracking_uri))
        return str(out)
    except Exception as e:  # the study is in the stores already
        print(f"warning: the dashboard could not be written ({type(e).__name__}: {e}); "
              f"retry with: optuna-run dashboard {study_name}", file=sys.stderr)
        return None


def _print_summary(outcome, study_name, args, dashboard: str | None = None) -> None:
    from .tracking import redact, view_url

    study = outcome.study
    counts = ", ".join(f"{v} {k.lower()}" + (" (imported from the manual log)" if k == "LEGACY" else "")
                       for k, v in outcome.counts.items() if v)
    print(f"\nstudy {study_name}: {counts} ({outcome.seconds / 60:.1f} min)")
    try:
        best = study.best_trial
    except ValueError:
        print("no trial completed")
        return
    prior = best.user_attrs.get("prior_score")
    ratio = f", {best.value / prior:.2f} x the prior's {prior:.4f}" if prior else ""
    legacy = f" (manual log entry {best.user_attrs['legacy_entry']})" if best.user_attrs.get("legacy_entry") else ""
    print(f"best trial {best.number}{legacy}: score {best.value:.4f}{ratio}")
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
          f"\n  optuna-run runs {study_name}{uri}      # the trials as a table"
          f"\n  optuna-run dashboard {study_name}      # rewrite the dashboard after more trials")


# ------------------------------------------------------------------ data and training


@command("make-phantom", "write a phantom dataset in the RSNA 2024 layout")
def define_make_phantom(p: argparse.ArgumentParser) -> Callable:
    p.add_argument("dir", help="the folder to write (created)")
    p.add_argument("--studies", type=int, default=DEFAULT_PHANTOM["studies"], help="training studies (default: %(default)s)")
    p.add_argument("--test-studies", type=int, default=DEFAULT_PHANTOM["test_studies"],
                   help="test studies, unlabelled (default: %(default)s)")
    p.add_argument("--seed", type=int, default=DEFAULT_PHANTOM["seed"], help="the same seed writes the same data (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    p.add_argument("--scale", choices=["small", "real"], default="small",
                   help="small (default): 192-288 px, a few RLE files, fast on a CPU; real: the competition's "
                        "sizes (384-640 px, 13-21 sagittal slices, 1-3 axial series of mostly 15-50 slices, "
                        "every file RLE lossless 12-bit)")

    def run(args) -> int:
        import time

        from trainer.data.phantom import make_phantom

        t0 = time.perf_counter()
        summary = make_phantom(Path(args.dir), studies=args.studies, test_studies=args.test_studies,
                               seed=args.seed, jobs=args.jobs, scale=args.scale, progress=not args.json)
        summary["seconds"] = round(time.perf_counter() - t0, 2)
        print(json.dumps(summary) if args.json else
              f"phantom dataset ({args.scale}) in {args.dir}: {summary['studies']} train + {summary['test_studies']} "
              f"test studies, {summary['series']} series, {summary['files']} DICOM files "
              f"({summary['bytes'] / 2**20:.0f} MB), {summary['points']} labelled points, grades {summary['grades']} "
              f"({summary['seconds']} s)")
        return 0

    return run


def define_data_check(p: argparse.ArgumentParser) -> Callable:
    p.add_argument("--cache-dir", help="cache folder (default: $SPINESWEEP_CACHE or ~/.cache/spinesweep)")
    p.add_argument("--cache-budget", metavar="SIZE",
                   help="disk budget of the volume cache, e.g. 200GB; least recently used series are evicted "
                        "beyond it (default: $SPINESWEEP_CACHE_BUDGET or 64GB; trials: data.cache_budget_gb)")
    p.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                   help="processes that decode DICOM series not cached yet (default: every core)")

    def run(args) -> int:
        from trainer.config import DataConfig
        from trainer.data.check import check_data
        from trainer.data.crops import CropSpec
        from trainer.data.volumes import cache_budget, parse_size

        data = ensure_data(args.data)
        spec = CropSpec.from_config(DataConfig(data_dir=str(data)))
        budget = parse_size(args.cache_budget) if args.cache_budget else cache_budget()
        summary = check_data(data, spec, cache_dir=args.cache_dir or "", progress=not args.json,
                             jobs=args.jobs, budget=budget)
        if args.json:
            print(json.dumps(summary, indent=2))
            return 0
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
        return 0

    return run


def define_data_audit(p: argparse.ArgumentParser) -> Callable:
    p.add_argument("--oof", metavar="FILE.csv", help="a localiser trial's oof.csv: also flag points far from its points")
    p.add_argument("--far-mm", type=float, default=15.0, help="how far is far from the localiser (default: %(default)s mm)")
    p.add_argument("--out", default="audit.csv", help="the review list (default: audit.csv)")

    def run(args) -> int:
        from trainer.points.audit import audit_folder

        found = audit_folder(ensure_data(args.data), args.oof, args.far_mm)
        found.to_csv(args.out, index=False)
        counts = found["reason"].value_counts().to_dict()
        print(json.dumps({"path": args.out, "points": len(found), "by_reason": counts}) if args.json else
              f"{args.out}: {len(found)} labelled points to review, worst first {counts or ''}")
        return 0

    return run


@command("data", "data folder tools (data check)")
def define_data(p: argparse.ArgumentParser) -> Callable:
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    check = sub.add_parser("check", parents=[PARENTS["data"], PARENTS["json"]],
                           help="decode every series into the volume cache, cut every crop, report failures by reason")
    check.set_defaults(action=define_data_check(check))
    audit = sub.add_parser("audit", parents=[PARENTS["data"], PARENTS["json"]],
                           help="labelled points that are impossible or far from a localiser's, worst first, as a CSV")
    audit.set_defaults(action=define_data_audit(audit))
    return lambda args: args.action(args)


@command("train", "one training run of a config (the manual log's workflow)", parents=("data",))
def define_train(p: argparse.ArgumentParser) -> Callable:
    p.add_argument("--config", help="TrainConfig YAML (default: built-in defaults)")
    p.add_argument("--output-dir", help="where the checkpoint goes (default: a temporary folder)")
    p.add_argument("--json", action="store_true", help="print a final JSON object (the table goes to stderr)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=3e-4")

    def run(args) -> int:
        from trainer.augment import build_augment
        from trainer.config import TrainConfig
        from trainer.models import check_backbone, check_head
        from trainer.report import EpochTable, result_summary

        cfg = TrainConfig.from_yaml(args.config) if args.config else TrainConfig()
        overrides = parse_overrides(args.overrides)
        if args.output_dir:
            overrides["output_dir"] = args.output_dir
        cfg = cfg.with_overrides(overrides)  # validates before any data is touched
        check_backbone(cfg.model.backbone)  # names checked before anything is built or downloaded
        check_head(cfg.model.head)
        build_augment(cfg.augment)
        if args.data or cfg.data.data_dir == TrainConfig().data.data_dir:  # the phantom, built on first use
            cfg = cfg.with_overrides({"data.data_dir": str(ensure_data(args.data))})
        from trainer.fit import fit

        table = EpochTable(sys.stderr if args.json else sys.stdout)
        result = fit(cfg, callbacks=[table], progress=table.progress)
        table.close()
        summary = result_summary(result)
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            print(f"best epoch {summary['best_epoch']}: score {summary['score']:.4f} "
                  f"(prior {summary['prior_score']:.4f}, ratio {summary['score'] / summary['prior_score']:.3f})")
            print("  " + ", ".join(f"{k} {v:.4f}" for k, v in summary["groups"].items()))
            print(f"  checkpoint {summary['checkpoint']}")
        return 0

    return run


# ------------------------------------------------------------------ looking at results


@command("runs", "a study's trials (or the imported log's entries) from MLflow as a table", parents=("tracking", "json"))
def define_runs(p: argparse.ArgumentParser) -> Callable:
    p.add_argument("space", help="space (or study) name: its MLflow experiment")
    p.add_argument("--top", type=int, default=None, metavar="K", help="only the K best")
    p.add_argument("--where", metavar="FILTER",
                   help="an MLflow search filter, e.g. \"params.`model.backbone` = 'tf_efficientnet_b3.ns_jft_in1k'\"")
    p.add_argument("--lineage", metavar="ENTRY", help="(imported log) an entry and its chain of bases")

    def run(args) -> int:
        from .query import lineage, runs_table

        if args.lineage:
            rows = lineage(args.lineage, experiment=args.space, tracking_uri=args.tracking_uri)
        else:
            rows = runs_table(args.space, tracking_uri=args.tracking_uri, top=args.top, where=args.where)
        if args.json:
            print(json.dumps(rows, indent=2, default=str))
        elif not rows:
            print("no runs")
        else:
            print_table(rows)
        return 0

    return run


@command("reproduce", "re-run a logged trial from its MLflow params alone", parents=("tracking", "data", "json"))
def define_reproduce(p: argparse.ArgumentParser) -> Callable:
    p.add_argument("run_id", help="the trial's MLflow run id (optuna-run runs SPACE lists them)")

    def run(args) -> int:
        from .query import reproduce

        out = reproduce(args.run_id, tracking_uri=args.tracking_uri, data_dir=args.data,
                        log=lambda line: print(line, file=sys.stderr, flush=True))  # stdout: the result only
        print(json.dumps(out, indent=2) if args.json else
              f"run {args.run_id}: logged score {out['logged_score']:.6f}, reproduced {out['score']:.6f} "
              f"(difference {abs(out['score'] - out['logged_score']):.2e})")
        return 0

    return run


@command("dashboard", "a self-contained HTML report of a study (plotly, works offline)", parents=("storage", "tracking"))
def define_dashboard(p: argparse.ArgumentParser) -> Callable:
    p.add_argument("study", help="the study (by default a space's study has the space's name)")
    p.add_argument("--out", help="the HTML file (default: dashboards/STUDY.html)")

    def run(args) -> int:
        import optuna

        from dashboards.report import write_report

        from .stores import sqlite_path
        from .study import make_storage
        from .tracking import Tracker, redact

        url = storage_url(args)
        storage = make_storage(url)
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        if args.study not in names:
            raise UserError(f"no study {args.study!r} in {redact(url)} (have: {', '.join(names) or 'none'})")
        study = optuna.load_study(study_name=args.study, storage=storage)
        uri = tracking_uri(args)
        db = sqlite_path(uri)
        tracker = Tracker(uri) if db is None or db.exists() else None
        out = Path(args.out or f"dashboards/{check_study_name(args.study)}.html")
        summary = write_report(study, out, tracker=tracker, tracking_uri=redact(uri))
        print(f"dashboard of study {args.study}: {out} ({len(summary['figures'])} figures"
              + (f"; empty: {', '.join(summary['empty'])}" if summary["empty"] else "") + ")")
        print(f"open it in a browser: file://{out.resolve()}")
        return 0

    return run


# ------------------------------------------------------------------ from a study to a submission


@command("promote", "a trial to the model registry, trained on every fold (an ensemble member)",
         parents=("storage", "tracking"))
def define_promote(p: argparse.ArgumentParser) -> Callable:
    p.add_argument("space", help="the space (its study) or a study name")
    p.add_argument("--trial", type=int, metavar="N", help="trial number (default: the best)")
    p.add_argument("--run-id", help="or the trial's MLflow run id")
    p.add_argument("--folds", choices=["all", "evaluated"], default="all",
                   help="train the folds the trial was not evaluated on (all, default) or not")
    p.add_argument("--ensemble", default="default", help="the ensemble it joins (default: default)")
    p.add_argument("--study-name", help="the study, when it is not named after the space")
    p.add_argument("--data", metavar="DIR", help="data folder, if it moved since the study")

    def run(args) -> int:
        from .promote import promote

        r = promote(args.study_name or args.space, storage_url(args), tracking_uri(args), trial=args.trial,
                    run_id=args.run_id, all_folds=args.folds == "all", data_dir=args.data, ensemble=args.ensemble)
        if r.already:
            print(f"trial {r.trial} (run {r.run_id}) is already promoted: {r.model} version {r.version}; nothing done")
            return 0
        trained = f", trained fold(s) {r.trained_folds} as child runs" if r.trained_folds else ""
        print(f"promoted trial {r.trial} -> {r.model} version {r.version} (alias trial_{r.trial}, ensemble "
              f"{args.ensemble!r}){trained}\n  OOF score over folds {r.folds}: {r.oof_score:.4f} "
              + " ".join(f"{k} {v:.4f}" for k, v in r.groups.items()))
        print("next: optuna-run ensemble    # combine the promoted members")
        return 0

    return run


@command("ensemble", "combine the promoted members on their OOF predictions", parents=("tracking", "json"))
def define_ensemble(p: argparse.ArgumentParser) -> Callable:
    p.add_argument("--name", default="default", help="the ensemble (default: default)")
    p.add_argument("--weights", choices=["equal", "optimize"], default="optimize",
                   help="optimize (default): fitted on OOF, kept only if a cross-fit over studies says so")

    def run(args) -> int:
        from .ensemble import ensemble

        r = ensemble(tracking_uri(args), args.name, args.weights)
        if args.json:
            print(json.dumps(r.__dict__, indent=2, default=str))
            return 0
        groups = list(r.groups)
        rows = [{"member": m["member"], "weight": w, "score": m["score"], **{g: m.get(g) for g in groups}}
                for m, w in zip(r.members, r.weights)]
        rows.append({"member": f"ensemble {r.name!r} ({r.method})", "weight": sum(r.weights), "score": r.score,
                     **r.groups})
        print_table(rows)
        if r.held_out:
            print("held-out (cross-fit over studies: weights fitted on the other studies): "
                  + ", ".join(f"{k} {v:.4f}" for k, v in r.held_out.items()) + f" -> {r.method}")
        print(f"logged as MLflow run {r.run_id} (experiment ensembles)\nnext: optuna-run predict --out submission.csv")
        return 0

    return run


@command("predict", "the ensemble on the test studies: a Kaggle submission", parents=("tracking", "data"))
def define_predict(p: argparse.ArgumentParser) -> Callable:
    p.add_argument("--ensemble", default="default", help="the ensemble (default: default)")
    p.add_argument("--out", default="submission.csv", help="the submission file (default: submission.csv)")
    p.add_argument("--device", default="cpu", help="torch device for inference (default: cpu)")

    def run(args) -> int:
        from .predict import predict

        data = ensure_data(args.data)
        out = predict(str(data), args.out, tracking_uri(args), args.ensemble, args.device)
        filled = (f"; conditions no member covers, filled with the training label frequencies: "
                  f"{', '.join(out['filled_with_label_prior'])}" if out["filled_with_label_prior"] else "")
        print(f"submission {out['path']}: {out['rows']} rows for {out['studies']} test studies, "
              f"{len(out['members'])} member(s), weights {[round(w, 3) for w in out['weights']]}{filled}")
        return 0

    return run


@command("localize", "every study's points by a localiser, in the train_label_coordinates.csv form",
         parents=("tracking", "data", "json"))
def define_localize(p: argparse.ArgumentParser) -> Callable:
    p.add_argument("--split", choices=["test", "train"], default="test", help="which studies (default: test)")
    p.add_argument("--model", metavar="URI", help="the localiser: a checkpoint file or folder, runs:/RUN_ID, "
                   "study:NAME, best (default: the best trial of the study 'localizer'), or prior (the mean-position guess)")
    p.add_argument("--out", required=True, metavar="FILE.csv", help="the points file to write")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")

    def run(args) -> int:
        from .localize import localize_to_csv

        out = localize_to_csv(ensure_data(args.data), args.out, tracking_uri(args), args.model, args.split, args.device)
        print(json.dumps(out) if args.json else
              f"{out['path']}: {out['rows']} points of {out['studies']} {out['split']} studies, by {out['localizer']}")
        return 0

    return run


# ------------------------------------------------------------------ the manual log


@command("import-log", "the manual experiment log as MLflow runs (and a study warm start)",
         parents=("tracking", "storage", "json"))
def define_import_log(p: argparse.ArgumentParser) -> Callable:
    p.add_argument("file", nargs="?", help="the log (default: legacy/manual_log.md)")
    p.add_argument("--experiment", default="legacy", help="MLflow experiment (default: legacy)")
    p.add_argument("--enqueue", metavar="SPACE", help="add the entries inside SPACE to its study as completed trials")
    p.add_argument("--study-name", help="the study to warm-start (default: the space's name)")
    p.add_argument("--verbose", action="store_true", help="list every entry outside the space")

    def run(args) -> int:
        from .legacy.importer import enqueue, import_log

        path = Path(args.file) if args.file else DEFAULT_LOG
        if not path.is_file():
            raise UserError(f"{path}: no such log file")
        summary, resolved = import_log(path, tracking_uri=args.tracking_uri, experiment=args.experiment)
        out = {"import": summary.as_dict()}
        if args.enqueue:
            out["enqueue"] = enqueue(resolved, args.enqueue, storage_url=args.storage, study_name=args.study_name,
                                     run_ids=summary.run_ids).as_dict()
        if args.json:
            print(json.dumps(out, indent=2))
            return 0
        _print_import(summary, out.get("enqueue"), args.verbose)
        return 0

    return run


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
    so `kill` of optuna-run never leaves a server answering on its port."""
    import signal
    import subprocess

    child = subprocess.Popen(cmd, start_new_session=True)

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
    p.add_argument("--port", type=int, default=5000, help="port (default: 5000)")


@command("ui", "the MLflow UI on the project's tracking store", parents=("tracking",))
def define_ui(p: argparse.ArgumentParser) -> Callable:
    _bind(p)

    def run(args) -> int:
        from .stores import sqlite_path
        from .tracking import redact

        uri = tracking_uri(args)
        db = sqlite_path(uri)
        if db is not None and not db.exists():
            raise UserError(f"no tracking store at {uri}: run a study first (e.g. optuna-run demo)")
        print(f"MLflow UI on http://{args.host}:{args.port} (store {redact(uri)}); Ctrl-C stops it", flush=True)
        return serve([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
                      "--port", str(args.port)])

    return run


@command("server", "an MLflow tracking server for studies shared by several hosts")
def define_server(p: argparse.ArgumentParser) -> Callable:
    """Runs in a database, artifacts proxied by the server into one folder (so hosts need no
    shared file system)."""
    p.add_argument("--backend-store-uri", required=True, help="e.g. postgresql://user:pw@dbhost/mlflow")
    p.add_argument("--artifacts-destination", required=True, help="a folder (or s3://...) the server writes to")
    _bind(p)
    p.add_argument("--workers", type=int, default=2, help="server worker processes (default: 2)")

    def run(args) -> int:
        from .stores import normalize_db_url
        from .tracking import Tracker, redact

        backend = normalize_db_url(args.backend_store_uri)
        artifacts = args.artifacts_destination
        if "://" not in artifacts:
            Path(artifacts).mkdir(parents=True, exist_ok=True)
            artifacts = Path(artifacts).resolve().as_uri()
        try:
            Tracker(backend)  # creates the schema once (under a lock), whoever starts first
        except Exception as e:
            raise UserError(f"--backend-store-uri {redact(backend)} cannot be opened: {type(e).__name__}: "
                            f"{redact(str(e).splitlines()[0] if str(e) else '')}") from None
        public = args.host not in ("127.0.0.1", "localhost", "::1")
        print(f"MLflow tracking server on http://{args.host}:{args.port} (runs in {redact(backend)}, artifacts in "
              f"{artifacts}); hosts use --tracking-uri http://{args.host if args.host != '0.0.0.0' else '<this host>'}:"
              f"{args.port}", flush=True)
        if public:
            print("warning: the server is reachable from the network and MLflow has no authentication here: "
                  "keep it behind a firewall or an SSH tunnel", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, "--artifacts-destination",
               artifacts, "--serve-artifacts", "--host", args.host, "--port", str(args.port),
               "--workers", str(args.workers)]
        return serve(cmd + (["--allowed-hosts", "*"] if public else []))

    return run


# ------------------------------------------------------------------ parsers and main


class _Version(argparse.Action):
    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        import platform

        from .tracking import git_commit, package_versions

        versions = package_versions()
        lines = [f"spinesweep {versions.pop('spinesweep', '?')} (git {git_commit() or 'unknown'}), "
                 f"python {platform.python_version()}"]
        lines += [f"  {k} {v}" for k, v in versions.items()]
        print("\n".join(lines))
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="optuna-run", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Hyperparameter search and experiment tracking for spine MRI (Optuna + MLflow).\n\n"
                    "  optuna-run SPACE [--n-trials N] [options]   an Optuna study of a search space "
                    "(optuna-run demo --help)\n  optuna-run COMMAND [options]                the commands below",
        epilog="A study: optuna-run demo --n-trials 12; then optuna-run ui, optuna-run runs demo, optuna-run promote demo.")
    p.add_argument("--version", action=_Version, help="print spinesweep's and its key libraries' versions, and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, (help_, parents, define) in COMMANDS.items():
        cp = sub.add_parser(name, help=help_, description=help_, parents=[PARENTS[x] for x in parents])
        cp.set_defaults(func=define(cp))
    return p


def build_study_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="optuna-run SPACE", description="run an Optuna study of a named search space",
                                parents=[PARENTS["data"], PARENTS["storage"], PARENTS["tracking"]])
    p.set_defaults(func=define_study(p))
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        parser = build_study_parser()
    else:
        parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except UserError as e:  # bad input: one line; anything else is a bug and keeps its traceback
        print(f"optuna-run: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("optuna-run: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

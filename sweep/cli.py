"""`optuna-run`: the one command line of spinesweep.

    optuna-run SPACE [--n-trials N] [--workers K | --gpus 0,1] [--smoke] [--set key=value ...]
    optuna-run runs SPACE [--top K] [--json]
    optuna-run reproduce RUN_ID
    optuna-run import-log [FILE] [--experiment legacy] [--enqueue SPACE]
    optuna-run runs legacy [--top K] [--where FILTER] [--lineage expNNN]
    optuna-run ui [--port 5000]
    optuna-run server --backend-store-uri postgresql://... --artifacts-destination DIR [--host 127.0.0.1]
    optuna-run dashboard STUDY [--out FILE.html]
    optuna-run promote SPACE [--trial N | --run-id ID] [--folds all|evaluated]
    optuna-run ensemble [--name NAME] [--weights equal|optimize] [--json]
    optuna-run predict [--data DIR] [--ensemble NAME] --out submission.csv
    optuna-run make-phantom DIR [--studies N --test-studies M --seed S]
    optuna-run data check [--data DIR] [--json]
    optuna-run train --config FILE.yaml [--data DIR] [key=value ...] [--json]

Every subcommand exits 2 with a one-line message on bad input (a `UserError`), never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from trainer.config import ConfigError
from trainer.data.layout import LayoutError

DEFAULT_PHANTOM = dict(studies=50, test_studies=5, seed=0)


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


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


# ------------------------------------------------------------------ subcommands


def cmd_make_phantom(args) -> int:
    from trainer.data.phantom import make_phantom
    import time

    t0 = time.perf_counter()
    summary = make_phantom(Path(args.dir), studies=args.studies, test_studies=args.test_studies,
                           seed=args.seed, jobs=args.jobs, scale=args.scale, progress=not args.json)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(summary) if args.json else
          f"phantom dataset ({args.scale}) in {args.dir}: {summary['studies']} train + {summary['test_studies']} test "
          f"studies, {summary['series']} series, {summary['files']} DICOM files ({summary['bytes'] / 2**20:.0f} MB), "
          f"{summary['points']} labelled points, grades {summary['grades']} ({summary['seconds']} s)")
    return 0


def cmd_data_check(args) -> int:
    from trainer.config import DataConfig
    from trainer.data.check import check_data
    from trainer.data.crops import CropSpec

    from trainer.data.volumes import cache_budget, parse_size

    data = ensure_data(args.data)
    spec = CropSpec.from_config(DataConfig(data_dir=str(data)))
    try:
        budget = parse_size(args.cache_budget) if args.cache_budget else cache_budget()
    except ValueError as e:
        raise UserError(f"--cache-budget: {e}") from None
    summary = check_data(data, spec, cache_dir=args.cache_dir or "", progress=not args.json,
                         jobs=args.jobs, budget=budget)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"data check of {summary['data_dir']}")
    for k in ("studies", "series", "points", "samples", "crops_expected", "crops_built", "unlabelled_blocks"):
        print(f"  {k:<18} {summary[k]}")
    print(f"  {'failures':<18} {sum(summary['failures'].values())} {summary['failures'] or ''}")
    for reason, example in summary["failure_examples"].items():
        print(f"    {reason}: e.g. {example}")
    if summary["fallbacks"]:
        print(f"  {'fallbacks':<18} {summary['fallbacks']}")
    print(f"  decoded {summary['series_decoded']} series ({summary['decode_jobs']} processes, "
          f"{summary['decode_seconds']} s), {summary['series_from_cache']} from cache; cache "
          f"{summary['cache_bytes'] / 2**30:.2f} of {summary['cache_budget'] / 2**30:.0f} GiB; {summary['seconds']} s")
    return 0


def parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r}: expected key=value, e.g. optim.lr=3e-4")
        out[key.strip()] = value
    return out


def cmd_train(args) -> int:
    from trainer.config import TrainConfig
    from trainer.report import EpochTable, result_summary

    cfg = TrainConfig.from_yaml(args.config) if args.config else TrainConfig()
    overrides = parse_overrides(args.overrides)
    if args.output_dir:
        overrides["output_dir"] = args.output_dir
    cfg = cfg.with_overrides(overrides)  # validates before any data is touched
    from trainer.augment import build_augment
    from trainer.models import check_backbone, check_head

    try:  # names checked before anything is built or downloaded
        check_backbone(cfg.model.backbone)
        check_head(cfg.model.head)
        build_augment(cfg.augment)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.data:
        cfg = cfg.with_overrides({"data.data_dir": str(ensure_data(args.data))})
    elif cfg.data.data_dir == TrainConfig().data.data_dir:
        cfg = cfg.with_overrides({"data.data_dir": str(ensure_data(None))})  # the phantom, built on first use
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


def cmd_study(args) -> int:
    import optuna

    from .space import SMOKE, load_space
    from .study import DEFAULT_STORAGE, launch, plan_workers
    from .tracking import default_tracking_uri, git_commit, package_versions

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress lines below say it all

    space = load_space(args.space)  # validates everything before any trial starts
    workers = plan_workers(args.gpus, args.workers, args.trials_per_gpu)
    overrides = dict(space.fixed)
    caps = {**SMOKE, **space.smoke} if args.smoke else {}
    caps.update(parse_overrides(args.set or []))  # what the user pins is never sampled
    overrides.update(caps)
    space.base_config(extra=overrides)  # validates the --set keys before any trial starts
    data = ensure_data(args.data)
    study_name = check_study_name(args.study_name or (f"{space.name}-smoke" if args.smoke else space.name))
    n_trials = args.n_trials or space.n_trials
    tracking_uri = args.tracking_uri or default_tracking_uri()
    from trainer.data.cache import data_fingerprint
    from trainer.data.layout import Layout

    tags = {"git_commit": git_commit(), "data_fingerprint": data_fingerprint(Layout(data)),
            "space_file": space.path.name, "space_file_hash": space.file_hash,
            **{f"version.{k}": v for k, v in package_versions().items()}}
    print(f"study {study_name}: space {space.name} ({space.path}), {n_trials} trials, "
          f"{len(workers)} worker(s) [{', '.join(w.name for w in workers)}], data {data}", flush=True)
    outcome = launch(space, n_trials, study_name=study_name, storage_url=args.storage or DEFAULT_STORAGE,
                     tracking_uri=tracking_uri, data_dir=str(data), overrides=overrides, smoke=args.smoke,
                     resume=args.resume, workers=workers, timeout=args.timeout or space.timeout, tags=tags,
                     caps=caps)
    dashboard = _write_dashboard(outcome, study_name)
    _print_summary(space, outcome, study_name, args, dashboard)
    return 0


def _write_dashboard(outcome, study_name: str) -> str | None:
    """Every study ends with its report written (dashboards/STUDY.html); a failure here is a
    warning, never a lost study."""
    from dashboards.report import write_report

    from .tracking import Tracker

    out = Path("dashboards") / f"{study_name}.html"
    try:
        write_report(outcome.study, out, client=Tracker(outcome.tracking_uri).client)
        return str(out)
    except Exception as e:  # the study is in the stores already
        print(f"warning: the dashboard could not be written ({type(e).__name__}: {e}); "
              f"retry with: optuna-run dashboard {study_name}", file=sys.stderr)
        return None


def _print_summary(space, outcome, study_name, args, dashboard: str | None = None) -> None:
    from .tracking import redact

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
          f"\n  optuna-run runs {study_name}{uri}      # the trials as a table"
          f"\n  optuna-run dashboard {study_name}      # rewrite the dashboard after more trials")


def _print_table(rows: list[dict]) -> None:
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


def cmd_runs(args) -> int:
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
        _print_table(rows)
    return 0


def cmd_dashboard(args) -> int:
    import optuna

    from dashboards.report import write_report

    from .stores import sqlite_path
    from .study import DEFAULT_STORAGE, make_storage
    from .tracking import Tracker, default_tracking_uri, redact

    storage_url = args.storage or DEFAULT_STORAGE
    storage = make_storage(storage_url)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if args.study not in names:
        raise UserError(f"no study {args.study!r} in {redact(storage_url)} (have: {', '.join(names) or 'none'})")
    study = optuna.load_study(study_name=args.study, storage=storage)
    uri = args.tracking_uri or default_tracking_uri()
    client = None
    db = sqlite_path(uri)
    if db is None or db.exists():
        client = Tracker(uri).client
    out = Path(args.out or f"dashboards/{check_study_name(args.study)}.html")
    summary = write_report(study, out, client=client, tracking_uri=redact(uri))
    print(f"dashboard of study {args.study}: {out} ({len(summary['figures'])} figures"
          + (f"; empty: {', '.join(summary['empty'])}" if summary["empty"] else "") + ")")
    print(f"open it in a browser: file://{out.resolve()}")
    return 0


def cmd_promote(args) -> int:
    from .promote import promote
    from .study import DEFAULT_STORAGE
    from .tracking import default_tracking_uri

    p = promote(args.study_name or args.space, args.storage or DEFAULT_STORAGE, args.tracking_uri or default_tracking_uri(),
                trial=args.trial, run_id=args.run_id, all_folds=args.folds == "all", data_dir=args.data,
                ensemble=args.ensemble)
    if p.already:
        print(f"trial {p.trial} (run {p.run_id}) is already promoted: {p.model} version {p.version}; nothing done")
        return 0
    trained = f", trained fold(s) {p.trained_folds} as child runs" if p.trained_folds else ""
    print(f"promoted trial {p.trial} -> {p.model} version {p.version} (alias trial_{p.trial}, ensemble "
          f"{args.ensemble!r}){trained}\n  OOF score over folds {p.folds}: {p.oof_score:.4f} "
          + " ".join(f"{k} {v:.4f}" for k, v in p.groups.items()))
    print("next: optuna-run ensemble    # combine the promoted members")
    return 0


def cmd_ensemble(args) -> int:
    from .promote import ensemble
    from .tracking import default_tracking_uri

    r = ensemble(args.tracking_uri or default_tracking_uri(), args.name, args.weights)
    if args.json:
        print(json.dumps(r.__dict__, indent=2, default=str))
        return 0
    groups = list(r.groups)
    rows = [{"member": m["member"], "weight": w, "score": m["score"], **{g: m.get(g) for g in groups}}
            for m, w in zip(r.members, r.weights)]
    rows.append({"member": f"ensemble {r.name!r} ({r.method})", "weight": sum(r.weights), "score": r.score,
                 **r.groups})
    _print_table(rows)
    if r.held_out:
        print("held-out (cross-fit over studies: weights fitted on the other studies): "
              + ", ".join(f"{k} {v:.4f}" for k, v in r.held_out.items()) + f" -> {r.method}")
    print(f"logged as MLflow run {r.run_id} (experiment ensembles)\nnext: optuna-run predict --out submission.csv")
    return 0


def cmd_predict(args) -> int:
    from .promote import predict
    from .tracking import default_tracking_uri

    data = ensure_data(args.data)
    out = predict(str(data), args.out, args.tracking_uri or default_tracking_uri(), args.ensemble, args.device)
    filled = (f"; conditions no member covers, filled with the training label frequencies: "
              f"{', '.join(out['filled_with_label_prior'])}" if out["filled_with_label_prior"] else "")
    print(f"submission {out['path']}: {out['rows']} rows for {out['studies']} test studies, "
          f"{len(out['members'])} member(s), weights {[round(w, 3) for w in out['weights']]}{filled}")
    return 0


DEFAULT_LOG = Path(__file__).resolve().parent.parent / "legacy" / "manual_log.md"


def cmd_import_log(args) -> int:
    from .legacy.importer import enqueue, import_log
    from .legacy.parse import LogFormatError

    path = Path(args.file) if args.file else DEFAULT_LOG
    if not path.is_file():
        raise UserError(f"{path}: no such log file")
    try:
        summary, resolved = import_log(path, tracking_uri=args.tracking_uri, experiment=args.experiment)
    except LogFormatError as e:
        raise UserError(str(e)) from None
    out = {"import": summary.as_dict()}
    if args.enqueue:
        out["enqueue"] = enqueue(resolved, args.enqueue, storage_url=args.storage, study_name=args.study_name,
                                 run_ids=summary.run_ids).as_dict()
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    s = summary
    print(f"{s.file}: {s.entries} entries -> MLflow experiment {s.experiment!r}: {s.created} runs created, "
          f"{s.updated} updated, {s.unchanged} unchanged; {s.with_result} entries with a result")
    if s.renamed:
        print(f"  repeated entry numbers kept apart as: {', '.join(s.renamed)}")
    print(f"  {s.unmapped_lines} setting lines kept verbatim (tag legacy.unmapped), {s.unmapped_distinct} distinct; "
          f"most frequent:")
    for text, n in s.unmapped_top:
        print(f"    {n:4d}  {text}")
    if args.enqueue:
        q = out["enqueue"]
        print(f"warm start of study {q['study']!r} (space {q['space']}, value {q['value']}): "
              f"{len(q['added'])} trials added, {len(q['already'])} already there, {len(q['outside'])} entries outside")
        by_reason: dict[str, list[str]] = {}
        for name, why in q["outside"].items():
            by_reason.setdefault(why, []).append(name)
        for why, names in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
            shown = names if args.verbose or len(names) <= 6 else names[:5] + [f"... {len(names) - 5} more"]
            print(f"    {len(names):4d}  {why}: {', '.join(shown)}")
        if q["added"]:
            print(f"next: optuna-run {q['space']} --n-trials N   # the sampler starts from these trials")
    print(f"query: optuna-run runs {s.experiment} --top 5    |    optuna-run runs {s.experiment} --lineage exp127")
    return 0


def cmd_reproduce(args) -> int:
    from .query import reproduce

    out = reproduce(args.run_id, tracking_uri=args.tracking_uri, data_dir=args.data)
    print(json.dumps(out, indent=2) if args.json else
          f"run {args.run_id}: logged score {out['logged_score']:.6f}, reproduced {out['score']:.6f} "
          f"(difference {abs(out['score'] - out['logged_score']):.2e})")
    return 0


def cmd_ui(args) -> int:
    import subprocess

    from .stores import sqlite_path
    from .tracking import default_tracking_uri, redact

    uri = args.tracking_uri or default_tracking_uri()
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        raise UserError(f"no tracking store at {uri}: run a study first (e.g. optuna-run demo)")
    print(f"MLflow UI on http://{args.host}:{args.port} (store {redact(uri)}); Ctrl-C stops it", flush=True)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
           "--port", str(args.port)]
    return subprocess.call(cmd)


def cmd_server(args) -> int:
    """An MLflow tracking server for several hosts: runs in a database, artifacts proxied by the
    server into one folder (so hosts need no shared file system)."""
    import subprocess

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
    print(f"MLflow tracking server on http://{args.host}:{args.port} (runs in {redact(backend)}, artifacts in "
          f"{artifacts}); hosts use --tracking-uri http://{args.host if args.host != '0.0.0.0' else '<this host>'}:"
          f"{args.port}", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print("warning: the server is reachable from the network and MLflow has no authentication here: "
              "keep it behind a firewall or an SSH tunnel", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, "--artifacts-destination",
           artifacts, "--serve-artifacts", "--host", args.host, "--port", str(args.port),
           "--workers", str(args.workers)]
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        cmd += ["--allowed-hosts", "*"]
    return subprocess.call(cmd)


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="optuna-run", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    mp = sub.add_parser("make-phantom", help="write a phantom dataset in the RSNA 2024 layout")
    mp.add_argument("dir")
    mp.add_argument("--studies", type=int, default=DEFAULT_PHANTOM["studies"])
    mp.add_argument("--test-studies", type=int, default=DEFAULT_PHANTOM["test_studies"])
    mp.add_argument("--seed", type=int, default=DEFAULT_PHANTOM["seed"])
    mp.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    mp.add_argument("--scale", choices=["small", "real"], default="small",
                    help="small (default): 192-288 px, a few RLE files, fast on a CPU; real: the competition's "
                         "sizes (384-640 px, 13-21 sagittal slices, 1-3 axial series of mostly 15-50 slices, "
                         "every file RLE lossless 12-bit)")
    mp.add_argument("--json", action="store_true")
    mp.set_defaults(func=cmd_make_phantom)

    dp = sub.add_parser("data", help="data folder tools")
    dsub = dp.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    dc = dsub.add_parser("check", help="build every crop and report failures by reason")
    dc.add_argument("--data", help="RSNA-format folder (default: the phantom, built on first use)")
    dc.add_argument("--cache-dir", help="cache folder (default: $SPINESWEEP_CACHE or ~/.cache/spinesweep)")
    dc.add_argument("--cache-budget", metavar="SIZE",
                    help="disk budget of the volume cache, e.g. 200GB; least recently used series are evicted "
                         "beyond it (default: $SPINESWEEP_CACHE_BUDGET or 64GB; trials: data.cache_budget_gb)")
    dc.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                    help="processes that decode DICOM series not cached yet (default: every core)")
    dc.add_argument("--json", action="store_true")
    dc.set_defaults(func=cmd_data_check)

    tr = sub.add_parser("train", help="one training run of a config (the manual log's workflow)")
    tr.add_argument("--config", help="TrainConfig YAML (default: built-in defaults)")
    tr.add_argument("--data", help="RSNA-format folder (default: the config's, or the phantom)")
    tr.add_argument("--output-dir", help="where the checkpoint goes (default: a temporary folder)")
    tr.add_argument("--json", action="store_true", help="print a final JSON object (the table goes to stderr)")
    tr.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=3e-4")
    tr.set_defaults(func=cmd_train)

    rn = sub.add_parser("runs", help="a study's trials from MLflow as a table")
    rn.add_argument("space", help="space (or study) name: its MLflow experiment")
    rn.add_argument("--top", type=int, default=None, help="only the K best")
    rn.add_argument("--where", metavar="FILTER",
                    help="an MLflow search filter, e.g. \"params.`model.backbone` = 'tf_efficientnet_b3.ns_jft_in1k'\"")
    rn.add_argument("--lineage", metavar="ENTRY", help="(imported log) an entry and its chain of bases")
    rn.add_argument("--tracking-uri")
    rn.add_argument("--json", action="store_true")
    rn.set_defaults(func=cmd_runs)

    rp = sub.add_parser("reproduce", help="re-run a logged trial from its MLflow params alone")
    rp.add_argument("run_id")
    rp.add_argument("--tracking-uri")
    rp.add_argument("--data", help="data folder, if it moved since the run")
    rp.add_argument("--json", action="store_true")
    rp.set_defaults(func=cmd_reproduce)

    sv = sub.add_parser("server", help="an MLflow tracking server for studies shared by several hosts")
    sv.add_argument("--backend-store-uri", required=True, help="e.g. postgresql://user:pw@dbhost/mlflow")
    sv.add_argument("--artifacts-destination", required=True, help="a folder (or s3://...) the server writes to")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    sv.add_argument("--port", type=int, default=5000)
    sv.add_argument("--workers", type=int, default=2, help="server worker processes")
    sv.set_defaults(func=cmd_server)

    db = sub.add_parser("dashboard", help="a self-contained HTML report of a study (plotly, works offline)")
    db.add_argument("study", help="the study (by default a space's study has the space's name)")
    db.add_argument("--out", help="the HTML file (default: dashboards/STUDY.html)")
    db.add_argument("--storage", help="Optuna storage URL (default: sqlite:///studies.db)")
    db.add_argument("--tracking-uri")
    db.set_defaults(func=cmd_dashboard)

    pr = sub.add_parser("promote", help="a trial to the model registry, trained on every fold (an ensemble member)")
    pr.add_argument("space", help="the space (its study) or a study name")
    pr.add_argument("--trial", type=int, help="trial number (default: the best)")
    pr.add_argument("--run-id", help="or the trial's MLflow run id")
    pr.add_argument("--folds", choices=["all", "evaluated"], default="all",
                    help="train the folds the trial was not evaluated on (all, default) or not")
    pr.add_argument("--ensemble", default="default", help="the ensemble it joins (default: default)")
    pr.add_argument("--study-name")
    pr.add_argument("--storage")
    pr.add_argument("--tracking-uri")
    pr.add_argument("--data", help="data folder, if it moved since the study")
    pr.set_defaults(func=cmd_promote)

    en = sub.add_parser("ensemble", help="combine the promoted members on their OOF predictions")
    en.add_argument("--name", default="default")
    en.add_argument("--weights", choices=["equal", "optimize"], default="optimize")
    en.add_argument("--tracking-uri")
    en.add_argument("--json", action="store_true")
    en.set_defaults(func=cmd_ensemble)

    pd_ = sub.add_parser("predict", help="the ensemble on the test studies: a Kaggle submission")
    pd_.add_argument("--data", help="RSNA-format folder with test_images (default: the phantom)")
    pd_.add_argument("--ensemble", default="default")
    pd_.add_argument("--out", default="submission.csv")
    pd_.add_argument("--device", default="cpu")
    pd_.add_argument("--tracking-uri")
    pd_.set_defaults(func=cmd_predict)

    il = sub.add_parser("import-log", help="the manual experiment log as MLflow runs (and a study warm start)")
    il.add_argument("file", nargs="?", help="the log (default: legacy/manual_log.md)")
    il.add_argument("--experiment", default="legacy", help="MLflow experiment (default: legacy)")
    il.add_argument("--tracking-uri")
    il.add_argument("--enqueue", metavar="SPACE", help="add the entries inside SPACE to its study as completed trials")
    il.add_argument("--study-name", help="the study to warm-start (default: the space's name)")
    il.add_argument("--storage", help="Optuna storage URL (default: sqlite:///studies.db)")
    il.add_argument("--verbose", action="store_true", help="list every entry outside the space")
    il.add_argument("--json", action="store_true")
    il.set_defaults(func=cmd_import_log)

    ui = sub.add_parser("ui", help="the MLflow UI on the project's tracking store")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    ui.add_argument("--tracking-uri")
    ui.set_defaults(func=cmd_ui)
    return p


def build_study_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="optuna-run SPACE", description="run an Optuna study of a named search space")
    p.add_argument("space", help="a name in search_spaces/ or a path to a YAML file")
    p.add_argument("--n-trials", type=int, help="the study's total number of trials (default: the space's)")
    p.add_argument("--data", help="RSNA-format folder (default: the phantom, built on first use)")
    p.add_argument("--study-name", help="default: the space's name (SPACE-smoke with --smoke)")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite:///studies.db)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite under mlruns/)")
    p.add_argument("--timeout", type=float, help="stop asking for trials after this many seconds")
    p.add_argument("--gpus", help="one worker process per GPU id, e.g. 0,1,2,3 (repeat an id for several: 0,0,1,1)")
    p.add_argument("--trials-per-gpu", type=int, metavar="K",
                   help="K concurrent trials on each GPU of --gpus (default: every visible GPU); "
                        "small models leave a large GPU mostly idle with one")
    p.add_argument("--workers", type=int, help="CPU worker processes (threads split between them)")
    p.add_argument("--smoke", action="store_true", help="caps for a quick check: 1 epoch, tiny images and model")
    p.add_argument("--set", action="append", metavar="key=value", help="override a config value (repeatable)")
    p.add_argument("--resume", action="store_true", help="add to an existing study (load_if_exists)")
    p.set_defaults(func=cmd_study)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)
    if argv and not argv[0].startswith("-") and argv[0] not in commands:
        parser = build_study_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (UserError, LayoutError, ConfigError, ValueError, RuntimeError) as e:
        if not isinstance(e, (UserError, LayoutError, ConfigError)) and not _is_user_facing(e):
            raise
        print(f"optuna-run: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("optuna-run: interrupted", file=sys.stderr)
        return 130


def _is_user_facing(e: Exception) -> bool:
    from trainer.models import PretrainedUnavailable

    from .promote import PromoteError
    from .space import SpaceError
    from .study import StudyError

    return isinstance(e, (SpaceError, StudyError, PretrainedUnavailable, PromoteError))


if __name__ == "__main__":
    sys.exit(main())

"""`optuna-run`: the one command line of spinesweep.

    optuna-run make-phantom DIR [--studies N --test-studies M --seed S]
    optuna-run data check [--data DIR] [--json]
    optuna-run train --config FILE.yaml [--data DIR] [key=value ...] [--json]

Every subcommand exits 2 with a one-line message on bad input (a `UserError`), never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from trainer.config import ConfigError
from trainer.data.layout import LayoutError

DEFAULT_PHANTOM = dict(studies=50, test_studies=5, seed=0)


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


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
                           seed=args.seed, jobs=args.jobs)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(summary) if args.json else
          f"phantom dataset in {args.dir}: {summary['studies']} train + {summary['test_studies']} test "
          f"studies, {summary['series']} series, {summary['points']} labelled points, "
          f"grades {summary['grades']} ({summary['seconds']} s)")
    return 0


def cmd_data_check(args) -> int:
    from trainer.config import DataConfig
    from trainer.data.check import check_data
    from trainer.data.crops import CropSpec

    data = ensure_data(args.data)
    spec = CropSpec.from_config(DataConfig(data_dir=str(data)))
    summary = check_data(data, spec, cache_dir=args.cache_dir or "", progress=not args.json)
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
    print(f"  built {summary['studies_built']} studies, {summary['studies_from_cache']} from cache, "
          f"{summary['seconds']} s")
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
    mp.add_argument("--json", action="store_true")
    mp.set_defaults(func=cmd_make_phantom)

    dp = sub.add_parser("data", help="data folder tools")
    dsub = dp.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    dc = dsub.add_parser("check", help="build every crop and report failures by reason")
    dc.add_argument("--data", help="RSNA-format folder (default: the phantom, built on first use)")
    dc.add_argument("--cache-dir", help="cache folder (default: $SPINESWEEP_CACHE or ~/.cache/spinesweep)")
    dc.add_argument("--json", action="store_true")
    dc.set_defaults(func=cmd_data_check)

    tr = sub.add_parser("train", help="one training run of a config (the manual log's workflow)")
    tr.add_argument("--config", help="TrainConfig YAML (default: built-in defaults)")
    tr.add_argument("--data", help="RSNA-format folder (default: the config's, or the phantom)")
    tr.add_argument("--output-dir", help="where the checkpoint goes (default: a temporary folder)")
    tr.add_argument("--json", action="store_true", help="print a final JSON object (the table goes to stderr)")
    tr.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=3e-4")
    tr.set_defaults(func=cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (UserError, LayoutError, ConfigError) as e:
        print(f"optuna-run: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("optuna-run: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

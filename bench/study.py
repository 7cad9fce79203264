"""Study benchmark, through the real `optuna-run` command in scratch folders:

- overhead of Optuna + MLflow per trial against calling `fit` directly on the same config;
- pruning: the demo space with its median pruner against `none`, same sampler seed and trials:
  epochs trained and best score;
- `--workers 2` against `--workers 1` on `demo --smoke`: trials per hour.

    .venv/bin/python bench/study.py [--work DIR] [--trials N]

Writes bench/results/study.json and bench/results/study.md.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402

from bench.common import write  # noqa: E402

OPTUNA_RUN = [sys.executable, "-m", "sweep.cli"]

FIXED_SPACE = """\
# benchmark space: one fixed config, so every trial trains the same thing
#   optuna-run {path} --n-trials 3
direction: minimize
fixed:
  data.conditions: [spinal_canal_stenosis]
  data.img_size: 48
  model.backbone: resnet10t
  model.pretrained: false
  model.head: attention
  optim.epochs: 3
  optim.lr: 0.002
  augment.preset: none
params:
  optim.batch_size: {{type: categorical, choices: [16]}}
sampler: {{name: random, seed: 0}}
pruner: {{name: none}}
"""


def run_cli(args, cwd: Path, env=None) -> float:
    t0 = time.perf_counter()
    subprocess.run(OPTUNA_RUN + args, cwd=cwd, check=True, env={**os.environ, **(env or {})},
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def trial_seconds(cwd: Path, name: str) -> list[float]:
    s = optuna.load_study(study_name=name, storage=f"sqlite:///{cwd / 'studies.db'}")
    return [(t.datetime_complete - t.datetime_start).total_seconds() for t in s.trials if t.datetime_complete]


def overhead(work: Path, data: Path, n: int) -> tuple[float, float]:
    """Seconds of a trial in a study (Optuna's start to complete: ask, MLflow run, params, curves,
    pruning checks, artifacts, tell) against `fit` alone on the same config, both in this one
    warm process (a process's first trial pays torch's start-up, which is not the study's cost),
    interleaved one of each per round so that drift of the machine hits both alike."""
    from sweep.cli import main as optuna_run
    from trainer.config import TrainConfig
    from trainer.fit import fit

    cwd = work / "overhead"
    shutil.rmtree(cwd, ignore_errors=True)
    cwd.mkdir(parents=True)
    space = cwd / "fixed.yaml"
    space.write_text(FIXED_SPACE.format(path=space))
    import contextlib
    import io

    import yaml

    fixed = yaml.safe_load(FIXED_SPACE.format(path=""))["fixed"]
    cfg = TrainConfig().with_overrides({**fixed, "optim.batch_size": 16, "data.data_dir": str(data)})
    old = os.getcwd()
    os.chdir(cwd)
    try:
        direct = []
        for i in range(n + 1):  # round 0 warms both paths up and is not counted
            t0 = time.perf_counter()
            fit(cfg)
            direct.append(time.perf_counter() - t0)
            with contextlib.redirect_stdout(io.StringIO()):
                optuna_run([str(space), "--n-trials", str(i + 1), "--data", str(data), "--study-name", "fixed",
                            "--resume"])
    finally:
        os.chdir(old)
    in_study = trial_seconds(cwd, "fixed")
    return sum(direct[1:]) / n, sum(in_study[1:]) / n


def pruning(work: Path, data: Path, n: int) -> dict:
    """The demo with its pruner against `none` on the same trials: the unpruned study runs first,
    then its exact parameter sets are enqueued, in order, into the pruned study (sampling would
    otherwise diverge after the first pruned trial), so only the pruning decisions differ."""
    import re

    out = {}
    text = (ROOT / "search_spaces" / "demo.yaml").read_text()
    for pruner in ("none", "median"):
        cwd = work / f"prune-{pruner}"
        shutil.rmtree(cwd, ignore_errors=True)
        cwd.mkdir(parents=True)
        space = cwd / "demo.yaml"
        space.write_text(text if pruner == "median" else re.sub(r"(?m)^pruner: .*$", "pruner: {name: none}", text))
        args = [str(space), "--n-trials", str(n), "--data", str(data), "--study-name", "demo"]
        if pruner == "median":
            storage = f"sqlite:///{cwd / 'studies.db'}"
            replay = optuna.create_study(study_name="demo", storage=storage, direction="minimize")
            for t in out["none"]["trials"]:
                replay.enqueue_trial(t)
            args.append("--resume")
        seconds = run_cli(args, cwd)
        s = optuna.load_study(study_name="demo", storage=f"sqlite:///{cwd / 'studies.db'}")
        out[pruner] = dict(epochs=sum(len(t.intermediate_values) for t in s.trials), best=s.best_value,
                           seconds=seconds, pruned=sum(t.state == optuna.trial.TrialState.PRUNED for t in s.trials),
                           trials=[t.params for t in sorted(s.trials, key=lambda t: t.number)])
    return out


def workers(work: Path, data: Path, n: int) -> dict:
    out = {}
    for k in (1, 2):
        cwd = work / f"workers{k}"
        shutil.rmtree(cwd, ignore_errors=True)
        cwd.mkdir(parents=True)
        run_cli(["demo", "--smoke", "--n-trials", "1", "--data", str(data), "--study-name", "warm"], cwd)
        t0 = time.perf_counter()
        run_cli(["demo", "--smoke", "--n-trials", str(n), "--workers", str(k), "--data", str(data),
                 "--set", "data.max_studies=40", "--set", "optim.epochs=2"], cwd)
        s = optuna.load_study(study_name="demo-smoke", storage=f"sqlite:///{cwd / 'studies.db'}")
        first = min(t.datetime_start for t in s.trials)
        last = max(t.datetime_complete for t in s.trials)
        out[k] = dict(trials=len(s.trials), seconds=(last - first).total_seconds(),
                      wall=time.perf_counter() - t0)
        out[k]["per_hour"] = 3600 * out[k]["trials"] / out[k]["seconds"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=None)
    ap.add_argument("--trials", type=int, default=12, help="trials of each pruning study")
    ap.add_argument("--only", nargs="*", default=["overhead", "pruning", "workers"])
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="spinesweep-bench-")).resolve()
    data = work / "phantom50"
    if not (data / "train.csv").exists():
        from trainer.data.phantom import make_phantom

        make_phantom(data, studies=50, test_studies=0, seed=0, jobs=2)
    os.environ["SPINESWEEP_CACHE"] = str(work / "cache")
    rows, extra = [], {}
    if "overhead" in args.only:
        direct, in_study = overhead(work, data, 4)
        extra["overhead"] = dict(direct_fit_s=direct, trial_s=in_study)
        rows.append(dict(what="seconds per trial, in a study (Optuna + MLflow) vs fit() alone", baseline=f"{direct:.1f}",
                         value=f"{in_study:.1f}", ratio=in_study / direct, goal="<= 1.03x",
                         met=in_study / direct <= 1.03))
    if "pruning" in args.only:
        p = pruning(work, data, args.trials)
        extra["pruning"] = p
        saved = 1 - p["median"]["epochs"] / p["none"]["epochs"]
        rows.append(dict(what=f"epochs trained, demo, the same {args.trials} trials, median pruner vs none",
                         baseline=str(p["none"]["epochs"]), value=str(p["median"]["epochs"]),
                         ratio=p["median"]["epochs"] / p["none"]["epochs"], goal=">= 40% fewer", met=saved >= 0.4))
        rows.append(dict(what="best score, the same trials, median pruner vs none", baseline=f"{p['none']['best']:.4f}",
                         value=f"{p['median']['best']:.4f}", ratio=p["median"]["best"] / p["none"]["best"],
                         goal="within 5%", met=p["median"]["best"] <= 1.05 * p["none"]["best"]))
    if "workers" in args.only:
        w = workers(work, data, 8)
        extra["workers"] = w
        rows.append(dict(what="trials/hour, demo --smoke, --workers 2 vs 1", baseline=f"{w[1]['per_hour']:.0f}",
                         value=f"{w[2]['per_hour']:.0f}", ratio=w[2]["per_hour"] / w[1]["per_hour"], goal=">= 1.6x",
                         met=w[2]["per_hour"] / w[1]["per_hour"] >= 1.6))
    write("study", rows, extra=extra)


if __name__ == "__main__":
    main()

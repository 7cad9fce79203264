"""Study benchmark, through `sweep.study.run_study` (what `optuna-run SPACE` runs) in scratch folders:

- overhead of Optuna + MLflow per trial: a trial's whole cycle in a study against the time it
  spends training inside `fit` (and, as a check, `fit` alone against a one-trial study);
- pruning: the demo space with its own pruner against `none`, same sampler seed and trials:
  epochs trained and best score;
- `--workers 2` against `--workers 1` on `demo --smoke`: trials per hour.

    .venv/bin/python bench/study.py [--work DIR] [--trials N]

Writes bench/results/study.json and bench/results/study.md.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402

from bench.common import write  # noqa: E402


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


def run_in(cwd: Path, space: str, n_trials: int, **kwargs) -> float:
    """`run_study` with `cwd` as the working folder (its default stores), quietly; returns seconds."""
    from sweep.study import run_study

    old = os.getcwd()
    os.chdir(cwd)
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            run_study(space, n_trials, log=lambda line: None, **kwargs)
    finally:
        os.chdir(old)
    return time.perf_counter() - t0


def trial_seconds(cwd: Path, name: str) -> list[float]:
    s = optuna.load_study(study_name=name, storage=f"sqlite:///{cwd / 'studies.db'}")
    return [(t.datetime_complete - t.datetime_start).total_seconds() for t in s.trials if t.datetime_complete]


def overhead(work: Path, data: Path, n: int) -> dict:
    """What Optuna + MLflow add to a trial, two ways, in this one warm process (a process's first
    trial pays torch's start-up, which is not the study's cost):

    - split: one study of n + 1 trials of one fixed config; each trial's full cycle in the study
      loop (from the previous trial's completion to this one's: stale-trial check, quota, ask,
      MLflow run, params, curves, pruning checks, artifacts, tell, progress line) against the time
      spent training inside `fit` (its callbacks, which log to MLflow and report to Optuna, are
      counted as overhead). The same trials on both sides, so the machine's drift cancels out.
    - a/b: `fit` alone against a one-trial study, interleaved one of each per round; this also
      catches a study slowing `fit` itself down, but the machine's own drift between runs
      (several % on 2 shared cores) is of the order of the effect, so medians are reported.
    """
    import statistics

    import yaml

    import trainer.fit
    from trainer.config import TrainConfig

    cwd = work / "overhead"
    shutil.rmtree(cwd, ignore_errors=True)
    cwd.mkdir(parents=True)
    space = cwd / "fixed.yaml"
    space.write_text(FIXED_SPACE.format(path=space))
    fixed = yaml.safe_load(FIXED_SPACE.format(path=""))["fixed"]
    cfg = TrainConfig().with_overrides({**fixed, "optim.batch_size": 16, "data.data_dir": str(data)})
    real_fit = trainer.fit.fit
    inside = []  # seconds training inside fit, per call: fit's time less its callbacks'

    def timed_fit(c, callbacks=()):
        spent = [0.0]

        def timed(cb):
            def call(epoch, metrics):
                t = time.perf_counter()
                try:
                    return cb(epoch, metrics)
                finally:
                    spent[0] += time.perf_counter() - t
            return call

        t0 = time.perf_counter()
        try:
            return real_fit(c, callbacks=[timed(cb) for cb in callbacks])
        finally:
            inside.append(time.perf_counter() - t0 - spent[0])

    def study(name: str, total: int, fit_fn=None):
        run_in(cwd, str(space), total, data=str(data), study_name=name, resume=True, fit_fn=fit_fn)

    direct = []
    for i in range(n + 1):  # a/b; round 0 warms both paths up and is not counted
        t0 = time.perf_counter()
        real_fit(cfg)
        direct.append(time.perf_counter() - t0)
        study("ab", i + 1)
    inside.clear()
    study("split", n + 1, fit_fn=timed_fit)
    s = optuna.load_study(study_name="split", storage=f"sqlite:///{cwd / 'studies.db'}")
    done = sorted(t.datetime_complete for t in s.trials)
    cycles = [(b - a).total_seconds() for a, b in zip(done, done[1:])]  # trials 1..n
    fits = inside[1:]
    ab = trial_seconds(cwd, "ab")[1:]
    return dict(cycle_s=cycles, fit_s=fits, ratio=sum(cycles) / sum(fits),
                overhead_per_trial_s=(sum(cycles) - sum(fits)) / n,
                ab=dict(direct_fit_s=direct[1:], trial_s=ab,
                        median_ratio=statistics.median(ab) / statistics.median(direct[1:])))


def pruning(work: Path, data: Path, n: int) -> dict:
    """The demo with its pruner against `none` on the same trials: the unpruned study runs first,
    then its exact parameter sets are enqueued, in order, into the pruned study (sampling would
    otherwise diverge after the first pruned trial), so only the pruning decisions differ."""
    import re

    out = {}
    text = (ROOT / "search_spaces" / "demo.yaml").read_text()
    for pruner in ("none", "space"):
        cwd = work / f"prune-{pruner}"
        shutil.rmtree(cwd, ignore_errors=True)
        cwd.mkdir(parents=True)
        space = cwd / "demo.yaml"
        space.write_text(text if pruner == "space" else re.sub(r"(?m)^pruner: .*$", "pruner: {name: none}", text))
        resume = pruner == "space"
        if resume:
            storage = f"sqlite:///{cwd / 'studies.db'}"
            replay = optuna.create_study(study_name="demo", storage=storage, direction="minimize")
            for t in out["none"]["trials"]:
                replay.enqueue_trial(t)
        seconds = run_in(cwd, str(space), n, data=str(data), study_name="demo", resume=resume)
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
        run_in(cwd, "demo", 1, smoke=True, data=str(data), study_name="warm")
        t0 = time.perf_counter()
        run_in(cwd, "demo", n, smoke=True, workers=k, data=str(data),
               pinned={"data.max_studies": "40", "optim.epochs": "2"})
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
        o = overhead(work, data, 5)
        extra["overhead"] = o
        fit_s, cycle_s = sum(o["fit_s"]) / len(o["fit_s"]), sum(o["cycle_s"]) / len(o["cycle_s"])
        rows.append(dict(what="seconds per trial: its whole cycle in a study (Optuna + MLflow) vs training "
                         "inside fit(), the same 5 trials", baseline=f"{fit_s:.2f}", value=f"{cycle_s:.2f}",
                         ratio=o["ratio"], goal="<= 1.03x", met=o["ratio"] <= 1.03))
    if "pruning" in args.only:
        p = pruning(work, data, args.trials)
        extra["pruning"] = p
        from sweep.space import load_space

        name = load_space("demo").pruner["name"].replace("_", " ")
        saved = 1 - p["space"]["epochs"] / p["none"]["epochs"]
        rows.append(dict(what=f"epochs trained, demo, the same {args.trials} trials, its {name} pruner vs none",
                         baseline=str(p["none"]["epochs"]), value=str(p["space"]["epochs"]),
                         ratio=p["space"]["epochs"] / p["none"]["epochs"], goal=">= 40% fewer", met=saved >= 0.4))
        rows.append(dict(what=f"best score, the same trials, its {name} pruner vs none", baseline=f"{p['none']['best']:.4f}",
                         value=f"{p['space']['best']:.4f}", ratio=p["space"]["best"] / p["none"]["best"],
                         goal="within 5%", met=p["space"]["best"] <= 1.05 * p["none"]["best"]))
    if "workers" in args.only:
        w = workers(work, data, 8)
        extra["workers"] = w
        rows.append(dict(what="trials/hour, demo --smoke, --workers 2 vs 1", baseline=f"{w[1]['per_hour']:.0f}",
                         value=f"{w[2]['per_hour']:.0f}", ratio=w[2]["per_hour"] / w[1]["per_hour"], goal=">= 1.6x",
                         met=w[2]["per_hour"] / w[1]["per_hour"] >= 1.6))
    write("study", rows, extra=extra)


if __name__ == "__main__":
    main()

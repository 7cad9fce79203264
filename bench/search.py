"""Search quality, measured on a tabular benchmark (the way HPOBench, LCBench and YAHPO do it):
train a grid over the `demo` space once, keep every epoch's validation score, then replay any
sampler and pruner over the table in seconds.

    .venv/bin/python bench/search.py --build [--jobs 2]   # trains the grid (about an hour on 2 cores)
    .venv/bin/python bench/search.py --replay [--seeds 20] # replays every strategy over the table

--build writes bench/results/search_grid.csv (committed: replays need no training), one row per
config and epoch, appended as each config finishes, so an interrupted build resumes where it
stopped. --replay writes bench/results/search.json, search.md (the table the README quotes) and
docs/img/search_regret.html/.png (regret against epochs spent, one line per strategy with its
quartile band).

The grid: every head and every window ratio the space allows, five learning rates (log-spaced over
the space's range) and three dropouts, the space's fixed values otherwise (10 epochs, seed 42,
fold 0); the lstm head's `rnn_hidden` is held at 32 (the replay space holds it there too).
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, machine  # noqa: E402

GRID_CSV = RESULTS / "search_grid.csv"
GRID_META = RESULTS / "search_grid.json"
FIGURE = ROOT / "docs" / "img" / "search_regret"
SPACE = "demo"
RNN_HIDDEN = 32
FIELDS = ["config", "head", "window_ratio", "lr", "dropout", "epoch", "score", "val_loss", "seconds"]


# ---------------------------------------------------------------- the grid

def grid_axes(space) -> dict[str, list]:
    """The grid's values per parameter, from the space's own distributions."""
    p = {q.key: q for q in space.params}
    lr = p["optim.lr"]
    lrs = [round(math.exp(math.log(lr.low) + i * (math.log(lr.high) - math.log(lr.low)) / 4), 7) for i in range(5)]
    w = p["data.window_ratio"]
    n_w = int(round((w.high - w.low) / w.step)) + 1
    windows = [round(w.low + i * w.step, 6) for i in range(n_w)]
    d = p["model.dropout"]
    dropouts = [round(d.low + i * (d.high - d.low) / 2, 6) for i in range(3)]
    return {"model.head": list(p["model.head"].choices), "data.window_ratio": windows,
            "optim.lr": lrs, "model.dropout": dropouts}


def grid_configs(space) -> list[dict]:
    axes = grid_axes(space)
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def config_id(values: dict) -> str:
    return (f"{values['model.head']}-w{values['data.window_ratio']:g}-lr{values['optim.lr']:g}"
            f"-d{values['model.dropout']:g}")


def _train_one(args) -> list[dict]:
    """One grid point, every epoch's validation score (a worker process)."""
    values, data_dir, threads = args
    import torch

    torch.set_num_threads(threads)
    from sweep.space import load_space
    from trainer.fit import fit

    space = load_space(SPACE)
    cfg = space.base_config(data_dir=data_dir).with_overrides(
        {**values, "model.rnn_hidden": RNN_HIDDEN, "num_workers": 0})
    rows, t0 = [], time.perf_counter()

    def record(epoch: int, metrics: dict) -> None:
        rows.append(dict(config=config_id(values), head=values["model.head"],
                         window_ratio=values["data.window_ratio"], lr=values["optim.lr"],
                         dropout=values["model.dropout"], epoch=epoch, score=round(metrics["score"], 6),
                         val_loss=round(metrics["val_loss"], 6), seconds=round(time.perf_counter() - t0, 2)))

    fit(cfg, callbacks=[record])
    return rows


def build(jobs: int, data_dir: str) -> None:
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp

    from sweep.space import load_space

    space = load_space(SPACE)
    configs = grid_configs(space)
    done = set()
    if GRID_CSV.exists():
        with GRID_CSV.open() as f:
            done = {r["config"] for r in csv.DictReader(f)}
    todo = [c for c in configs if config_id(c) not in done]
    print(f"grid: {len(configs)} configs x {space.base_config().optim.epochs} epochs; "
          f"{len(done)} already in {GRID_CSV.name}, {len(todo)} to train with {jobs} processes", flush=True)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    t0 = time.perf_counter()
    new = not GRID_CSV.exists()
    RESULTS.mkdir(exist_ok=True)
    with GRID_CSV.open("a", newline="") as f, ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
        out = csv.DictWriter(f, FIELDS)
        if new:
            out.writeheader()
        for i, rows in enumerate(pool.map(_train_one, [(c, data_dir, threads) for c in todo]), 1):
            out.writerows(rows)
            f.flush()
            el = time.perf_counter() - t0
            print(f"  {i}/{len(todo)} {rows[0]['config']}: best {min(r['score'] for r in rows):.4f} "
                  f"({rows[-1]['seconds']:.0f} s; {el / 60:.1f} min, ETA {el / i * (len(todo) - i) / 60:.0f} min)",
                  flush=True)
    meta = json.loads(GRID_META.read_text()) if GRID_META.exists() else {"build_seconds": 0.0}
    meta.update(space=SPACE, configs=len(configs), epochs=space.base_config().optim.epochs,
                axes=grid_axes(space), rnn_hidden=RNN_HIDDEN, jobs=jobs, machine=machine(),
                build_seconds=round(meta["build_seconds"] + time.perf_counter() - t0, 1))
    GRID_META.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"grid built: {GRID_CSV} ({meta['build_seconds'] / 60:.1f} min of training in all)")


# ---------------------------------------------------------------- the replay

# the strategies: every sampler with no pruner, the space's pruner and the usual variants. QMC
# stands for "CMA-ES or QMC": CMA-ES does not apply to the categorical head (it falls back to
# independent sampling for it), QMC covers the whole space.
SAMPLER_NAMES = ("random", "tpe", "gp", "qmc")
PRUNER_NAMES = ("none", "space", "median", "successive_halving", "hyperband")
HORIZON = 0.5  # a replayed study spends at most half the grid's total epochs
# Optuna's GPSampler costs about a second per trial here, growing with the trials (its regime is
# small budgets): it is replayed over a quarter of the grid, with and without the space's pruner
GP_HORIZON, GP_PRUNERS = 0.25, ("none", "space")
BUDGETS = (0.10, 0.25, 0.50)  # regret reported at these fractions of the grid's total epochs
WITHIN = 0.02  # "found": within 2% of the grid's best score


def load_grid() -> tuple[dict[tuple, list[float]], dict]:
    """{(head, window, lr, dropout): [score of epoch 1..E]} and the grid's metadata."""
    meta = json.loads(GRID_META.read_text())
    curves: dict[tuple, dict[int, float]] = {}
    with GRID_CSV.open() as f:
        for r in csv.DictReader(f):
            key = (r["head"], float(r["window_ratio"]), float(r["lr"]), float(r["dropout"]))
            curves.setdefault(key, {})[int(r["epoch"])] = float(r["score"])
    epochs = meta["epochs"]
    table = {k: [v[e] for e in range(1, epochs + 1)] for k, v in curves.items() if len(v) == epochs}
    return table, meta


def _sampler(name: str, space, seed: int):
    import optuna

    if name == "tpe":  # the space's own settings, with this replay's seed
        args = {k: v for k, v in space.sampler.items() if k not in ("name", "seed")}
        return optuna.samplers.TPESampler(seed=seed, **args)
    return {"random": optuna.samplers.RandomSampler, "gp": optuna.samplers.GPSampler,
            "cmaes": optuna.samplers.CmaEsSampler, "qmc": optuna.samplers.QMCSampler}[name](seed=seed)


def _pruner(name: str, space, epochs: int):
    import optuna

    if name == "space":
        return space.make_pruner()
    return {"none": optuna.pruners.NopPruner(),
            "median": optuna.pruners.MedianPruner(),  # Optuna's defaults: 5 startup trials, no warm-up
            "successive_halving": optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3),
            "hyperband": optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3),
            }[name]


def _nearest(value: float, grid: list[float], log: bool) -> float:
    f = (lambda v: math.log(v)) if log else (lambda v: v)
    return min(grid, key=lambda g: abs(f(g) - f(value)))


def replay_one(args) -> dict:
    """One strategy, one seed: ask/tell over the table as a study would run it, each trial's
    value the best epoch's score, reported to the pruner as the best so far at every epoch (as
    `sweep.objective.Reporter` does, never pruning at the last epoch). A pruned trial costs the
    epochs it ran. Returns the incumbent (best completed value) after every trial, with the
    epochs spent so far."""
    sampler_name, pruner_name, seed, table, axes, total = args
    import warnings

    import optuna

    from sweep.space import load_space

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if sampler_name == "gp":  # GPSampler fits with torch: one thread per replay process, no oversubscription
        import torch

        torch.set_num_threads(1)
    space = load_space(SPACE)
    epochs = len(next(iter(table.values())))
    params = {p.key: p for p in space.params if p.key != "model.rnn_hidden"}  # held fixed in the grid
    # a fixed study name: Hyperband assigns brackets by a hash of the study's name and trial number
    study = optuna.create_study(study_name=f"replay-{sampler_name}-{pruner_name}-{seed}", direction=space.direction,
                                sampler=_sampler(sampler_name, space, seed),
                                pruner=_pruner(pruner_name, space, epochs))
    spent, best, trace = 0, math.inf, []
    horizon = GP_HORIZON if sampler_name == "gp" else HORIZON
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental samplers, CMA-ES's categorical fallback
        while spent < total * horizon:
            trial = study.ask()
            v = {k: p.suggest(trial) for k, p in params.items()}
            key = (v["model.head"], _nearest(v["data.window_ratio"], axes["data.window_ratio"], False),
                   _nearest(v["optim.lr"], axes["optim.lr"], True), _nearest(v["model.dropout"], axes["model.dropout"], False))
            curve = table[key]
            so_far, pruned = math.inf, False
            for epoch, score in enumerate(curve, 1):
                so_far = min(so_far, score)
                trial.report(so_far, epoch)
                if epoch < epochs and trial.should_prune():
                    pruned = True
                    break
            spent += epoch
            if pruned:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            else:
                study.tell(trial, so_far)
                best = min(best, so_far)
            trace.append((spent, best))
    return {"sampler": sampler_name, "pruner": pruner_name, "seed": seed, "trace": trace, "horizon": horizon}


def _incumbent_at(trace, epochs: float) -> float:
    best = math.inf
    for spent, b in trace:
        if spent > epochs:
            break
        best = b
    return best


def _quartiles(values: list[float], pessimistic: bool = False) -> tuple[float, float, float]:
    """Quartiles; `pessimistic` (or any infinite value: a seed that never got there, no completed
    trial yet) takes the upper of two middle values instead of interpolating."""
    import numpy as np

    a = np.asarray(values, dtype=float)
    q = np.percentile(a, [25, 50, 75], method="higher" if pessimistic or np.isinf(a).any() else "linear")
    return tuple(float(x) for x in q)


def summarise(runs: list[dict], grid_best: float, total: int) -> dict:
    """Per strategy: epochs to reach within 2% of the grid's best (median, quartiles; inf where a
    seed never got there within the horizon) and the relative regret at 10/25/50% of the grid's
    epochs (median, quartiles)."""
    out: dict[str, dict] = {}
    for r in runs:
        out.setdefault(f"{r['sampler']}+{r['pruner']}", {"sampler": r["sampler"], "pruner": r["pruner"],
                                                          "to_within": [], "regret": {b: [] for b in BUDGETS}})
        s = out[f"{r['sampler']}+{r['pruner']}"]
        hit = next((spent for spent, b in r["trace"] if b <= grid_best * (1 + WITHIN)), math.inf)
        s["to_within"].append(hit)
        for b in BUDGETS:
            s["regret"][b].append(_incumbent_at(r["trace"], b * total) / grid_best - 1 if b <= r["horizon"]
                                  else math.nan)
    table = {}
    for name, s in out.items():
        q = _quartiles(s["to_within"], pessimistic=True)
        table[name] = {
            "sampler": s["sampler"], "pruner": s["pruner"], "seeds": len(s["to_within"]),
            "epochs_to_within": {"q25": q[0], "median": q[1], "q75": q[2]},
            "fraction_to_within": {k: v / total for k, v in zip(("q25", "median", "q75"), q)},
            "reached": sum(math.isfinite(x) for x in s["to_within"]),
            "horizon": max(r["horizon"] for r in runs if f"{r['sampler']}+{r['pruner']}" == name),
            "regret": {f"{int(b * 100)}%": (dict(zip(("q25", "median", "q75"), _quartiles(v)))
                                            if not any(math.isnan(x) for x in v) else None)
                       for b, v in s["regret"].items()},
        }
    return table


def curves_for_figure(runs: list[dict], grid_best: float, total: int, points: int = 60) -> dict:
    """Per strategy: relative regret quartiles on a grid of epochs (0 to the horizon)."""
    import numpy as np

    xs = [total * HORIZON * i / points for i in range(1, points + 1)]
    by: dict[str, list] = {}
    for r in runs:
        by.setdefault(f"{r['sampler']}+{r['pruner']}", []).append(
            [_incumbent_at(r["trace"], x) / grid_best - 1 if x <= r["horizon"] * total + 1e-9 else math.nan for x in xs])
    out = {}
    for name, rows in by.items():
        a = np.asarray(rows, dtype=float)
        keep = ~np.isnan(a).any(axis=0)
        q = np.percentile(a[:, keep], [25, 50, 75], axis=0, method="higher")
        q[np.isinf(q)] = np.nan  # no completed trial yet: a gap in the line
        out[name] = {"x": [x / total for x, k in zip(xs, keep) if k], "q25": q[0].tolist(), "median": q[1].tolist(),
                     "q75": q[2].tolist()}
    return out


def figure(curves: dict, shipped: str, path: Path, best: list[str] | None = None) -> None:
    """Relative regret against the fraction of the grid's epochs spent: left, every sampler without
    a pruner; right, the shipped settings against the best strategies (`best`). Median line,
    quartile band."""
    import plotly.graph_objects as go
    from plotly.colors import qualitative
    from plotly.subplots import make_subplots

    panels = [[k for k in curves if k.endswith("+none")], [shipped] + [k for k in (best or []) if k != shipped]]
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, subplot_titles=[
        "samplers, no pruner", "the shipped demo settings (bold) and the best strategies"])
    palette = {name: qualitative.Plotly[i % 10] for i, name in enumerate(sorted({n for ns in panels for n in ns}))}
    for col, names in enumerate(panels, 1):
        for name in sorted(names):
            c = curves[name]
            colour = palette[name]
            x = [100 * v for v in c["x"]]
            fig.add_trace(go.Scatter(x=x + x[::-1], y=[100 * v for v in c["q75"]] + [100 * v for v in c["q25"][::-1]],
                                     fill="toself", fillcolor=colour, opacity=0.15, line=dict(width=0),
                                     showlegend=False, hoverinfo="skip", legendgroup=f"{col}{name}"), 1, col)
            fig.add_trace(go.Scatter(x=x, y=[100 * v for v in c["median"]], mode="lines", name=name,
                                     legendgroup=f"{col}{name}", showlegend=col == 2 or name not in panels[1],
                                     line=dict(color=colour, width=4 if name == shipped else 2, shape="hv")), 1, col)
        fig.add_hline(y=100 * WITHIN, line=dict(dash="dot", color="#888"), row=1, col=col,
                      **({"annotation_text": "within 2%"} if col == 1 else {}))
    fig.update_xaxes(title_text="epochs spent (% of the grid's total)", range=[0, 100 * HORIZON])
    fig.update_yaxes(title_text="regret: best found / grid's best - 1 (%)", row=1, col=1)
    fig.update_layout(height=520, width=1280, template="plotly_white",
                      title="Search quality on the demo grid (median over seeds, band: quartiles)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(path.with_suffix(".html"), include_plotlyjs="cdn", config={"displayModeBar": False})
    try:
        from dashboards.browser import screenshot

        full = path.with_name(path.name + "-full.html")
        fig.write_html(full, include_plotlyjs=True, config={"displayModeBar": False})
        screenshot(full.resolve().as_uri(), path.with_suffix(".png"), width=1300, height=560)
        full.unlink()
    except Exception as e:  # no chromium: the HTML is still there
        print(f"figure: PNG not written ({type(e).__name__}: {e})")


def replay(seeds: int, samplers=SAMPLER_NAMES, pruners=PRUNER_NAMES, jobs: int = 0) -> dict:
    import multiprocessing as mp

    from sweep.space import load_space

    t0 = time.perf_counter()
    table, meta = load_grid()
    axes = {k: [float(v) for v in vs] for k, vs in meta["axes"].items() if k != "model.head"}
    total = len(table) * meta["epochs"]
    grid_best = min(min(c) for c in table.values())
    space = load_space(SPACE)
    shipped = f"{space.sampler['name']}+space"
    work = [(sa, pr, seed, table, axes, total) for sa in samplers for pr in pruners for seed in range(seeds)
            if sa != "gp" or pr in GP_PRUNERS]
    work.sort(key=lambda w: w[0] != "gp")  # the slow GP studies first, so the pool ends evenly
    jobs = jobs or len(os.sched_getaffinity(0))
    with mp.get_context("fork").Pool(jobs) as pool:
        runs = pool.map(replay_one, work, chunksize=1)
    summary = summarise(runs, grid_best, total)
    seconds = time.perf_counter() - t0
    random_median = summary.get("random+none", {}).get("epochs_to_within", {}).get("median")
    ship = summary.get(shipped, {})
    payload = {
        "benchmark": "search", "machine": machine(), "seconds": round(seconds, 1), "seeds": seeds,
        "grid": {"configs": len(table), "epochs": meta["epochs"], "total_epochs": total, "best": grid_best,
                 "best_config": "-".join(map(str, min(table, key=lambda k: min(table[k])))),
                 "build_seconds": meta.get("build_seconds"), "axes": meta["axes"], "rnn_hidden": meta.get("rnn_hidden")},
        "within": WITHIN, "horizon": HORIZON, "shipped": shipped, "strategies": summary,
        "goals": {
            "shipped_median_fraction_to_within": ship.get("fraction_to_within", {}).get("median"),
            # random's median beyond the horizon: the ratio is at most shipped / horizon (a bound)
            "shipped_over_random": (None if not ship or random_median is None else
                                    ship["epochs_to_within"]["median"] / min(random_median, HORIZON * total)),
            "random_beyond_horizon": random_median is not None and not math.isfinite(random_median),
            "replay_seconds": round(seconds, 1),
        },
    }
    payload["rows"] = _rows(payload)  # the goals in the form bench/collect.py merges into results.md
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "search.json").write_text(json.dumps(payload, indent=2, default=float) + "\n")
    (RESULTS / "search.md").write_text(markdown(payload))
    ranked = sorted(summary, key=lambda k: (summary[k]["epochs_to_within"]["median"], summary[k]["regret"]["25%"]["median"]))
    figure(curves_for_figure(runs, grid_best, total), shipped, FIGURE, best=ranked[:3])
    print(markdown(payload))
    return payload


def _rows(p: dict) -> list[dict]:
    total, when = p["grid"]["total_epochs"], p["machine"]["when"]
    ship, rnd = p["strategies"].get(p["shipped"]), p["strategies"].get("random+none")
    gl = p["goals"]
    rows = []
    if ship and rnd:
        s, r = ship["epochs_to_within"]["median"], rnd["epochs_to_within"]["median"]
        ratio = gl["shipped_over_random"]
        rows.append(dict(
            what=f"epochs to reach within 2% of the grid's best ({p['grid']['configs']} demo configs x "
                 f"{p['grid']['epochs']} epochs, replayed, median of {p['seeds']} seeds, % of the grid's epochs): "
                 f"shipped demo settings ({p['shipped']}) vs random search",
            baseline=_fmt_epochs(r, total, rnd["horizon"]), value=_fmt_epochs(s, total, ship["horizon"]),
            ratio=ratio if ratio is not None and math.isfinite(ratio) else None,
            goal="<= 20% and <= 0.5x", met=bool(math.isfinite(s) and s <= 0.2 * total and ratio is not None
                                                 and ratio <= 0.5), when=when))
    rows.append(dict(what="bench/search.py --replay, seconds on this machine", baseline="-",
                     value=f"{p['seconds']:.0f}", ratio=None, goal="< 60 s", met=p["seconds"] < 60, when=when))
    return rows


def _fmt_epochs(v: float, total: int, horizon: float) -> str:
    return f">{100 * horizon:.0f}%" if not math.isfinite(v) else f"{100 * v / total:.0f}%"


def markdown(p: dict) -> str:
    g, total = p["grid"], p["grid"]["total_epochs"]
    m = p["machine"]
    lines = [f"Machine: {m['cores']} cores, {m['memory']}; python {m['python']}, torch {m['torch']}; {m['when']}. "
             f"Grid: {g['configs']} configs x {g['epochs']} epochs = {total} epochs (built in "
             f"{(g['build_seconds'] or 0) / 60:.0f} min); best score {g['best']:.4f} ({g['best_config']}). "
             f"{p['seeds']} seeds per strategy; replay {p['seconds']:.0f} s.", "",
             "| strategy | epochs to within 2% of the best (median [q25, q75], % of the grid) | seeds that got there "
             "| regret at 10% | regret at 25% | regret at 50% |",
             "|---|---|---|---|---|---|"]
    rows = sorted(p["strategies"].items(), key=lambda kv: (kv[1]["epochs_to_within"]["median"],
                                                           kv[1]["regret"]["25%"]["median"]))
    for name, s in rows:
        e = s["epochs_to_within"]
        shipped = " (shipped)" if name == p["shipped"] else ""
        reg = " | ".join("-" if s["regret"][b] is None else
                         f"{100 * s['regret'][b]['median']:.1f}% [{100 * s['regret'][b]['q25']:.1f}, "
                         f"{100 * s['regret'][b]['q75']:.1f}]" for b in ("10%", "25%", "50%"))
        h = s["horizon"]
        lines.append(f"| {name}{shipped} | {_fmt_epochs(e['median'], total, h)} [{_fmt_epochs(e['q25'], total, h)}, "
                     f"{_fmt_epochs(e['q75'], total, h)}] | {s['reached']}/{s['seeds']} | {reg} |")
    gl = p["goals"]
    frac, ratio = gl["shipped_median_fraction_to_within"], gl["shipped_over_random"]
    lines += ["", "| goal | measured | met |", "|---|---|---|",
              f"| shipped settings reach within 2% in <= 20% of the grid's epochs (median) | "
              f"{'-' if frac is None else _fmt_epochs(frac * total, total, HORIZON)} | "
              f"{'yes' if frac is not None and frac <= 0.20 else 'NO'} |",
              f"| ... in at most half the epochs random search needs (median) | "
              f"{'-' if ratio is None or not math.isfinite(ratio) else ('< ' if gl['random_beyond_horizon'] else '') + f'{ratio:.2f}x'}"
              f"{' (random: beyond the horizon)' if gl['random_beyond_horizon'] else ''} | "
              f"{'yes' if ratio is not None and ratio <= 0.5 else 'NO'} |",
              f"| `--replay` under 60 s on 2 cores | {p['seconds']:.0f} s | {'yes' if p['seconds'] < 60 else 'NO'} |"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--build", action="store_true", help="train the grid (resumes an interrupted build)")
    mode.add_argument("--replay", action="store_true", help="replay every strategy over the table")
    ap.add_argument("--jobs", type=int, default=2, help="--build: training processes (default 2)")
    ap.add_argument("--data", default=str(ROOT / "data" / "phantom"), help="--build: the phantom folder")
    ap.add_argument("--seeds", type=int, default=20, help="--replay: seeds per strategy (default 20)")
    ap.add_argument("--samplers", default=",".join(SAMPLER_NAMES), help="--replay: which samplers (default: all)")
    ap.add_argument("--pruners", default=",".join(PRUNER_NAMES), help="--replay: which pruners (default: all)")
    args = ap.parse_args(argv)
    if args.build:
        build(args.jobs, args.data)
    else:
        replay(args.seeds, tuple(args.samplers.split(",")), tuple(args.pruners.split(",")))


if __name__ == "__main__":
    main()

"""Benchmark of the localiser (issue 20), on a phantom (small by default, `--scale real` for the
competition's sizes):

1. the mean-position guess (`LevelPrior`): how far it misses the labelled sagittal points, in disc
   spacings (DOMAIN.md's measure of the real set: median 1.4, 84-89% beyond half a spacing);
2. the localiser trained on folds 1-3, its out-of-fold points on fold 0: error in mm (median, p90)
   per plane, level accuracy, slice error; and the guess's on the same points;
3. the demo classifier (the `demo` space's fixed values and a good sampled set) trained on folds
   1-3 and scored on fold 0 through the real CV path: `fit` with ``data.val_points: labelled`` and
   the same fit with ``data.val_points: oof`` (fold 0 cropped around the localiser's out-of-fold
   points), without and with crop-centre jitter (``augment.crop_shift``); the mean-position guess
   by re-predicting the labelled fit's checkpoint with crops around the guess;
4. localisation seconds per study on one core.

    .venv/bin/python -m bench.localize [--scale small|real] [--work DIR] [--epochs N] [--reuse]

`--reuse` evaluates the localiser checkpoint and reads the classifier fits' scores an earlier run
left in `--work` (``loc/checkpoint.pt``, ``cls*/result.json``).

Writes bench/results/localize_<scale>.json and .md.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench.common import write
from trainer.config import TrainConfig
from trainer.data.cache import default_cache_dir
from trainer.data.layout import Layout
from trainer.data.volumes import SeriesRef, VolumeStore

LOCALIZER = {
    "task": "localize", "model": {"backbone": "test_resnet", "pretrained": False, "in_chans": 3},
    "optim": {"lr": 3e-3, "epochs": 14, "batch_size": 16, "warmup_ratio": 0.1},
    "localizer": {"img_size": 96, "stride": 2, "negatives": 0.15, "sigma": 2.0, "affine": 0.5}, "device": "cpu",
}
SHIFT = 0.15  # crop_shift of the jittered classifier: a crop's centre moves up to 15% of its half side
CLASSIFIER = {  # the demo space's fixed values and a set from the top of its grid (bench/search.py)
    "data": {"conditions": ["spinal_canal_stenosis"], "img_size": 40, "sag_t2_slices": 3, "window_ratio": 0.15},
    "model": {"backbone": "resnet10t", "pretrained": False, "head": "attention", "dropout": 0.2},
    "optim": {"epochs": 10, "warmup_ratio": 0.1, "scheduler": "constant", "ema": 0.9, "batch_size": 8, "lr": 3e-3},
    "augment": {"preset": "none"}, "device": "cpu",
}


def ensure_phantom(work: Path, scale: str) -> Path:
    from trainer.data.phantom import make_phantom

    data = work / f"phantom_{scale}"
    if not (data / "train.csv").exists():
        make_phantom(data, studies=50 if scale == "small" else 60, test_studies=0, seed=0, jobs=2, scale=scale)
    return data


def guess_miss(layout: Layout, store: VolumeStore) -> dict:
    from trainer.infer import LevelPrior
    from trainer.points.metrics import pixel_miss

    prior = LevelPrior.fit(layout)
    guesses = pd.concat([prior.coordinates(s, layout.series_of(s), lambda i, s=s: store.open(
        SeriesRef(s, i, layout.series_dir(s, i)))) for s in layout.study_ids])
    m = pixel_miss(layout.coordinates, guesses)
    canal = m[m["condition"] == "spinal_canal_stenosis"]["miss"]
    foramen = m[m["condition"] != "spinal_canal_stenosis"]["miss"]
    return dict(canal_median=canal.median(), canal_p90=canal.quantile(0.9), canal_beyond_half=(canal > 0.5).mean(),
                foramen_median=foramen.median(), foramen_beyond_half=(foramen > 0.5).mean(),
                all_median=m["miss"].median(), all_beyond_half=(m["miss"] > 0.5).mean())


def classifier_scores(data: Path, work: Path, points_file: Path, reuse: bool, crop_shift: float = 0.0) -> dict:
    """The demo classifier on fold 0 through the real CV path, twice: `fit` with
    ``data.val_points: labelled`` and the same fit with ``data.val_points: oof`` (validation crops
    cut around the localiser's out-of-fold points in `points_file`, training crops on the labelled
    points), each scored as a trial is (its best epoch's validation score). The mean-position guess
    has no fit of its own: the labelled fit's checkpoint re-predicts fold 0 with crops cut around
    the guess (`predict_studies`, as `predict` does for a test study), and, for comparison, around
    the localiser's points. `reuse`: read the scores an earlier run left in `work`."""
    import json

    from trainer.fit import fit, train_val_split
    from trainer.infer import LevelPrior, PointTable, predict_studies
    from trainer.data.cache import data_fingerprint
    from trainer.metric import build_solution, score_groups

    tag = "" if not crop_shift else f"_shift{crop_shift}"
    base = TrainConfig.from_dict(CLASSIFIER).with_overrides({"data.data_dir": str(data), "augment.crop_shift": crop_shift})
    out: dict = {}
    for points in ("labelled", "oof"):
        folder = work / f"cls{tag}_{points}"
        saved = folder / "result.json"
        if reuse and saved.exists():
            out[points] = json.loads(saved.read_text())
            continue
        cfg = base.with_overrides({"output_dir": str(folder), "data.val_points": points,
                                   **({"data.val_points_file": str(points_file)} if points == "oof" else {})})
        t = time.perf_counter()
        result = fit(cfg)
        out[points] = dict(score=result.score, groups=result.groups, best_epoch=result.best_epoch,
                           prior_score=result.prior_score, history=[h["score"] for h in result.history],
                           checkpoint=str(result.checkpoint), minutes=round((time.perf_counter() - t) / 60, 2))
        saved.write_text(json.dumps(_plain(out[points]), indent=2))
    layout = Layout(data)
    train_ids, val_ids = train_val_split(layout, base, default_cache_dir(), data_fingerprint(layout))
    solution = build_solution(layout, val_ids, base.data.conditions)
    checkpoint = out["labelled"]["checkpoint"]
    for name, source in (("guess (re-predicted)", LevelPrior.fit(layout, study_ids=train_ids)),
                         ("localiser OOF (re-predicted)", PointTable.from_csv(points_file))):
        pred = predict_studies([checkpoint], data, val_ids, split="train", prior=source)
        out[name] = score_groups(solution, pred).score
    return out


def evaluate_checkpoint(localizer, cfg: TrainConfig, layout: Layout, store: VolumeStore):
    """(OOF points, groups, the guess's groups) of a trained localiser on fold `cfg.data.fold`, as a
    test study is searched (`Localizer.locate`)."""
    from trainer.data.cache import data_fingerprint
    from trainer.points.fit import prior_points
    from trainer.points.metrics import score_points, with_patient_positions
    from trainer.training import train_val_split

    cache = default_cache_dir()
    train_ids, val_ids = train_val_split(layout, cfg, cache, data_fingerprint(layout))

    def load(s, i):
        return store.open(SeriesRef(int(s), int(i), layout.series_dir(s, i)))

    oof = pd.concat([localizer.locate(s, layout.series_of(s), lambda i, s=s: load(s, i)) for s in val_ids],
                    ignore_index=True)
    labelled = layout.coordinates[layout.coordinates["study_id"].isin(val_ids)].reset_index(drop=True)
    solution = with_patient_positions(labelled, load)
    guess = with_patient_positions(prior_points(layout, train_ids, val_ids, load, cache), load)
    return oof, score_points(solution, oof).groups, score_points(solution, guess).groups


def _plain(v):
    """numpy scalars and containers as JSON-ready Python values."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v.item() if isinstance(v, np.generic) else v


def per_study_seconds(localizer, layout: Layout, store: VolumeStore, ids) -> float:
    torch.set_num_threads(1)
    times = []
    for s in ids:
        series = layout.series_of(s)
        load = lambda i, s=s: store.open(SeriesRef(s, i, layout.series_dir(s, i)))  # noqa: E731
        localizer.locate(s, series, load)  # volumes opened, allocator warm
        t = time.perf_counter()
        localizer.locate(s, series, load)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", choices=["small", "real"], default="small")
    ap.add_argument("--work", default=None)
    ap.add_argument("--epochs", type=int, default=LOCALIZER["optim"]["epochs"])
    ap.add_argument("--reuse", action="store_true", help="evaluate the checkpoints an earlier run left in --work")
    args = ap.parse_args()
    from trainer.fit import fit
    from trainer.points.locate import Localizer

    work = Path(args.work or tempfile.mkdtemp(prefix="spinesweep-bench-localize-"))
    data = ensure_phantom(work, args.scale)
    layout = Layout(data)
    store = VolumeStore(default_cache_dir())
    t0 = time.perf_counter()
    miss = guess_miss(layout, store)
    cfg = TrainConfig.from_dict(LOCALIZER).with_overrides({"data.data_dir": str(data), "output_dir": str(work / "loc"),
                                                           "optim.epochs": args.epochs})
    t = time.perf_counter()
    checkpoint = work / "loc" / "checkpoint.pt"
    if args.reuse and checkpoint.exists():
        localizer = Localizer.from_checkpoints([checkpoint])
        oof, g, p = evaluate_checkpoint(localizer, cfg, layout, store)
    else:
        loc = fit(cfg)
        localizer = Localizer.from_checkpoints([loc.checkpoint])
        oof, g, p = loc.oof, loc.groups, loc.prior_groups
    train_minutes = (time.perf_counter() - t) / 60
    val_ids = sorted(oof["study_id"].unique().tolist())
    threads = torch.get_num_threads()
    seconds = per_study_seconds(localizer, layout, store, val_ids[:6])  # on one thread
    torch.set_num_threads(threads)
    from trainer.points.metrics import competition_form

    points_file = work / "localizer_oof_coordinates.csv"  # fold 0's points, as a localiser trial logs them
    competition_form(oof).to_csv(points_file, index=False)
    cls = classifier_scores(data, work, points_file, args.reuse)
    # crop-centre jitter in training (augment.crop_shift): robustness to the localiser's error
    shifted = classifier_scores(data, work, points_file, args.reuse, crop_shift=SHIFT)

    def row(what, baseline, value, goal, met, ratio=None):
        return dict(what=what, baseline=baseline, value=value, ratio=None if ratio is None else float(ratio), goal=goal,
                    met=None if met is None else bool(met))

    lab, via_oof, guess = cls["labelled"]["score"], cls["oof"]["score"], cls["guess (re-predicted)"]
    s_lab, s_loc, s_guess = shifted["labelled"]["score"], shifted["oof"]["score"], shifted["guess (re-predicted)"]
    rows = [
        row("mean-position guess: sagittal points' miss in disc spacings, median (canal / foramina)", "real set: 1.4 / 1.3",
            f"{miss['canal_median']:.2f} / {miss['foramen_median']:.2f}", ">= 1.0", miss["all_median"] >= 1.0),
        row("mean-position guess: sagittal points more than half a spacing off", "real set: 84-89%",
            f"{miss['all_beyond_half']:.0%}", ">= 60%", miss["all_beyond_half"] >= 0.6),
        row("localiser sagittal error, mm: median (guess)", f"{p.get('sagittal_median_mm', np.nan):.1f}",
            f"{g['sagittal_median_mm']:.1f}", "<= 3", g["sagittal_median_mm"] <= 3),
        row("localiser sagittal error, mm: p90 (guess)", f"{p.get('sagittal_p90_mm', np.nan):.1f}",
            f"{g['sagittal_p90_mm']:.1f}", "<= 8", g["sagittal_p90_mm"] <= 8),
        row("localiser sagittal level accuracy (guess)", f"{p.get('sagittal_level_accuracy', np.nan):.1%}",
            f"{g['sagittal_level_accuracy']:.1%}", ">= 98%", g["sagittal_level_accuracy"] >= 0.98),
        row("localiser sagittal slice error, slices (guess)", f"{p.get('sagittal_slice_error', np.nan):.2f}",
            f"{g.get('sagittal_slice_error', np.nan):.2f}", "-", None),
        row("localiser axial error, mm: median (guess: canal point carried to the axial slice)",
            f"{p.get('axial_median_mm', np.nan):.1f}", f"{g.get('axial_median_mm', np.nan):.1f}", "<= 5",
            g.get("axial_median_mm", np.inf) <= 5),
        row("localiser axial error, mm: p90; level accuracy", f"{p.get('axial_p90_mm', np.nan):.1f}; "
            f"{p.get('axial_level_accuracy', np.nan):.1%}", f"{g.get('axial_p90_mm', np.nan):.1f}; "
            f"{g.get('axial_level_accuracy', np.nan):.1%}", "-", None),
        row("demo classifier fold 0, fit with data.val_points oof vs labelled (score)",
            f"{lab:.4f}", f"{via_oof:.4f}", "within 5%", via_oof / lab <= 1.05, via_oof / lab),
        row("demo classifier fold 0: oof fit vs the labelled fit re-predicted on the mean-position guess (score)",
            f"{guess:.4f}", f"{via_oof:.4f}", ">= 30% better", 1 - via_oof / guess >= 0.3, via_oof / guess),
        row(f"... with augment.crop_shift {SHIFT}: fit with data.val_points oof vs labelled (score)",
            f"{s_lab:.4f}", f"{s_loc:.4f}", "within 5%", s_loc / s_lab <= 1.05, s_loc / s_lab),
        row(f"... with augment.crop_shift {SHIFT}: oof fit vs the labelled fit re-predicted on the guess (score)",
            f"{s_guess:.4f}", f"{s_loc:.4f}", ">= 30% better", 1 - s_loc / s_guess >= 0.3, s_loc / s_guess),
        row(f"... with crop_shift {SHIFT}, oof fit vs the plain labelled fit (score)",
            f"{lab:.4f}", f"{s_loc:.4f}", "within 5%", s_loc / lab <= 1.05, s_loc / lab),
        row("localisation, seconds per study on one core (median of 6)", "-", f"{seconds:.3f}", "<= 0.2", seconds <= 0.2),
    ]
    write(f"localize_{args.scale}", rows, extra=_plain(dict(
        localizer=cfg.to_flat(), localizer_minutes=round(train_minutes, 2), reused_checkpoints=args.reuse,
        localizer_groups=g, guess_groups=p, guess_miss=miss, classifier=cls, classifier_crop_shift=shifted,
        minutes=round((time.perf_counter() - t0) / 60, 2))))


if __name__ == "__main__":
    main()

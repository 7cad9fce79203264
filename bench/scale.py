"""The data path and the GPUs at the competition's size, on a realistic phantom (README "Scale").

    .venv/bin/python bench/scale.py [--studies 100] [--work bench/out/scale]

On N realistic studies (`make-phantom --scale real`: 384-640 px, RLE lossless 12-bit, 1-3 axial
series), projected linearly to the 1,975 studies of the real set:

- cold preprocessing (decode every series into the volume cache): wall time with 1 process and
  with 2, and the projection to 1,975 studies on 16 cores from the one-process rate;
- cache bytes per study;
- a new trial that changes only `window_ratio`, then one that changes only slice counts: bytes
  added to the cache and seconds from `fit()` to its first training step, in a fresh process;
- data-pipeline samples/s of one loader process (all five conditions, `medium` augmentation,
  224 px), against what a GPU eats;
- with a GPU: `fit` against a bare loop on random tensors already on the GPU (efficientnet_b0,
  224 px, bf16), the median GPU utilisation during that `fit`, and trials/hour with K = 1, 2, 4
  trials per GPU. Without one these rows say "not measured (no GPU)".

Writes bench/results/scale.json and bench/results/scale.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import write  # noqa: E402

REAL_STUDIES = 1975
REAL_CORES = 16
LOADER_WORKERS = 7  # a realistic share: 8 cores per GPU, one of them for the training loop
NO_GPU = "not measured (no GPU)"

PREPARE = """
import json, sys, time
from pathlib import Path
from trainer.data.layout import Layout
from trainer.data.volumes import SeriesRef, VolumeStore
layout = Layout(Path(sys.argv[1]))
refs = [SeriesRef(s, i, layout.series_dir(s, i)) for s in layout.study_ids
        for ids in layout.series_of(s).values() for i in ids]
store = VolumeStore(Path(sys.argv[2]), budget=int(sys.argv[4]) if len(sys.argv) > 4 else 1 << 50)
t0 = time.perf_counter()
r = store.prepare(refs, jobs=int(sys.argv[3]), progress=False)
print(json.dumps(dict(seconds=time.perf_counter() - t0, decoded=r.decoded, failed=len(r.failed),
                      bytes=store.usage())))
"""

FIRST_STEP = """
import json, sys, time
from trainer.config import TrainConfig
from trainer.fit import fit

class FirstStep(Exception):
    pass

def progress(stage, done, total):
    if done == 0:  # fit calls it when the first batch has arrived, before its first step
        raise FirstStep

cfg = TrainConfig.from_dict(json.loads(sys.argv[1]))
t0 = time.perf_counter()
try:
    fit(cfg, progress=progress)
except FirstStep:
    pass
print(json.dumps(dict(seconds=time.perf_counter() - t0)))
"""


def py(script: str, *args) -> dict:
    r = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def trial_config(data: Path, cache: Path, **data_overrides) -> dict:
    return dict(
        data=dict(data_dir=str(data), cache_dir=str(cache), img_size=224, **data_overrides),
        model=dict(backbone="test_efficientnet", pretrained=False, head="linear"),
        optim=dict(epochs=1, batch_size=8), augment=dict(preset="medium"), num_workers=0, device="cpu",
    )


def pipeline_rate(data: Path, cache: Path, n: int = 300) -> float:
    """Samples/s of one process cutting and augmenting samples (what one loader worker does)."""
    import numpy as np

    from trainer.augment import build_augment
    from trainer.config import AugmentConfig, DataConfig
    from trainer.data.crops import CropSpec
    from trainer.data.dataset import SpineDataset
    from trainer.data.layout import Layout
    from trainer.data.samples import SampleSource
    from trainer.data.volumes import VolumeStore

    layout = Layout(data)
    source = SampleSource(layout, CropSpec.from_config(DataConfig(img_size=224)), VolumeStore(cache, budget=1 << 50))
    source.prepare(layout.study_ids, progress=False)
    ds = SpineDataset(source, layout.study_ids, transform=build_augment(AugmentConfig(preset="medium"), seed=0),
                      crop_shift=0.05, crop_scale=0.1)
    order = np.random.default_rng(0).permutation(len(ds))[:n]
    for i in order[:20]:  # open the memory maps, warm the allocator
        ds[int(i)]
    t0 = time.perf_counter()
    for i in order:
        ds[int(i)]
    return len(order) / (time.perf_counter() - t0)


def gpu_rows(data: Path, work: Path) -> list[dict]:
    """The GPU measurements; each row says why when it could not be taken."""
    import torch

    goals = ["fit samples/s vs bare loop on GPU tensors (efficientnet_b0, 224 px, bf16)",
             "median GPU utilisation during an efficientnet_b0 224 px trial",
             "trials/hour, demo, 2 vs 1 trials per GPU", "trials/hour, demo, 4 vs 1 trials per GPU"]
    if not torch.cuda.is_available():
        return [dict(what=w, baseline="-", value=NO_GPU, ratio=None, goal=g, met=None)
                for w, g in zip(goals, (">= 0.9x", ">= 80%", ">= 1.5x", "-"))]
    rows = []
    try:
        bare, rate, util = _gpu_fit_vs_bare(data, work)
        rows.append(dict(what=goals[0], baseline=f"{bare:.0f}", value=f"{rate:.0f}", ratio=rate / bare,
                         goal=">= 0.9x", met=rate / bare >= 0.9))
        rows.append(dict(what=goals[1], baseline="100%", value=f"{util:.0f}%", ratio=util / 100, goal=">= 80%",
                         met=util >= 80))
    except Exception as e:  # noqa: BLE001 - a failed measurement is a row that says so
        rows += [dict(what=w, baseline="-", value=f"failed: {type(e).__name__}: {str(e)[:120]}", ratio=None,
                      goal="-", met=None) for w in goals[:2]]
    try:
        per_hour = {k: _trials_per_hour(k, work) for k in (1, 2, 4)}
        rows.append(dict(what=goals[2], baseline=f"{per_hour[1]:.0f}", value=f"{per_hour[2]:.0f}",
                         ratio=per_hour[2] / per_hour[1], goal=">= 1.5x", met=per_hour[2] / per_hour[1] >= 1.5))
        rows.append(dict(what=goals[3], baseline=f"{per_hour[1]:.0f}", value=f"{per_hour[4]:.0f}",
                         ratio=per_hour[4] / per_hour[1], goal="-", met=None))
    except Exception as e:  # noqa: BLE001
        rows += [dict(what=w, baseline="-", value=f"failed: {type(e).__name__}: {str(e)[:120]}", ratio=None,
                      goal="-", met=None) for w in goals[2:]]
    return rows


def _gpu_fit_vs_bare(data: Path, work: Path) -> tuple[float, float, float]:
    import statistics
    import threading

    import pynvml
    import torch

    from trainer.config import TrainConfig
    from trainer.fit import fit
    from trainer.models import build_model

    cfg = TrainConfig.from_dict(dict(
        data=dict(data_dir=str(data), cache_dir=str(work / "cache"), img_size=224),
        model=dict(backbone="efficientnet_b0", pretrained=False, head="linear"),
        optim=dict(epochs=2, batch_size=32), augment=dict(preset="medium"), device="cuda"))
    model = build_model(cfg.model, 14, 5).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(32, 14, 224, 224, device="cuda")
    y = torch.randint(0, 3, (32, 5), device="cuda")
    for i in range(60):
        if i == 10:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    bare = 50 * 32 / (time.perf_counter() - t0)
    del model, opt, x, y
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(int(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]))
    samples, stop = [], threading.Event()

    def sample():
        while not stop.wait(0.2):
            samples.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        r = fit(cfg)
    finally:
        stop.set()
        thread.join()
    last = r.history[-1]  # the second epoch: data warm, cudnn tuned
    rate = (r.n_train // 32) * 32 / last["train_seconds"]
    return bare, rate, statistics.median(samples) if samples else 0.0


def _trials_per_hour(k: int, work: Path, n_trials: int = 8) -> float:
    folder = work / f"trials_k{k}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    r = subprocess.run([str(Path(sys.executable).parent / "optuna-run"), "demo", "--n-trials", str(n_trials),
                        "--gpus", "0", "--trials-per-gpu", str(k), "--data", str(ROOT / "data" / "phantom")],
                       cwd=folder, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-500:])
    return n_trials / (time.perf_counter() - t0) * 3600


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--studies", type=int, default=100, help="realistic phantom studies (default 100)")
    ap.add_argument("--work", default=str(ROOT / "bench" / "out" / "scale"),
                    help="scratch folder; the phantom is kept there between runs")
    args = ap.parse_args()
    work = Path(args.work)
    data = work / f"phantom_real_{args.studies}"
    extra: dict = {}
    if not (data / "train.csv").exists():
        from trainer.data.phantom import make_phantom

        print(f"building a realistic phantom of {args.studies} studies in {data} ...", flush=True)
        t0 = time.perf_counter()
        summary = make_phantom(data, studies=args.studies, test_studies=0, seed=0, jobs=os.cpu_count() or 1,
                               scale="real", progress=True)
        (work / "phantom.json").write_text(json.dumps(dict(summary, build_seconds=time.perf_counter() - t0)))
    phantom = json.loads((work / "phantom.json").read_text())
    extra["phantom"] = phantom
    n, files = phantom["studies"], phantom["files"]
    print(f"phantom: {n} studies, {files} files, {phantom['bytes'] / 2**30:.2f} GiB", flush=True)
    for f in (data / "train_images").rglob("*.dcm"):  # both runs read from the page cache alike
        f.read_bytes()

    # cold preprocessing into an empty cache, 1 process and 2, alternated twice (the best of each):
    # each run starts after the previous one's cache is deleted and flushed, so no run pays for
    # another's disk writes
    cold: dict[int, dict] = {}
    cache = work / "cache"
    for jobs in (1, 2, 1, 2):
        shutil.rmtree(cache, ignore_errors=True)
        os.sync()
        r = py(PREPARE, data, cache, jobs)
        print(f"cold preprocessing, {jobs} process(es): {r}", flush=True)
        if jobs not in cold or r["seconds"] < cold[jobs]["seconds"]:
            cold[jobs] = r
    # the same preprocessing under a budget of half what it needs: the cache is watched from outside
    import threading

    from trainer.data.volumes import VolumeStore

    budget = cold[2]["bytes"] // 2
    shutil.rmtree(work / "cache_budget", ignore_errors=True)
    peak, stop = [0], threading.Event()

    def watch():
        while not stop.wait(0.2):
            peak[0] = max(peak[0], VolumeStore(work / "cache_budget", clean_old=False).usage())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        bounded = py(PREPARE, data, work / "cache_budget", 2, budget)
    finally:
        stop.set()
        watcher.join()
    peak[0] = max(peak[0], bounded["bytes"])
    shutil.rmtree(work / "cache_budget", ignore_errors=True)
    extra["bounded"] = dict(budget=budget, peak=peak[0], **bounded)
    print(f"under a budget of {budget} bytes: peak {peak[0]}, {bounded}", flush=True)
    per_core = files / cold[1]["seconds"]
    projected = cold[1]["seconds"] * REAL_STUDIES / n / REAL_CORES
    speedup = cold[1]["seconds"] / cold[2]["seconds"]
    per_study = cold[2]["bytes"] / n
    extra.update(cold=cold, files_per_second_per_core=per_core, cache_bytes_per_study=per_study,
                 projected_cache_gib=per_study * REAL_STUDIES / 2**30)

    # new trials: only window_ratio, then only slice counts; the cache holds the base spec's volumes
    py(FIRST_STEP, json.dumps(trial_config(data, cache)))  # the base trial: plans and folds made
    trials = {}
    for name, change in (("window_ratio", dict(window_ratio=0.2)),
                         ("slice counts", dict(sag_t2_slices=7, sag_t1_slices=5, axial_slices=5))):
        before = VolumeStore(cache).usage()
        seconds = py(FIRST_STEP, json.dumps(trial_config(data, cache, **change)))["seconds"]
        trials[name] = dict(seconds=seconds, bytes_added=VolumeStore(cache).usage() - before)
        print(f"new {name}: {trials[name]}", flush=True)
    extra["new_trials"] = trials

    rate = pipeline_rate(data, cache)
    extra["pipeline_samples_per_second_per_worker"] = rate
    print(f"data pipeline: {rate:.0f} samples/s per loader process", flush=True)

    rows = [
        dict(what=f"cold preprocessing of {n} realistic studies, seconds: 1 process vs 2",
             baseline=f"{cold[1]['seconds']:.1f}", value=f"{cold[2]['seconds']:.1f} ({files} files)", ratio=speedup,
             goal=">= 1.7x", met=speedup >= 1.7),
        dict(what=f"cold preprocessing projected to {REAL_STUDIES} studies on {REAL_CORES} cores, minutes",
             baseline="10.0", value=f"{projected / 60:.1f} ({per_core:.0f} files/s per core)", ratio=projected / 600,
             goal="<= 1.0x (10 min)", met=projected <= 600),
        dict(what=f"volume cache per study, MB (projected to {REAL_STUDIES} studies; default budget 64 GiB)",
             baseline="-", value=f"{per_study / 2**20:.1f} ({per_study * REAL_STUDIES / 2**30:.0f} GiB)", ratio=None,
             goal="-", met=None),
    ]
    rows.append(dict(what="volume cache under a budget of half the set's bytes: largest size seen while "
                          "preprocessing (sampled every 0.2 s) vs the budget, MB",
                     baseline=f"{budget / 2**20:.0f}", value=f"{peak[0] / 2**20:.0f}", ratio=peak[0] / budget,
                     goal="<= 1.0x", met=peak[0] <= budget))
    for name, t in trials.items():
        rows.append(dict(what=f"new trial, only {name} changed: seconds from fit() to its first batch, "
                              f"and bytes added to the cache ({n} studies)",
                         baseline="10.0", value=f"{t['seconds']:.1f} s, {t['bytes_added']} bytes",
                         ratio=t["seconds"] / 10, goal="<= 10 s, <= 100 MB",
                         met=t["seconds"] <= 10 and t["bytes_added"] <= 100 * 2**20))
    rows.append(dict(what="data pipeline samples/s per loader process (5 conditions, 14 slices, medium "
                          f"augmentation, 224 px) x {LOADER_WORKERS} workers vs GPU bare loop (b0, 224, bf16)",
                     baseline=NO_GPU, value=f"{rate:.0f} x {LOADER_WORKERS} = {rate * LOADER_WORKERS:.0f}",
                     ratio=None, goal=">= 2x", met=None))
    g = gpu_rows(data, work)
    if g and g[0]["baseline"] not in ("-",):  # measured: the pipeline row gets its ratio against the GPU
        bare = float(g[0]["baseline"])
        rows[-1].update(baseline=f"{bare:.0f}", ratio=rate * LOADER_WORKERS / bare,
                        met=rate * LOADER_WORKERS / bare >= 2)
    rows += g
    write("scale", rows, extra=extra)


if __name__ == "__main__":
    main()

"""Data-layer benchmark: DICOM decode (dicomsdl vs pydicom), cold vs warm samples per second (warm:
crops cut on the fly from the memory-mapped volume cache), and whether preparing the cache streams
(peak memory for 50 vs 100 studies).

    .venv/bin/python bench/data.py [--work DIR]

Writes bench/results/data.json and bench/results/data.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from bench.common import write  # noqa: E402

PEAK_SCRIPT = """
import resource, sys, json
from pathlib import Path
from trainer.config import DataConfig
from trainer.data.crops import CropSpec
from trainer.data.layout import Layout
from trainer.data.samples import SampleSource
from trainer.data.volumes import VolumeStore
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
layout = Layout(Path(sys.argv[1]))
if sys.argv[3] == "build":
    SampleSource(layout, CropSpec.from_config(DataConfig()), VolumeStore(Path(sys.argv[2]))).prepare(layout.study_ids)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(dict(base_kib=base, peak_kib=peak)))
"""


def decode_ratio(data: Path, n_files: int = 600) -> dict:
    import pydicom

    from trainer.data.dicom import read_slice

    files = sorted((data / "train_images").rglob("*.dcm"))[:n_files]
    for f in files[:20]:  # warm the page cache for both readers alike
        f.read_bytes()

    def pydicom_read(f):
        ds = pydicom.dcmread(f)
        return ds.pixel_array, ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing

    timings = {}
    for name, fn in (("pydicom", pydicom_read), ("dicomsdl", read_slice)):
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for f in files:
                fn(f)
            best = min(best, time.perf_counter() - t0)
        timings[name] = len(files) / best
    return timings


def samples_per_second(data: Path, work: Path) -> tuple[float, float, int]:
    from trainer.config import DataConfig
    from trainer.data.crops import CropSpec
    from trainer.data.dataset import SpineDataset
    from trainer.data.layout import Layout
    from trainer.data.samples import SampleSource
    from trainer.data.volumes import VolumeStore

    layout = Layout(data)
    spec = CropSpec.from_config(DataConfig())

    def run(cache: Path) -> tuple[float, int]:
        t0 = time.perf_counter()
        store = SampleSource(layout, spec, VolumeStore(cache))
        store.prepare(layout.study_ids)
        ds = SpineDataset(store, layout.study_ids)
        for i in range(len(ds)):
            ds[i]
        return time.perf_counter() - t0, len(ds)

    cache = work / "cache-sps"
    shutil.rmtree(cache, ignore_errors=True)
    cold, n = run(cache)
    warm = min(run(cache)[0] for _ in range(3))
    return n / cold, n / warm, n


def peak_memory(data: Path, work: Path) -> dict:
    cache = work / f"cache-peak-{data.name}"
    shutil.rmtree(cache, ignore_errors=True)
    out = {}
    for mode in ("imports", "build"):
        r = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(data), str(cache), mode],
                           capture_output=True, text=True, check=True, cwd=ROOT)
        out[mode] = json.loads(r.stdout.strip().splitlines()[-1])["peak_kib"] / 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="spinesweep-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    from trainer.data.phantom import make_phantom

    data = {}
    for n in (50, 100):
        data[n] = work / f"phantom{n}"
        if not (data[n] / "train.csv").exists():
            print(f"building a {n}-study phantom ...", flush=True)
            make_phantom(data[n], studies=n, test_studies=0, seed=0, jobs=2)

    rates = decode_ratio(data[50])
    cold, warm, n_samples = samples_per_second(data[50], work)
    mem50, mem100 = peak_memory(data[50], work), peak_memory(data[100], work)
    growth = mem100["build"] / mem50["build"]
    rows = [
        dict(what="DICOM decode, files/s (dicomsdl vs pydicom)", baseline=f"{rates['pydicom']:.0f}",
             value=f"{rates['dicomsdl']:.0f}", ratio=rates["dicomsdl"] / rates["pydicom"], goal=">= 3x",
             met=rates["dicomsdl"] / rates["pydicom"] >= 3),
        dict(what=f"samples/s, warm volume cache (crops cut on the fly) vs cold (DICOM), {n_samples} samples",
             baseline=f"{cold:.0f}",
             value=f"{warm:.0f}", ratio=warm / cold, goal=">= 20x", met=warm / cold >= 20),
        dict(what="peak RSS preparing the cache, 100 vs 50 studies (MiB)", baseline=f"{mem50['build']:.0f}",
             value=f"{mem100['build']:.0f}", ratio=growth, goal="< 1.3x", met=growth < 1.3),
    ]
    write("data", rows, extra=dict(
        peak_mib=dict(studies50=mem50, studies100=mem100),
        note="peak RSS includes the interpreter and libraries (the 'imports' figure); building adds "
             f"{mem50['build'] - mem50['imports']:.0f} MiB for 50 and "
             f"{mem100['build'] - mem100['imports']:.0f} MiB for 100 studies"))


if __name__ == "__main__":
    main()

"""`optuna-run data check`: decode every series a data folder's crops need (all cores, with a
progress bar), plan and cut every crop, and count what failed, and why."""
from __future__ import annotations

import time
import warnings
from collections import Counter
from pathlib import Path

from .cache import default_cache_dir
from .crops import CropSpec
from .dicom import DicomWarning
from .layout import Layout
from .samples import SampleSource
from .volumes import VolumeStore, cache_budget

FALLBACKS = {"axial_from_sagittal"}
EXAMPLES = 3


def check_data(data_dir: str | Path, spec: CropSpec, cache_dir: str = "", progress: bool = False,
               jobs: int = 1, budget: int | None = None) -> dict:
    """Summary of a data folder. Raises LayoutError only when the layout itself cannot be read.
    `jobs` processes decode the series not cached yet."""
    t0 = time.perf_counter()
    layout = Layout(Path(data_dir))
    layout.validate()
    store = VolumeStore(default_cache_dir(cache_dir), budget if budget is not None else cache_budget())
    source = SampleSource(layout, spec, store)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DicomWarning)  # counted below from the flags instead
        report = source.prepare(layout.study_ids, jobs=jobs, progress=progress or None, every_series=True)
        decoded_seconds = time.perf_counter() - t0
        for sid in layout.study_ids:  # cut every crop once: what a trial will ask for
            source.study_crops(sid)
        repeated = repeated_instances(source, layout.study_ids)

    labels = layout.labels.set_index(["study_id", "condition", "level"])["severity"]
    failures, fallbacks, unlabelled = Counter(), Counter(), 0
    examples: dict[str, list[str]] = {}  # up to EXAMPLES per reason, so a pattern shows
    for f in report.flags + repeated:
        if f["reason"] in FALLBACKS:
            fallbacks[f["reason"]] += 1
            continue
        if f["reason"] == "no_point" and _label_is_empty(labels, f):
            unlabelled += 1  # an empty label has no point by design: not a failure
            continue
        failures[f["reason"]] += 1
        shown = examples.setdefault(f["reason"], [])
        if len(shown) < EXAMPLES:
            shown.append(f"study {f['study_id']}: {f['detail']}")
    n_blocks = len(spec.blocks())
    samples = len(layout.study_ids) * 5
    return dict(
        data_dir=str(layout.root),
        studies=len(layout.study_ids),
        series=int(len(layout.train_series)),
        points=int(len(layout.coordinates)),
        samples=samples,
        crops_expected=samples * n_blocks,
        crops_built=report.crops_planned,
        unlabelled_blocks=unlabelled,
        failures=dict(failures),
        failure_examples=examples,
        fallbacks=dict(fallbacks),
        series_decoded=report.decoded,
        series_from_cache=report.reused,
        decode_jobs=report.jobs,
        decode_seconds=round(decoded_seconds, 2),
        cache_bytes=store.usage(),
        cache_budget=store.budget,
        seconds=round(time.perf_counter() - t0, 2),
    )


def repeated_instances(source: SampleSource, study_ids) -> list[dict]:
    """A flag (reason ``instance_repeated``, files named) for every instance number that more than
    one file of a series holds, in every described series of the studies: a label that names
    such a number cannot say which slice it meant. Reads the cached geometry only."""
    out = []
    for sid in study_ids:
        for ref in source.all_series(sid):
            try:
                vol = source.store.open(ref)
            except Exception:  # missing or unreadable: counted by the crop flags already
                continue
            for number, files in vol.repeated_instances().items():
                out.append(dict(study_id=sid, level=None, block=None, reason="instance_repeated",
                                detail=f"series {ref.series_id} instance {number}: files {', '.join(files)}"))
    return out


def _label_is_empty(labels, flag) -> bool:
    # the axial block has no single condition: its flag says "subarticular" (both sides)
    conds = {"subarticular": ["left_subarticular_stenosis", "right_subarticular_stenosis"]}.get(
        flag["detail"], [flag["detail"]])
    try:
        return all(labels.loc[(flag["study_id"], c, flag["level"])] < 0 for c in conds)
    except KeyError:
        return False

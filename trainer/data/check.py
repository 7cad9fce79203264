"""`optuna-run data check`: build every crop of a data folder and count what failed, and why."""
from __future__ import annotations

import time
import warnings
from collections import Counter
from pathlib import Path

from .cache import SampleStore, default_cache_dir
from .crops import CropSpec
from .layout import Layout

FALLBACKS = {"axial_from_sagittal"}


def check_data(data_dir: str | Path, spec: CropSpec, cache_dir: str = "", progress: bool = False) -> dict:
    """Summary of a data folder. Raises LayoutError only when the layout itself cannot be read."""
    t0 = time.perf_counter()
    layout = Layout(Path(data_dir))
    layout.validate()
    store = SampleStore(layout, spec, default_cache_dir(cache_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # counted below from the flags instead of printed
        report = store.ensure(layout.study_ids, progress=progress)

    labels = layout.labels.set_index(["study_id", "condition", "level"])["severity"]
    failures, fallbacks, unlabelled = Counter(), Counter(), 0
    examples: dict[str, str] = {}
    for f in report.flags:
        if f["reason"] in FALLBACKS:
            fallbacks[f["reason"]] += 1
            continue
        if f["reason"] == "no_point" and _label_is_empty(labels, f):
            unlabelled += 1  # an empty label has no point by design: not a failure
            continue
        failures[f["reason"]] += 1
        examples.setdefault(f["reason"], f"study {f['study_id']}: {f['detail']}")
    n_blocks = len(spec.blocks())
    samples = len(layout.study_ids) * 5
    return dict(
        data_dir=str(layout.root),
        studies=len(layout.study_ids),
        series=int(len(layout.train_series)),
        points=int(len(layout.coordinates)),
        samples=samples,
        crops_expected=samples * n_blocks,
        crops_built=report.crops_built,
        unlabelled_blocks=unlabelled,
        failures=dict(failures),
        failure_examples=examples,
        fallbacks=dict(fallbacks),
        studies_built=report.built,
        studies_from_cache=report.reused,
        seconds=round(time.perf_counter() - t0, 2),
    )


def _label_is_empty(labels, flag) -> bool:
    # the axial block has no single condition: its flag says "subarticular" (both sides)
    conds = {"subarticular": ["left_subarticular_stenosis", "right_subarticular_stenosis"]}.get(
        flag["detail"], [flag["detail"]])
    try:
        return all(labels.loc[(flag["study_id"], c, flag["level"])] < 0 for c in conds)
    except KeyError:
        return False

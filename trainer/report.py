"""Plain-text reporting of a run: the per-epoch table with a progress bar, and the JSON summary."""
from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm

COLUMNS = (("epoch", "{:>5d}"), ("train_loss", "{:>10.4f}"), ("val_loss", "{:>8.4f}"), ("score", "{:>7.4f}"),
           ("lr", "{:>9.2e}"), ("seconds", "{:>7.1f}"))


class EpochTable:
    """A fit callback that prints one table row per epoch; `progress` drives a tqdm bar."""

    __name__ = "EpochTable"

    def __init__(self, out: TextIO = sys.stdout):
        self.out = out
        self.bar = None
        self.header = False

    def progress(self, stage: str, done: int, total: int) -> None:
        """Move the batch bar of the current `stage` to `done` of `total` batches (on stderr); the
        bar is created on the first call of an epoch and closed when its row is printed."""
        if self.bar is None:
            self.bar = tqdm(total=total, desc=stage, unit="batch", leave=False, file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def __call__(self, epoch: int, metrics: dict) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if not self.header:
            print(" ".join(f"{name:>{len(fmt.format(0) if 'd' in fmt else fmt.format(0.0))}}" for name, fmt in COLUMNS)
                  + "  groups", file=self.out)
            self.header = True
        groups = " ".join(f"{k[5:]}={v:.3f}" for k, v in metrics.items() if k.startswith("loss_"))
        print(" ".join(fmt.format(metrics[name]) for name, fmt in COLUMNS) + "  " + groups, file=self.out, flush=True)

    def close(self) -> None:
        """Close a bar still open (a fit that ended mid-epoch)."""
        if self.bar is not None:
            self.bar.close()


def result_summary(result) -> dict:
    """The JSON-able summary of a FitResult (what `train --json` prints)."""
    return dict(
        score=result.score, groups=result.groups, best_epoch=result.best_epoch,
        prior_score=result.prior_score, prior_groups=result.prior_groups,
        checkpoint=result.checkpoint, stopped_early=result.stopped_early, stop_reason=result.stop_reason,
        pretrained_loaded=result.pretrained_loaded, n_train=result.n_train, n_val=result.n_val,
        data_fingerprint=result.data_fingerprint, seconds=round(result.seconds, 2),
        history=result.history, environment=result.environment,
    )

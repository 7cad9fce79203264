"""Live progress of the trials running now: one bar per worker on a terminal (trial, fold and
epoch, the last and best validation score, elapsed and ETA), nothing per epoch when the output is
not a terminal (CI logs keep the one line per finished trial that the launcher prints).

    [cpu0] trial 7:  40%|████      | 4/10 [00:21<00:31, val 0.5123, best 0.4987]

Each worker process draws its own bar at its own line (tqdm's `position`); the bars share tqdm's
lock, created by the launcher before the workers fork. SPINESWEEP_PROGRESS=1 or 0 forces the
display on or off.
"""
from __future__ import annotations

import math
import os
import sys
import time

from .evaluate import FoldHooks


def enabled(stream=None) -> bool:
    """Whether live bars are drawn: as ``SPINESWEEP_PROGRESS`` forces (``1``/``0``), otherwise when
    `stream` (stderr by default) is a terminal."""
    forced = os.environ.get("SPINESWEEP_PROGRESS")
    if forced in ("0", "1"):
        return forced == "1"
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def share_lock() -> None:
    """Called by the launcher before it starts worker processes: they inherit one lock for their
    bars, so two workers never redraw the terminal at once."""
    if enabled():
        from tqdm import tqdm

        tqdm.get_lock()


def say(line: str, file=None) -> None:
    """Print a line; with live bars on the terminal, above them rather than through them."""
    file = file or sys.stdout
    if enabled():
        from tqdm import tqdm

        tqdm.write(line, file=file)
        file.flush()
    else:
        print(line, file=file, flush=True)


class TrialProgress:
    """A trial's bar over all its epochs (folds x epochs). `at(offset)` is the `fit` callback of a
    fold whose epochs start after `offset`; `close()` removes the bar (the finished trial's line
    replaces it)."""

    def __init__(self, desc: str, total_epochs: int, position: int = 0, direction: str = "minimize"):
        self.best = math.inf if direction == "minimize" else -math.inf
        self.better = min if direction == "minimize" else max
        self.bar = None
        if enabled():
            from tqdm import tqdm

            self.bar = tqdm(total=total_epochs, desc=desc, position=position, leave=False,
                            unit="epoch", dynamic_ncols=True, file=sys.stderr,
                            bar_format="{desc}: {percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} "
                                       "[{elapsed}<{remaining}{postfix}]")

    def at(self, offset: int):
        """A `fit` callback ``(epoch, metrics)`` for a fold whose epochs come after `offset` epochs
        of the bar: it moves the bar to ``offset + epoch`` and shows the epoch's ``score`` and the best
        finite one so far (per the bar's `direction`). Does nothing when bars are off."""
        def callback(epoch: int, metrics: dict) -> None:
            if self.bar is None:
                return None
            score = metrics.get("score")
            if score is not None and math.isfinite(score):
                self.best = self.better(self.best, score)
            self.bar.n = offset + epoch
            self.bar.set_postfix_str(f"val {score:.4f}, best {self.best:.4f}" if score is not None else "",
                                     refresh=False)
            self.bar.refresh()
            return None

        callback.__name__ = "progress"
        return callback

    def close(self) -> None:
        """Remove the bar (idempotent)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class ProgressFolds(FoldHooks):
    """Fold hooks for the long commands outside a study (`reproduce`, `promote`): a bar over every
    epoch on a terminal, and one line per finished fold everywhere (score, seconds)."""

    def __init__(self, label: str, epochs: int, n_folds: int, log=print, inner: FoldHooks | None = None):
        self.label, self.epochs, self.log, self.inner = label, epochs, log, inner or FoldHooks()
        self.bar = TrialProgress(label, epochs * n_folds)
        self.started = time.perf_counter()

    def callbacks(self, i: int, fold: int) -> list:
        """The inner hooks' callbacks plus the bar's for the i-th fold; starts the fold's clock."""
        self.started = time.perf_counter()
        return self.inner.callbacks(i, fold) + [self.bar.at(i * self.epochs)]

    def done(self, i: int, fold: int, result) -> bool:
        """Report the fold's score and seconds (above the bars on a terminal, through `log`
        otherwise); returns what the inner hooks' `done` returns (True stops before the next fold)."""
        line = f"{self.label}: fold {fold} done, score {result.score:.4f} ({time.perf_counter() - self.started:.0f} s)"
        if self.bar.bar is not None:
            say(line, sys.stderr)
        else:
            self.log(line)
        return self.inner.done(i, fold, result)

    def failed(self, i: int, fold: int, error: BaseException) -> None:
        """Pass the failure on to the inner hooks."""
        self.inner.failed(i, fold, error)

    def close(self) -> None:
        """Remove the bar."""
        self.bar.close()

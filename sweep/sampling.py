"""Sampling that never repeats a trial across processes, invocations and hosts, and stays
reproducible.

- **One seed stream per worker process.** A seeded sampler restarted in a new process (a
  `--resume`, a second host, the second worker of each host) would draw its stream again from the
  start. Each worker process therefore takes the study's next *stream number* (a counter in the
  study's system attributes, taken under the quota lock every process and host sees) and seeds its
  sampler with the space's seed mixed with that number (`stream_seed`); stream 0, the first
  worker of a fresh study, keeps the space's own seed, so a one-worker study draws exactly what it
  always drew. Every trial records the seed that drew it (user attribute `sampler_seed`). An
  unseeded space gets a fresh random seed per process, recorded the same way.
- **A guard against repeats** (`duplicate_of`): a sampled parameter set the study already holds
  (complete, pruned, running or waiting to run) is skipped, not run: the trial is failed with the
  user attribute `duplicate_of`, has no MLflow run and does not count towards N. Enqueued trials
  (retries, interrupted re-runs, a warm start) are never duplicates. `Exhaustion` stops a worker
  whose space has nothing new left instead of looping.
"""
from __future__ import annotations

import math
import secrets

import numpy as np
import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from .space import SearchSpace
from .trials import is_legacy

__all__ = ["Exhaustion", "SAMPLER_SEED", "duplicate_of", "next_stream", "space_size", "stream_seed"]

SAMPLER_SEED = "sampler_seed"  # user attribute of every trial: the seed of the sampler that drew it
DUPLICATE_OF = "duplicate_of"  # user attribute of a skipped trial: the trial whose parameters it repeated
_STREAMS = "spinesweep:sampler_streams"  # study system attribute: streams handed out so far
_HELD = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


def next_stream(storage: BaseStorage, study_id: int) -> int:
    """The study's next sampler stream number (0, 1, 2, ...). Call under the quota lock
    (`TrialQuota.lock`): the read and the increment must not interleave with another process's."""
    n = int(storage.get_study_system_attrs(study_id).get(_STREAMS, 0))
    storage.set_study_system_attr(study_id, _STREAMS, n + 1)
    return n


def stream_seed(space_seed: int | None, stream: int) -> int:
    """The sampler seed of stream `stream`: the space's seed for stream 0, else the space's seed
    and the stream number mixed by NumPy's `SeedSequence` (a 32-bit int, the same on every
    machine); a fresh random 32-bit seed for an unseeded space."""
    if space_seed is None:
        return secrets.randbits(32)
    if stream == 0:
        return int(space_seed)
    return int(np.random.SeedSequence([int(space_seed), stream]).generate_state(1)[0])


def duplicate_of(number: int, params: dict, trials: list[FrozenTrial]) -> FrozenTrial | None:
    """The trial of the study (other than `number`) that holds exactly `params` (complete,
    pruned, running or waiting to run; failed and imported trials do not count), or None.

    Any running trial counts, whichever number it has: of two processes that drew the same set at
    once, each writes its parameters before it checks, so at least one of them sees the other and
    skips (both may skip; neither repeats)."""
    for t in trials:
        if t.number != number and t.state in _HELD and not is_legacy(t) and DUPLICATE_OF not in t.user_attrs \
                and t.params == params:
            return t
    return None


def space_size(space: SearchSpace, never=()) -> int | None:
    """How many parameter sets the space holds at most (conditional parameters counted as always
    active), or None when it is continuous. `never`: keys not sampled (--set, --smoke caps)."""
    size = 1
    for p in space.params:
        if p.key in never:
            continue
        if p.type == "categorical":
            size *= len(p.choices)
        elif p.type == "int":
            size *= (p.high - p.low) // (p.step or 1) + 1
        elif p.step:
            size *= math.floor((p.high - p.low) / p.step + 1e-9) + 1
        else:
            return None
    return size


class Exhaustion:
    """When a worker stops skipping duplicates: every parameter set of a finite space is held, or
    `limit` samples in a row repeated the study (a space nearly used up, or a sampler stuck)."""

    def __init__(self, space: SearchSpace, never=(), limit: int = 20):
        self.size, self.limit, self.in_a_row = space_size(space, never), limit, 0

    def reason(self, trials: list[FrozenTrial]) -> str | None:
        """Called after a duplicate: why to stop, in words, or None to sample again."""
        self.in_a_row += 1
        held = {tuple(sorted(t.params.items())) for t in trials
                if t.state in _HELD and not is_legacy(t) and DUPLICATE_OF not in t.user_attrs}
        if self.size is not None and len(held) >= self.size:
            return f"every parameter set of the space is in the study ({len(held)} of {self.size})"
        if self.in_a_row >= self.limit:
            return f"{self.in_a_row} samples in a row repeated trials of the study (the space looks used up)"
        return None

    def reset(self) -> None:
        """Start the count of duplicates in a row again (after a sample that was not a duplicate)."""
        self.in_a_row = 0


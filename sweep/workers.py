"""A study's worker processes: which ones (`plan_workers`), what each is handed (`WorkerJob`), and
starting and joining them (`run_processes`).

One worker per GPU (pinned with CUDA_VISIBLE_DEVICES), K per GPU, K CPU processes with the cores
split between them, or the launcher's own process when there is one worker. Workers are forked
(no re-import, and CUDA is never initialised before CUDA_VISIBLE_DEVICES is set); each runs the
ask/tell loop of `loop.py`.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
from dataclasses import dataclass
from typing import Callable

from .objective import TrialContext
from .storage import StudyError

__all__ = ["WorkerJob", "WorkerSpec", "exit_reason", "gpu_ids_available", "plan_workers", "run_processes"]


@dataclass(frozen=True)
class WorkerSpec:
    """One worker: its index in the launcher, its name (``main``, ``cpu0``, ``gpu1``, ``gpu0.2``),
    the trainer's device (``cuda`` pinned GPU, ``cpu`` for --workers, ``auto`` for the launcher's
    own process), the GPU id for CUDA_VISIBLE_DEVICES, and its torch threads."""

    index: int
    name: str
    device: str
    gpu: str | None
    threads: int


@dataclass(frozen=True)
class WorkerJob:
    """Everything a worker process is handed (picklable).

    Attributes:
        ctx: what every trial of the invocation shares (stores, study, settings, tags).
        n_trials: the study's total (the quota).
        deadline: wall-clock time (`time.time()`) after which no trial is asked for, or None.
        spec: the worker.
        started: when the invocation started (`time.time()`), for the elapsed time in progress lines.
        heartbeat: the storage's heartbeat interval in seconds (None: the default).
    """

    ctx: TrialContext
    n_trials: int
    deadline: float | None
    spec: WorkerSpec
    started: float
    heartbeat: int | None = None


def gpu_ids_available() -> list[str]:
    """The machine's GPU ids as NVML (and nvidia-smi, and CUDA_VISIBLE_DEVICES) number them;
    empty without an NVIDIA driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no driver or no library: no GPU
        return []
    try:
        return [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
    finally:
        pynvml.nvmlShutdown()


def plan_workers(gpus: str | None, workers: int | None, trials_per_gpu: int | None = None,
                 available: list[str] | None = None) -> list[WorkerSpec]:
    """The worker processes of a study. `--gpus 0,1` one per GPU; `--trials-per-gpu K` K on each
    (every visible GPU when --gpus is not given), as does repeating an id (`--gpus 0,0,1,1`);
    `--workers K` K CPU processes; none of them one worker in this process. Cores are split
    evenly between workers (their torch threads, which also size their DataLoaders).

    Raises:
        StudyError: the flags exclude each other, a count is below 1, or a GPU id does not exist.
    """
    if workers is not None and (gpus or trials_per_gpu):
        raise StudyError("--workers (CPU processes) and --gpus/--trials-per-gpu exclude each other")
    if trials_per_gpu is not None and trials_per_gpu < 1:
        raise StudyError(f"--trials-per-gpu must be >= 1, got {trials_per_gpu}")
    have = gpu_ids_available() if available is None else available
    if trials_per_gpu and not gpus:
        if not have:
            raise StudyError(f"--trials-per-gpu {trials_per_gpu}: this machine has no GPU (NVML finds none); "
                             "for several trials at once on the CPU use --workers K")
        gpus = ",".join(have)
    cores = len(os.sched_getaffinity(0))
    if gpus:
        wanted = [g.strip() for g in gpus.split(",") if g.strip()]
        missing = sorted({g for g in wanted if g not in have})
        if missing:
            raise StudyError(f"--gpus {gpus}: no GPU with id {', '.join(missing)} on this machine "
                             f"(found: {', '.join(have) or 'none'})")
        slots = [g for g in wanted for _ in range(trials_per_gpu or 1)]
        threads = max(1, cores // len(slots))
        seen: dict[str, int] = {}
        specs = []
        for i, g in enumerate(slots):
            seen[g] = seen.get(g, 0) + 1
            shared = slots.count(g) > 1
            specs.append(WorkerSpec(i, f"gpu{g}" + (f".{seen[g]}" if shared else ""), "cuda", g, threads))
        return specs
    if workers is None:  # one worker in this process, on the GPU if one is visible (TrainConfig.device)
        return [WorkerSpec(0, "main", "auto", None, cores)]
    if workers < 1:
        raise StudyError(f"--workers must be >= 1, got {workers}")
    threads = max(1, cores // workers)
    return [WorkerSpec(i, f"cpu{i}", "cpu", None, threads) for i in range(workers)]


def run_processes(jobs: list[WorkerJob], target: Callable[[WorkerJob], None],
                  while_running: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
    """Start one process per job running `target(job)` (`loop.worker_main`) and wait for all of
    them, inside `while_running()` (entered once they are started: the launcher's heartbeat
    thread must not be forked). Exit codes: 0 done, 2 a StudyError (printed), 130 Ctrl-C,
    negative a signal.

    Raises:
        KeyboardInterrupt: Ctrl-C reached the launcher or a worker.
        StudyError: every worker stopped with an error (each named, with its signal).
    A worker that crashed while others finished is a warning on stderr.
    """
    import multiprocessing as mp

    import torch

    from .progress import share_lock

    # fork: workers start at once (no re-import). A process that already initialised CUDA (a
    # notebook or test that trained on the GPU before launching) cannot fork a CUDA user: spawn.
    method = "spawn" if torch.cuda.is_initialized() else "fork"
    share_lock()  # the workers' progress bars draw under one lock
    procs = [mp.get_context(method).Process(target=target, name=job.spec.name, args=(job,)) for job in jobs]
    for p in procs:
        p.start()
    try:
        with while_running():
            for p in procs:
                p.join()
    except KeyboardInterrupt:
        for p in procs:  # they got the same SIGINT from the terminal; give them a moment
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
        raise
    if any(p.exitcode in (130, -signal.SIGINT) for p in procs):
        raise KeyboardInterrupt  # Ctrl-C reached the workers before (or instead of) the launcher
    crashed = [f"{p.name} {exit_reason(p.exitcode)}" for p in procs if p.exitcode not in (0, None)]
    if crashed and len(crashed) == len(procs):
        raise StudyError(f"every worker stopped with an error: {'; '.join(crashed)} (their trials are marked "
                         f"failed; `optuna-run runs {jobs[0].ctx.study_name}` shows each trial's error)")
    if crashed:
        print(f"warning: worker(s) {'; '.join(crashed)}; the others finished the study",
              file=sys.stderr, flush=True)


def exit_reason(code: int | None) -> str:
    """A worker's exit code in words: a negative code is the signal that killed it."""
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        native = " (a crash in native code)" if name in ("SIGSEGV", "SIGBUS", "SIGABRT", "SIGILL", "SIGFPE") else ""
        return f"was killed by {name}{native}"
    return f"exited with code {code}"

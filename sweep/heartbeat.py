"""Heartbeats: a running trial's (in the Optuna storage, recorded by its worker) and an
invocation's (a tag on its MLflow parent run, refreshed by its launcher, so that a later launcher
closes the parent runs of dead invocations: `close_dead_parents`).

`Study.optimize` records heartbeats from a thread of Optuna's (in the private module
`optuna.storages._heartbeat`); the workers run their own ask/tell loop (see `quota.py` for why),
so they record it themselves, through the storage's public `record_heartbeat`. One difference on
purpose: an unreachable storage is not a traceback printed from a background thread.
"""
from __future__ import annotations

import contextlib
import threading
import time

from optuna.storages import BaseStorage

from .storage import STORAGE_ERRORS

__all__ = ["close_dead_parents", "dead_launcher", "heartbeat", "launcher_tags", "parent_heartbeat"]


@contextlib.contextmanager
def heartbeat(storage: BaseStorage, trial_id: int):
    """Record the trial's heartbeat every `storage.get_heartbeat_interval()` seconds while the
    block runs (nothing when the storage has no heartbeat). A beat that meets an outage is skipped
    and the next one tried again; the trial's own next write meets the same outage and stops the
    study with one clear line."""
    interval = storage.get_heartbeat_interval()
    if not interval:
        yield
        return

    def beat():
        with contextlib.suppress(*STORAGE_ERRORS):
            storage.record_heartbeat(trial_id)

    with _every(interval, beat, f"optuna-heartbeat-{trial_id}", at_once=True):
        yield


@contextlib.contextmanager
def _every(interval: float, action, name: str, at_once: bool):
    """Run `action()` every `interval` seconds (first at once if `at_once`) in a daemon thread
    while the block runs; the thread is stopped and joined when it ends."""
    stop = threading.Event()

    def loop():
        if at_once:
            action()
        while not stop.wait(interval):
            action()

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# ---- an invocation's heartbeat: its MLflow parent run ----

HOST, PID, PID_STARTED = "spinesweep.host", "spinesweep.pid", "spinesweep.pid_started"
BEAT, BEAT_INTERVAL = "spinesweep.heartbeat", "spinesweep.heartbeat_interval"


def launcher_tags(interval: float) -> dict[str, str]:
    """The tags a launcher puts on its parent run so that a later launcher can tell whether it is
    still alive: host, pid and the pid's start time (pids are reused), and a first heartbeat
    (seconds since the epoch) with its interval in seconds."""
    import os
    import socket

    import psutil

    return {HOST: socket.gethostname(), PID: str(os.getpid()),
            PID_STARTED: f"{psutil.Process().create_time():.3f}", BEAT: f"{time.time():.0f}",
            BEAT_INTERVAL: f"{interval:g}"}


@contextlib.contextmanager
def parent_heartbeat(tracker, run_id: str, interval: float):
    """Refresh the parent run's heartbeat tag every `interval` seconds while the block runs. A beat
    that fails (the tracking server away) is skipped; the next one tries again. Start it after
    forking workers: a thread holding a connection's lock must not be forked."""
    def beat():
        with contextlib.suppress(Exception):
            tracker.set_tags(run_id, {BEAT: f"{time.time():.0f}"})

    with _every(interval, beat, f"spinesweep-parent-heartbeat-{run_id[:8]}", at_once=False):
        yield


def dead_launcher(tags: dict[str, str], now: float | None = None) -> str | None:
    """Why the launcher of a RUNNING parent run is dead, in words, or None while it may live: on
    this host its process is gone (or its pid now belongs to another process); elsewhere its
    heartbeat is older than three intervals. A run without these tags (an older version's) is
    left alone."""
    import socket

    import psutil

    if BEAT not in tags:
        return None
    now = time.time() if now is None else now
    host, pid = tags.get(HOST, "?"), tags.get(PID, "?")
    if host == socket.gethostname() and pid.isdigit():
        try:
            alive = abs(psutil.Process(int(pid)).create_time() - float(tags.get(PID_STARTED, "0"))) < 1.0
        except psutil.Error:
            alive = False
        if not alive:
            return f"its launcher (pid {pid} on this host, {host}) is gone"
        return None
    age = now - float(tags[BEAT])
    if age > 3 * float(tags.get(BEAT_INTERVAL, "20")):
        return f"its launcher (pid {pid} on {host}) sent no heartbeat for {age:.0f} s"
    return None


def close_dead_parents(tracker, experiment_id: str, study_name: str, log=None) -> list[str]:
    """Close (KILLED, the reason in the `error` tag) the RUNNING parent runs of the study's
    invocations whose launcher is dead (`dead_launcher`); their trials' runs are closed through
    the trials' own heartbeats. Returns the closed run ids."""
    closed = []
    for r in tracker.search_runs([experiment_id], f"tags.study = '{study_name}' and tags.`{BEAT}` != '' "
                                 "and attributes.status = 'RUNNING'", max_results=1000):
        why = dead_launcher(r.data.tags)
        if why is None:
            continue
        tracker.fail_run(r.info.run_id, f"invocation ended without closing its run: {why}", "KILLED")
        closed.append(r.info.run_id)
        if log is not None:
            log(f"closed the parent run {r.info.run_id} of a dead invocation: {why}")
    return closed

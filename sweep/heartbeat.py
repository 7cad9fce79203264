"""A running trial's heartbeat, recorded by its worker.

`Study.optimize` records heartbeats from a thread of Optuna's (in the private module
`optuna.storages._heartbeat`); the workers run their own ask/tell loop (see `quota.py` for why),
so they record it themselves, through the storage's public `record_heartbeat`. One difference on
purpose: an unreachable storage is not a traceback printed from a background thread.
"""
from __future__ import annotations

import contextlib
import threading

from optuna.storages import BaseStorage

from .storage import STORAGE_ERRORS

__all__ = ["heartbeat"]


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
    stop = threading.Event()

    def beat():
        while True:
            with contextlib.suppress(*STORAGE_ERRORS):
                storage.record_heartbeat(trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"optuna-heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()

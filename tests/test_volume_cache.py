"""The volume cache at scale: a budget with least-recently-used eviction, one decode per entry
however many processes ask, nothing half-written after a crash, parallel cold preprocessing."""
import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest

from trainer.data import volumes as volumes_mod
from trainer.data.layout import Layout
from trainer.data.volumes import CacheWarning, SeriesRef, VolumeStore, parse_size


def refs_of(layout: Layout, studies: int) -> list[SeriesRef]:
    return [SeriesRef(s, sid, layout.series_dir(s, sid)) for s in layout.study_ids[:studies]
            for ids in layout.series_of(s).values() for sid in ids]


def entry_bytes(store: VolumeStore, ref: SeriesRef) -> int:
    npy, meta, _ = store.paths(ref.study_id, ref.series_id)
    return npy.stat().st_size + meta.stat().st_size


def test_sizes_parse():
    assert parse_size("64GB") == parse_size(64) == 64 * 2**30
    assert parse_size("500 MB") == 500 * 2**20 and parse_size("1.5TiB") == int(1.5 * 2**40)
    with pytest.raises(ValueError, match="cache budget 'lots'"):
        parse_size("lots")


def test_the_budget_holds_and_the_least_recently_used_go_first(layout, tmp_path, monkeypatch):
    refs = refs_of(layout, 2)[:5]
    sizing = VolumeStore(tmp_path / "sizing")
    s = []
    for r in refs:
        sizing.ensure(r)
        s.append(entry_bytes(sizing, r))
    # room for the first four; the fifth needs exactly one eviction (no hysteresis here)
    monkeypatch.setattr(volumes_mod, "EVICT_TO", 1.0)
    budget = s[0] + s[2] + s[3] + max(s[1], s[4]) + 5 * 4096
    store = VolumeStore(tmp_path / "cache", budget)
    for r in refs[:4]:
        store.ensure(r)
    store.open(refs[0])  # used again: refs[1] is now the least recently used
    with pytest.warns(CacheWarning, match=r"evicted 1 series .* least recently used first.* budget of"):
        store.ensure(refs[4])
    assert [store.cached(r) for r in refs] == [True, False, True, True, True]
    assert store.usage() <= budget
    # the evicted entry is decoded again when asked for, and the budget still holds
    with pytest.warns(CacheWarning, match="evicted"):
        assert store.open(refs[1]).images
    assert store.usage() <= budget


def test_the_budget_holds_while_a_cold_cache_fills(layout, tmp_path):
    refs = refs_of(layout, 4)
    budget = 3 * 2**20
    store = VolumeStore(tmp_path / "cache", budget)
    with pytest.warns(CacheWarning, match="evicted"):
        for r in refs:
            store.ensure(r)
            assert store.usage() <= budget


def test_an_entry_larger_than_the_budget_is_decoded_but_not_kept(layout, tmp_path):
    ref = refs_of(layout, 1)[0]
    store = VolumeStore(tmp_path / "cache", budget=1000)
    with pytest.warns(CacheWarning, match="does not fit in the cache budget"):
        vol = store.open(ref)
    assert len(vol) > 5 and store.usage() == 0


def _ensure_all(root, refs, log, out):
    real = volumes_mod.read_series

    def slow_read(folder):  # a slow decode, so both processes meet on each entry
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {folder}\n")
        time.sleep(0.2)
        return real(folder)

    volumes_mod.read_series = slow_read
    out.put((os.getpid(), [VolumeStore(root).ensure(r) for r in refs]))


def test_two_processes_asking_for_the_same_new_volumes_decode_them_once(layout, tmp_path):
    refs = refs_of(layout, 2)
    log = tmp_path / "decodes.log"
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_ensure_all, args=(tmp_path / "cache", refs, log, out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    built = np.array(list(results.values()))
    assert (built.sum(axis=0) == 1).all(), "every entry is built by exactly one process"
    decoded = log.read_text().splitlines()
    assert len(decoded) == len(refs) and len({d.split()[1] for d in decoded}) == len(refs)
    store = VolumeStore(tmp_path / "cache")
    assert all(store.cached(r) for r in refs)


def _crash_while_writing(root, ref):
    real = volumes_mod.atomic_write_bytes

    def half_then_die(path, data):  # the kernel kills the builder half-way through its pixels
        if path.suffix != ".npy":
            return real(path, data)
        with open(path.parent / f".{path.stem}.crash.tmp", "wb") as f:
            f.write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

    volumes_mod.atomic_write_bytes = half_then_die
    VolumeStore(root).ensure(ref)


def test_a_builder_killed_mid_write_leaves_nothing_that_is_trusted(layout, tmp_path):
    ref = refs_of(layout, 1)[0]
    p = mp.get_context("fork").Process(target=_crash_while_writing, args=(tmp_path / "cache", ref))
    p.start()
    p.join(timeout=60)
    assert p.exitcode == -signal.SIGKILL
    store = VolumeStore(tmp_path / "cache")
    npy, meta, _ = store.paths(ref.study_id, ref.series_id)
    assert list(npy.parent.glob("*.tmp")) and not meta.exists()  # the debris, never an entry
    assert not store.cached(ref)
    assert store.ensure(ref)  # its lock died with it: the next builder takes over and clears up
    assert store.cached(ref) and not list(npy.parent.glob("*.tmp"))


@pytest.mark.parametrize("other_thread", [False, True], ids=["fork", "forkserver"])
def test_parallel_cold_preprocessing_equals_serial(layout, tmp_path, other_thread):
    import threading

    refs = refs_of(layout, 3)
    serial, parallel = VolumeStore(tmp_path / "a"), VolumeStore(tmp_path / "b")
    r1 = serial.prepare(refs, jobs=1, progress=False)
    stop = threading.Event()
    if other_thread:  # a study worker's heartbeat, say: the workers then come from a fork server
        threading.Thread(target=stop.wait, daemon=True).start()
    try:
        r2 = parallel.prepare(refs, jobs=2, progress=False)
    finally:
        stop.set()
    assert (r1.decoded, r2.decoded, r2.jobs) == (len(refs), len(refs), 2) and not r1.failed and not r2.failed
    for r in refs:
        a, b = serial.open(r), parallel.open(r)
        assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a.images, b.images))
        np.testing.assert_array_equal(a.positions, b.positions)
    assert parallel.prepare(refs, jobs=2, progress=False).reused == len(refs)


def test_the_caches_of_earlier_versions_are_removed_once(tmp_path):
    old_crops = tmp_path / "samples" / "abc123" / "1.npy"
    old_volume = tmp_path / "volumes" / "1" / "2.npz"
    for f in (old_crops, old_volume):
        f.parent.mkdir(parents=True)
        f.write_bytes(b"x" * 1000)
    with pytest.warns(CacheWarning, match="removed the caches of an earlier spinesweep"):
        VolumeStore(tmp_path)
    assert not old_crops.exists() and not old_volume.exists()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        VolumeStore(tmp_path)  # nothing left to say

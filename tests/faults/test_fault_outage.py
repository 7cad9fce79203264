"""Stores that go away: the MLflow tracking server down for a while mid-study (logging retries,
no trial result is lost), the Optuna storage gone for good (the study stops with one clear line),
a full disk under a checkpoint or the crop cache (a clear error, no half-written entry reused), a
corrupt cache entry (detected and rebuilt)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient

from engines import TrackingServer

DONE = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def start(args, cwd):
    # MLflow's HTTP client retries with exponential backoff (factor 2 by default: minutes of
    # patience); factor 1 keeps the same behaviour and this test short
    return subprocess.Popen([sys.executable, "-m", "spinesweep", *args], cwd=cwd, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", SPINESWEEP_HEARTBEAT="2",
                                     MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_running(storage: str, name: str, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            trials = optuna.load_study(study_name=name, storage=storage).trials
            if any(t.state == optuna.trial.TrialState.RUNNING and "mlflow_run_id" in t.user_attrs for t in trials):
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise AssertionError("no trial started in time")


@pytest.mark.slow
def test_tracking_server_away_for_a_while(phantom_dir, workdir):
    server = TrackingServer(f"sqlite:///{workdir / 'server' / 'mlflow.db'}", workdir / "server" / "artifacts")
    (workdir / "server").mkdir()
    server.start()
    try:
        proc = start(["demo", "--smoke", "--n-trials", "3", "--tracking-uri", server.uri, "--data", str(phantom_dir),
                      "--set", "optim.epochs=4", "--set", "data.max_studies=40"], workdir)
        wait_running("sqlite:///studies.db", "demo-smoke", proc)
        server.stop()  # gone mid-trial ...
        time.sleep(8)
        server.start()  # ... and back on the same address
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out
    finally:
        server.stop()
    # what the server stored, read from its database (starting it again costs a server start-up)
    s = optuna.load_study(study_name="demo-smoke", storage="sqlite:///studies.db")
    assert len(s.trials) == 3 and all(t.state in DONE for t in s.trials), [t.state for t in s.trials]
    client = MlflowClient(server.backend)
    exp = client.get_experiment_by_name("demo-smoke")
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id], "tags.trial != ''")}
    assert len(runs) == 3 and not [r for r in runs.values() if r.info.status == "RUNNING"]
    for t in s.trials:  # every result reached MLflow
        r = runs[t.user_attrs["mlflow_run_id"]]
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert r.info.status == "FINISHED" and r.data.metrics["score"] == pytest.approx(t.value)
        assert len(client.get_metric_history(r.info.run_id, "train_loss")) >= 1


@pytest.mark.slow
def test_storage_gone_for_good_stops_the_study_with_one_clear_line(postgres, phantom_dir, workdir):
    storage = postgres.create_db("optuna_gone")
    proc = start(["demo", "--smoke", "--n-trials", "4", "--storage", storage, "--data", str(phantom_dir),
                  "--set", "optim.epochs=6", "--set", "data.max_studies=40"], workdir)
    try:
        wait_running(storage.replace("postgresql://", "postgresql+psycopg://"), "demo-smoke", proc)
        postgres.stop()
        out, _ = proc.communicate(timeout=300)
    finally:
        postgres.start()  # for the other tests of the session
    assert proc.returncode == 2, out
    last = [line for line in out.splitlines() if line.startswith("optuna-run: error:")]
    assert last and "unreachable" in last[-1] and "--resume" in last[-1], out[-3000:]
    assert "Traceback" not in out and "s3cret" not in out
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("demo-smoke")
    runs = client.search_runs([exp.experiment_id])
    assert not [r for r in runs if r.info.status == "RUNNING"]  # the trial's run and the parent are closed


@pytest.fixture
def small_disk(tmp_path):
    """A 32 MiB tmpfs: a full disk on demand (root is needed to mount it)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:  # root without the right to mount (some containers)
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(folder: Path, leave: int = 16 * 1024) -> None:
    """Fill a file system up to `leave` free bytes."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


@pytest.mark.slow
def test_disk_full_while_writing_a_checkpoint(small_disk, phantom_dir):
    from trainer.config import TrainConfig
    from trainer.fit import fit

    out = small_disk / "run"
    out.mkdir()
    fill(small_disk)
    cfg = TrainConfig().with_overrides({
        "data.data_dir": str(phantom_dir), "data.conditions": ["spinal_canal_stenosis"], "data.img_size": 32,
        "data.sag_t2_slices": 1, "model.backbone": "resnet10t", "model.pretrained": False, "model.head": "linear",
        "optim.epochs": 1, "augment.preset": "none", "output_dir": str(out)})
    with pytest.raises(OSError, match="checkpoint.pt: checkpoint could not be written"):
        fit(cfg)
    assert not list(out.glob("*.pt")) and not list(out.glob("*.tmp"))  # nothing half-written is left


@pytest.mark.slow
def test_disk_full_while_writing_the_cache_leaves_no_entry(small_disk, phantom_dir):
    from trainer.config import DataConfig
    from trainer.data.crops import CropSpec
    from trainer.data.layout import Layout
    from trainer.data.samples import SampleSource
    from trainer.data.volumes import VolumeStore

    layout = Layout(phantom_dir)
    spec = CropSpec.from_config(DataConfig(data_dir=str(phantom_dir)))
    sid = layout.study_ids[0]
    source = SampleSource(layout, spec, VolumeStore(small_disk / "cache"))
    fill(small_disk, leave=64 * 1024)
    with pytest.raises(OSError, match=f"volume cache .*: cannot write study {sid}"):
        source.prepare([sid])
    assert not list((small_disk / "cache" / "volumes").rglob("*.tmp"))
    assert not list((small_disk / "cache" / "volumes").rglob("*.json"))  # no entry, so nothing corrupt to reuse
    (small_disk / "filler").unlink()  # space again: the entries are built and then reused
    built = source.prepare([sid])
    assert built.decoded == built.series >= 3  # every series the spec cuts from (the phantom may give 2 axial)
    again = SampleSource(layout, spec, VolumeStore(small_disk / "cache")).prepare([sid])
    assert again.reused == built.series and again.decoded == 0
    fresh = SampleSource(layout, spec, VolumeStore(small_disk.parent / "fresh-cache"))
    fresh.prepare([sid])
    assert np.array_equal(source.study_crops(sid).images, fresh.study_crops(sid).images)
    shutil.rmtree(small_disk.parent / "fresh-cache")


def test_a_corrupt_cache_entry_is_detected_and_rebuilt(phantom_dir, tmp_path):
    from trainer.config import DataConfig
    from trainer.data.crops import CropSpec
    from trainer.data.layout import Layout
    from trainer.data.samples import SampleSource
    from trainer.data.volumes import VolumeStore

    layout = Layout(phantom_dir)
    spec = CropSpec.from_config(DataConfig(data_dir=str(phantom_dir), img_size=32))
    sid = layout.study_ids[0]
    SampleSource(layout, spec, VolumeStore(tmp_path / "cache")).prepare([sid])
    good = SampleSource(layout, spec, VolumeStore(tmp_path / "cache")).study_crops(sid).images
    npy = next((tmp_path / "cache" / "volumes").rglob("*.npy"))
    npy.write_bytes(npy.read_bytes()[: len(npy.read_bytes()) // 2])  # truncated, as by a crash
    source = SampleSource(layout, spec, VolumeStore(tmp_path / "cache"))
    with pytest.warns(UserWarning, match="corrupt cache entry"):
        source.prepare([sid])
    assert np.array_equal(source.study_crops(sid).images, good)

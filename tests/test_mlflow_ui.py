"""The MLflow UI opens a study on its trials: the experiment's saved view (set by every study)
lists the trial runs flat, best first, with the score and the sampled parameters as columns.
Checked in headless Chromium against a real `mlflow ui`."""
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from dashboards.browser import chromium, dom
from spinesweep.cli import main
from sweep.tracking import VIEW_TAG, Tracker, default_tracking_uri, server_env, view_url

from helpers import free_port


@pytest.mark.slow
def test_the_study_view_shows_trials_with_score_and_parameters(phantom_dir, tmp_path, monkeypatch):
    if chromium() is None:
        if os.environ.get("SPINESWEEP_ALLOW_NO_BROWSER"):
            pytest.skip("no chromium (SPINESWEEP_ALLOW_NO_BROWSER set)")
        pytest.fail("chromium is missing: scripts/test installs it (scripts/test-deps)")
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--smoke", "--n-trials", "2", "--data", str(phantom_dir)]) == 0
    exp = Tracker().get_experiment("demo-smoke")
    assert VIEW_TAG in exp.tags and exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", default_tracking_uri(),
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=server_env())
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2).close()
                break
            except OSError:
                assert time.time() < deadline, "mlflow ui did not start"
                time.sleep(0.5)
        page = dom(view_url(base, exp.experiment_id), budget_ms=25000)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
    assert "demo-t0" in page and "demo-t1" in page  # the trials, not folded under their parent run
    assert "demo-smoke-2" not in page  # the parent run (named <study>-<date>) is filtered out
    for column in ("score", "optim.lr", "model.head", "data.window_ratio", "model.dropout"):
        assert column in page, column

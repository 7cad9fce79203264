"""optuna-dashboard, Optuna's own web UI, opens the studies this project writes."""
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from spinesweep.cli import main

from helpers import free_port


@pytest.mark.slow
def test_optuna_dashboard_shows_a_study(phantom_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--smoke", "--n-trials", "2", "--data", str(phantom_dir)]) == 0
    port = free_port()
    exe = Path(sys.executable).with_name("optuna-dashboard")
    proc = subprocess.Popen([str(exe), "sqlite:///studies.db", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, studies = time.time() + 60, None
        while time.time() < deadline and studies is None:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
                    studies = json.load(r)["study_summaries"]
            except OSError:
                time.sleep(0.5)
        assert studies is not None, "optuna-dashboard did not answer"
        study = next(s for s in studies if s["study_name"] == "demo-smoke")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{study['study_id']}", timeout=10) as r:
            detail = json.load(r)
        assert len(detail["trials"]) == 2
        assert {p["name"] for p in detail["trials"][0]["params"]} >= {"optim.lr", "model.head"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)

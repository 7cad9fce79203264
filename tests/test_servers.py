"""`optuna-run ui` and `optuna-run server` stop their MLflow server when they are stopped."""
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest

from helpers import free_port


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def start(args, cwd):
    return subprocess.Popen([sys.executable, "-m", "spinesweep", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_until_serving(proc, port: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError("the MLflow server did not answer in time")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stopping_the_launcher_stops_the_mlflow_ui(tmp_path, monkeypatch, sig):
    from sweep.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    Tracker(create=True)  # a store to show
    port = free_port()
    proc = start(["ui", "--port", str(port)], tmp_path)
    try:
        wait_until_serving(proc, port)
        group = [p for p in psutil.Process(proc.pid).children(recursive=True)]
        assert group, "the UI runs in a child process"
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        deadline = time.time() + 20
        while time.time() < deadline and (port_open(port) or any(p.is_running() and p.status() != "zombie"
                                                                for p in group)):
            time.sleep(0.5)
        assert not port_open(port), "the MLflow UI still answers after its launcher was stopped"
        assert not [p for p in group if p.is_running() and p.status() != "zombie"]
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_stopping_the_tracking_server_launcher_stops_the_server(tmp_path):
    port = free_port()
    proc = start(["server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                  "--artifacts-destination", str(tmp_path / "artifacts"), "--port", str(port), "--workers", "1"],
                 tmp_path)
    try:
        wait_until_serving(proc, port)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "server stopped" in out, out
        deadline = time.time() + 20
        while time.time() < deadline and port_open(port):
            time.sleep(0.5)
        assert not port_open(port)
    finally:
        if proc.poll() is None:
            proc.kill()

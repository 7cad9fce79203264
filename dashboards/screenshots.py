"""The README's pictures: the dashboard of a study and the MLflow UI listing its runs, taken with
headless Chromium from the stores in the working folder (run after `scripts/demo`).

    .venv/bin/python -m dashboards.screenshots --study demo --out docs/img
"""
from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .browser import screenshot


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlflow_ui(tracking_uri: str, experiment: str, out: Path) -> Path:
    """Start `mlflow ui` on loopback, screenshot the experiment's run list, stop it."""
    from sweep.tracking import Tracker, server_env

    exp = Tracker(tracking_uri).get_experiment(experiment)
    if exp is None:
        raise SystemExit(f"no MLflow experiment {experiment!r}: run the study first")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri,
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=server_env())
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise SystemExit("the MLflow UI did not start within 60 s")
        from sweep.tracking import view_url

        # the study's own view (an experiment tag every study sets): trials flat, best first,
        # score and sampled parameters as columns
        return screenshot(view_url(base, exp.experiment_id), out, width=1900, height=1000, budget_ms=20000)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(argv=None) -> int:
    """Command line: screenshot the study's dashboard (``dashboards/<study>.html``) and its MLflow runs
    view into `--out` (``dashboard.png``, ``mlflow_ui.png``); returns 0.
    Raises SystemExit when the dashboard or the MLflow experiment is missing or the MLflow UI does not start."""
    from sweep.tracking import default_tracking_uri

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", default="demo")
    p.add_argument("--out", default="docs/img")
    p.add_argument("--tracking-uri", default=None)
    args = p.parse_args(argv)
    out = Path(args.out)
    report = Path("dashboards") / f"{args.study}.html"
    if not report.exists():
        raise SystemExit(f"{report} not found: run the study (or optuna-run dashboard {args.study}) first")
    a = screenshot(report.resolve().as_uri(), out / "dashboard.png", width=1280, height=4600)
    b = mlflow_ui(args.tracking_uri or default_tracking_uri(), args.study, out / "mlflow_ui.png")
    print(f"wrote {a} and {b}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

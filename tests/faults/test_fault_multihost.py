"""Several hosts, one study: two `optuna-run` invocations (separate processes and working
folders, as on two machines) against a real PostgreSQL storage and a real MLflow server."""
from __future__ import annotations

import os
import subprocess
import sys

import optuna
import pytest
from mlflow.tracking import MlflowClient

from engines import PASSWORD, TrackingServer


def launcher(args, cwd, env=None):
    return subprocess.Popen([sys.executable, "-m", "spinesweep", *args], cwd=cwd, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_two_hosts_share_one_study(postgres, phantom_dir, tmp_path):
    storage = postgres.create_db("optuna_multihost")
    server = TrackingServer(postgres.create_db("mlflow_multihost"), tmp_path / "artifacts").start()
    try:
        hosts = [tmp_path / "host1", tmp_path / "host2"]
        procs = []
        for h in hosts:
            h.mkdir()
            procs.append(launcher(["demo", "--smoke", "--n-trials", "5", "--resume", "--storage", storage,
                                   "--tracking-uri", server.uri, "--data", str(phantom_dir),
                                   "--set", "optim.epochs=2"], h))
        outs = [p.communicate(timeout=600)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs

        s = optuna.load_study(study_name="demo-smoke", storage=storage.replace("postgresql://", "postgresql+psycopg://"))
        states = [t.state for t in s.trials]
        assert len(s.trials) == 5 and all(st in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
                                          for st in states), states
        assert len({t.number for t in s.trials}) == 5

        client = MlflowClient(server.uri)
        exp = client.get_experiment_by_name("demo-smoke")
        runs = client.search_runs([exp.experiment_id], max_results=100)
        parents = [r for r in runs if "n_trials" in r.data.tags]
        children = [r for r in runs if "trial" in r.data.tags]
        assert len(parents) == 2  # one parent run per invocation
        assert len(children) == 5 and {r.data.tags["mlflow.parentRunId"] for r in children} <= {
            p.info.run_id for p in parents}
        assert {int(r.data.tags["trial"]) for r in children} == {t.number for t in s.trials}
        assert not [r for r in runs if r.info.status == "RUNNING"]
        assert {t.user_attrs["mlflow_run_id"] for t in s.trials} == {r.info.run_id for r in children}
        # artifacts went through the server into its folder
        some = children[0].info.run_id
        assert {a.path for a in client.list_artifacts(some)} >= {"config.yaml", "history.csv"}
        # both hosts worked
        assert {r.data.tags["worker"] for r in children} and all("trial" in o for o in outs)
        # the password is redacted everywhere
        for r in runs:
            text = " ".join([*r.data.params.values(), *r.data.tags.values()])
            assert PASSWORD not in text
        assert all(PASSWORD not in o for o in outs)
        for h in hosts:
            report = h / "dashboards" / "demo-smoke.html"
            assert report.exists() and PASSWORD not in report.read_text()
    finally:
        server.stop()

"""Security defaults: servers bind to loopback, credentials never reach MLflow, names given by the
user cannot become paths outside their folder."""
from __future__ import annotations

import shutil

import pytest
from mlflow.tracking import MlflowClient

from spinesweep.cli import build_parser
from sweep.workspace import check_study_name
from trainer.errors import UserError
from sweep.tracking import Tracker, redact


@pytest.mark.parametrize("argv", [["ui"], ["server", "--backend-store-uri", "sqlite:///x.db",
                                           "--artifacts-destination", "a"]])
def test_ui_and_server_bind_to_loopback_by_default(argv):
    assert build_parser().parse_args(argv).host == "127.0.0.1"


@pytest.mark.parametrize("url", ["postgresql://sweep:pa55@db:5432/optuna", "postgresql+psycopg://u:p%40ss@h/db",
                                 "mysql://root:hunter2@10.0.0.1/x"])
def test_redact(url):
    out = redact(f"storage {url} cannot be opened")
    assert ":***@" in out and "pa55" not in out and "hunter2" not in out and "p%40ss" not in out


def test_credentials_never_reach_mlflow(tmp_path, mlflow_template):
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")  # a migrated store: creating one costs seconds
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = Tracker(uri)
    exp = t.ensure_experiment("x")
    run = t.start_run(exp, "r", tags={"storage": "postgresql://sweep:pa55@db/optuna"})
    t.log_batch(run, params={"note": "postgresql://sweep:pa55@db/optuna"},
                tags={"command": "optuna-run demo --storage postgresql://sweep:pa55@db/optuna"})
    r = MlflowClient(uri).get_run(run)
    assert "pa55" not in " ".join([*r.data.params.values(), *r.data.tags.values()])


@pytest.mark.parametrize("name", ["../../etc/passwd", "a/b", ".hidden", "-flag", "x" * 200, "a..b"])
def test_study_names_cannot_escape_their_folder(name):
    with pytest.raises(UserError, match="study name"):
        check_study_name(name)


def test_ordinary_study_names_pass():
    for name in ("demo", "scs_heads-smoke", "full.v2", "Study_1"):
        assert check_study_name(name) == name

"""A trial that goes wrong is FAILED with its reason in Optuna and MLflow, and the study goes on:
NaN loss, an exception inside a head, a CUDA-style out-of-memory error (raised on the CPU)."""
from __future__ import annotations

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from spinesweep.cli import main
from sweep.tracking import default_tracking_uri
from trainer.models.heads import _registry, register_head
from trainer.models.heads.linear import LinearHead


@pytest.fixture
def faulty_heads():
    """Heads that fail on their first forward call, registered for this test only (the head tests
    parametrised over the registry never see them)."""

    @register_head("boom")
    class Boom(LinearHead):
        def forward(self, feats):
            raise RuntimeError("boom: the head could not handle its input")

    @register_head("oom")
    class Oom(LinearHead):
        def forward(self, feats):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    yield
    for name in ("boom", "oom"):
        _registry._HEADS.pop(name, None)


def failed_runs(study_name):
    client = MlflowClient(default_tracking_uri())
    exp = client.get_experiment_by_name(study_name)
    return {r.info.run_id: r for r in client.search_runs([exp.experiment_id], "tags.trial != ''")}


@pytest.mark.parametrize("overrides,reason", [
    # the fast loop keeps one kind (the quickest to fail); the others are the same path, slow
    pytest.param(["optim.lr=1e30", "optim.grad_clip=0"], "FloatingPointError",  # the real loss goes inf/NaN
                 marks=pytest.mark.slow),
    (["model.head=boom"], "boom: the head could not handle its input"),
    pytest.param(["model.head=oom"], "OutOfMemoryError: CUDA out of memory", marks=pytest.mark.slow),
])
def test_a_failing_trial_is_recorded_and_the_study_goes_on(overrides, reason, faulty_heads, phantom_dir, stores):
    sets = [a for o in overrides for a in ("--set", o)]
    assert main(["demo", "--smoke", "--n-trials", "2", "--data", str(phantom_dir), *sets]) == 0
    s = optuna.load_study(study_name="demo-smoke", storage="sqlite:///studies.db")
    assert len(s.trials) == 2  # the study went on after the first failure
    failed = [t for t in s.trials if t.state == optuna.trial.TrialState.FAIL]
    assert failed and all(reason in t.user_attrs["error"] for t in failed)
    runs = failed_runs("demo-smoke")
    for t in failed:
        r = runs[t.user_attrs["mlflow_run_id"]]
        assert r.info.status == "FAILED" and reason in r.data.tags["error"]
        assert "error.txt" in {a.path for a in MlflowClient(default_tracking_uri()).list_artifacts(r.info.run_id)}

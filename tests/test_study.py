"""Studies end to end on the small phantom: smoke runs of every space, exact trial counts across
workers, pruning, MLflow fields, runs table and reproduce. Failures, kills and outages are in
tests/faults/."""
import json
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from spinesweep.cli import main
from sweep.space import SPACES_DIR
from sweep.tracking import default_tracking_uri

ROOT = Path(__file__).resolve().parent.parent



def study(name, storage="sqlite:///studies.db"):
    return optuna.load_study(study_name=name, storage=storage)


def child_runs(experiment):
    client = MlflowClient(default_tracking_uri())
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], "tags.trial != ''", max_results=1000)


@pytest.mark.slow
@pytest.mark.parametrize("space", sorted(p.stem for p in SPACES_DIR.rglob("*.yaml")))
def test_every_space_runs_a_smoke_study(space, phantom_dir, stores, capsys):
    assert main([space, "--smoke", "--n-trials", "2", "--data", str(phantom_dir)]) == 0
    s = study(f"{space}-smoke")
    assert len(s.trials) == 2
    runs = child_runs(f"{space}-smoke")
    assert len(runs) == 2 and all(r.data.tags.get("smoke") == "true" for r in runs)
    assert all(r.data.params["optim.epochs"] == "1" and r.data.params["data.img_size"] == "32" for r in runs)
    out = capsys.readouterr().out
    assert "trial   0" in out and "optuna-run ui" in out


def assert_every_trial_logged(s: optuna.Study, experiment: str, worker: str = "main") -> None:
    """Each trial of the study is one MLflow child run of one parent run, with its tags, params,
    per-epoch curves, system metrics and artifacts, in the state Optuna gave it."""
    runs = {r.info.run_id: r for r in child_runs(experiment)}
    assert len(runs) == len(s.trials)
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs.values()}
    assert len(parents) == 1
    client = MlflowClient(default_tracking_uri())
    parent = client.get_run(parents.pop())
    assert parent.info.status == "FINISHED" and parent.data.tags["study"] == s.study_name
    for t in s.trials:
        r = runs[t.user_attrs["mlflow_run_id"]]
        assert r.info.run_name.endswith(f"-t{t.number}")
        assert r.data.tags["trial"] == str(t.number) and r.data.tags["study"] == s.study_name
        for tag in ("worker", "device", "git_commit", "data_fingerprint", "space_file_hash", "version.torch",
                    "version.optuna", "version.mlflow"):
            assert r.data.tags.get(tag), tag
        for k, v in t.params.items():
            assert r.data.tags[f"optuna.{k}"] == str(v)
        # one worker in-process, on what the machine has (TrainConfig.device "auto")
        assert r.data.tags["worker"] == worker and r.data.params["device"] == "auto"
        assert r.data.tags["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
        assert r.data.params["optim.lr"] == str(t.params["optim.lr"])  # the flat config as params
        # MLflow's own system metrics, so an idle GPU (or a starved CPU) shows in the UI
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(r.data.metrics)
        if torch.cuda.is_available():
            assert any(k.startswith("system/gpu_") and k.endswith("utilization_percentage") for k in r.data.metrics)
        artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
        if t.state == optuna.trial.TrialState.FAIL:
            assert r.info.status == "FAILED" and r.data.tags["error"] == t.user_attrs["error"]
            assert "error.txt" in artifacts
            continue
        history = client.get_metric_history(r.info.run_id, "val_loss")
        assert [m.step for m in history] == list(range(1, len(history) + 1))
        for m in ("train_loss", "val_score", "loss_spinal", "lr", "seconds"):
            assert client.get_metric_history(r.info.run_id, m), m
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert r.info.status == "FINISHED" and r.data.metrics["score"] == pytest.approx(t.value)
            assert {"config.yaml", "oof.csv", "confusion.json", "checkpoint.pt", "history.csv"} <= artifacts
        else:
            assert r.info.status == "KILLED" and "pruned_at_step" in r.data.tags


def test_a_study_logs_every_trial_to_mlflow(quick_copy):
    """Complete, pruned and failed trials, each in MLflow as Optuna has it (the session's study,
    trained by quick_fit: see tests/conftest.py)."""
    s = study("quick")
    assert [t.state.name for t in s.trials] == ["COMPLETE", "PRUNED", "FAIL", "COMPLETE"]
    assert_every_trial_logged(s, "quick")


@pytest.mark.slow
def test_a_real_study_logs_every_trial_to_mlflow(phantom_dir, stores):
    assert main(["demo", "--smoke", "--n-trials", "3", "--data", str(phantom_dir), "--set", "optim.epochs=2"]) == 0
    s = study("demo-smoke")
    assert {t.state for t in s.trials} <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    assert len(s.trials) == 3
    assert_every_trial_logged(s, "demo-smoke")


@pytest.mark.slow  # two spawned worker processes import torch: seconds; the quota contract (test_sweep_contracts) keeps four processes in the fast loop
@pytest.mark.parametrize("fit", ["quick", "real"])
def test_two_workers_make_exactly_n_distinct_trials(fit, phantom_dir, stores):
    from fakes import quick_fit
    from sweep.study import run_study

    run = dict(data=str(phantom_dir), smoke=True, log=lambda line: None,
               fit_fn=quick_fit if fit == "quick" else None, pinned={"model.head": "linear"} if fit == "quick" else {})
    run_study("demo", 5, workers=2, **run)
    s = study("demo-smoke")
    assert len(s.trials) == 5 and len({t.number for t in s.trials}) == 5
    assert {t.state for t in s.trials} <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    runs = child_runs("demo-smoke")
    assert {r.data.tags["worker"] for r in runs} == {"cpu0", "cpu1"}
    # CPU workers train on the CPU even where a GPU is visible, and say so
    assert {(r.data.params["device"], r.data.tags["device"]) for r in runs} == {("cpu", "cpu")}
    # resuming with the same N adds nothing: N is the study's total, and no empty parent run is made
    outcome = run_study("demo", 5, resume=True, **run)
    assert outcome.parent_run_id is None and len(study("demo-smoke").trials) == 5
    client = MlflowClient(default_tracking_uri())
    exp = client.get_experiment_by_name("demo-smoke")
    assert len(client.search_runs([exp.experiment_id], "tags.study = 'demo-smoke' and tags.n_trials = '5'")) == 1


def test_runs_table_lists_trials_best_first(quick_copy, capsys):
    assert main(["runs", "quick", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["trial"] for r in rows] == [3, 0, 1, 2]  # scored best first, then the others by number
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE", "PRUNED", "FAILED"]
    assert "param:optim.lr" in rows[0] and rows[2]["score"] is not None and rows[3]["score"] is None
    s = study("quick")
    assert rows[0]["score"] == pytest.approx(s.trials[3].value)
    assert main(["runs", "quick", "--top", "1"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["trial", "state", "score"] and len(table) == 2


def test_reproduce_reruns_a_trial_from_its_logged_params(quick_copy):
    from fakes import quick_fit
    from sweep.query import reproduce

    s = study("quick")
    best = s.trials[3]
    out = reproduce(best.user_attrs["mlflow_run_id"], log=lambda line: None, fit_fn=quick_fit)
    assert out["score"] == out["logged_score"] == best.value  # quick_fit is exact; real training: 1e-6 below


@pytest.mark.slow
def test_runs_table_and_reproduce(phantom_dir, stores, capsys):
    assert main(["demo", "--smoke", "--n-trials", "2", "--data", str(phantom_dir), "--set", "optim.epochs=2",
                 "--set", "augment.preset=light"]) == 0
    capsys.readouterr()
    assert main(["runs", "demo-smoke", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    scored = [r for r in rows if r["score"] is not None and r["state"] != "PRUNED"]
    best = scored[0]["run_id"]
    assert main(["reproduce", best, "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert abs(out["score"] - out["logged_score"]) < 1e-6
    assert f"reproduce {best[:12]}: fold 0 done, score {out['score']:.4f}" in captured.err  # progress, not silence


@pytest.mark.parametrize("argv,message", [
    (["scs_head"], "unknown search space 'scs_head'; did you mean scs_heads"),
    (["demo", "--gpus", "7"], "--gpus 7: no GPU with id 7"),
    (["demo", "--trials-per-gpu", "0"], "study: argument --trials-per-gpu: must be positive (got 0)"),
    (["demo", "--workers", "2", "--trials-per-gpu", "2"], "--workers (CPU processes) and --gpus/--trials-per-gpu"),
    (["demo", "--storage", "postgresql://u:secret@127.0.0.1:1/none"], "storage postgresql://u:***@127.0.0.1:1/none cannot be opened"),
    (["demo", "--set", "optim.lrr=1"], "optim.lrr: unknown config key"),
    (["demo", "--study-name", "../../etc/x"], "study name '../../etc/x': use letters, digits"),
    (["demo", "--n-trials", "0"], "study: argument --n-trials: must be positive (got 0)"),
    (["demo", "--n-trials", "-1"], "study: argument --n-trials: must be positive (got -1)"),
    (["demo", "--n-trials", "2.5"], "study: argument --n-trials: expected a whole number, got '2.5'"),
    (["demo", "--timeout", "-5"], "study: argument --timeout: must be positive (got -5)"),
    (["demo", "--workers", "0"], "study: argument --workers: must be positive (got 0)"),
    (["demo", "--storage", "sqlite:////nonexistent/dir/x.db"], "folder /nonexistent/dir does not exist"),
    (["demo", "--tracking-uri", "http://u:secret@127.0.0.1:9"], "tracking server http://u:***@127.0.0.1:9 does not answer"),
    (["demo", "--tracking-uri", "postgresql://u:secret@127.0.0.1:1/none"],
     "tracking store postgresql+psycopg://u:***@127.0.0.1:1/none cannot be opened: OperationalError"),
])
def test_bad_input_fails_before_any_trial(argv, message, workdir, capsys, phantom_dir):
    assert main(argv + ["--data", str(phantom_dir)]) == 2
    err = capsys.readouterr().err
    assert message in err and "secret" not in err
    assert not (workdir / "mlruns").exists()


def test_a_missing_label_column_stops_the_study_before_any_trial(phantom_copy, workdir, capsys):
    import pandas as pd

    path = phantom_copy / "train.csv"
    pd.read_csv(path).drop(columns=["spinal_canal_stenosis_l1_l2"]).to_csv(path, index=False)
    assert main(["demo", "--smoke", "--data", str(phantom_copy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("optuna-run: error: ") and "train.csv: missing column(s) ['spinal_canal_stenosis_l1_l2']" in err[-1]
    assert not (workdir / "studies.db").exists() and not (workdir / "mlruns").exists()


def test_reproduce_of_an_unknown_run_is_one_line(stores, capsys):
    assert main(["reproduce", "0123456789abcdef0123456789abcdef"]) == 2
    err = capsys.readouterr().err
    assert "no run '0123456789abcdef0123456789abcdef' in sqlite:///" in err and "Traceback" not in err


def test_a_heartbeat_that_meets_a_dead_storage_is_not_a_thread_traceback(monkeypatch):
    import threading
    import time

    import sqlalchemy.exc

    from sweep.heartbeat import heartbeat

    class DeadStorage:
        beats = 0

        def get_heartbeat_interval(self):
            return 0.01

        def record_heartbeat(self, trial_id):
            self.beats += 1
            raise sqlalchemy.exc.OperationalError("UPDATE trial_heartbeats", {}, Exception("server closed"))

    crashed = []
    monkeypatch.setattr(threading, "excepthook", crashed.append)
    storage = DeadStorage()
    with heartbeat(storage, 1):
        time.sleep(0.1)
    assert storage.beats >= 2  # it kept trying (the storage may come back) ...
    assert crashed == []  # ... and never printed a traceback from its thread


def test_trials_per_gpu_plans_k_workers_per_device():
    from sweep.storage import StudyError
    from sweep.workers import plan_workers

    specs = plan_workers("0,1", None, 2, available=["0", "1", "2"])
    assert [(w.name, w.gpu, w.device) for w in specs] == [
        ("gpu0.1", "0", "cuda"), ("gpu0.2", "0", "cuda"), ("gpu1.1", "1", "cuda"), ("gpu1.2", "1", "cuda")]
    assert len({w.index for w in specs}) == 4  # each its own sampler seed
    assert [w.name for w in plan_workers("0,0,1", None, None, available=["0", "1"])] == ["gpu0.1", "gpu0.2", "gpu1"]
    assert [w.gpu for w in plan_workers(None, None, 3, available=["0", "1"])] == ["0"] * 3 + ["1"] * 3
    with pytest.raises(StudyError, match="--trials-per-gpu 2: this machine has no GPU"):
        plan_workers(None, None, 2, available=[])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_trials_per_gpu_on_a_machine_without_gpus_is_one_line(workdir, capsys, phantom_dir):
    assert main(["demo", "--trials-per-gpu", "2", "--data", str(phantom_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--trials-per-gpu 2: this machine has no GPU" in err
    assert not (workdir / "mlruns").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a GPU machine)")
def test_two_trials_share_one_gpu_and_the_quota_stays_exact(phantom_dir, workdir):
    assert main(["demo", "--smoke", "--n-trials", "4", "--gpus", "0", "--trials-per-gpu", "2",
                 "--data", str(phantom_dir)]) == 0
    s = study("demo-smoke")
    assert len(s.trials) == 4 and len({t.number for t in s.trials}) == 4
    runs = child_runs("demo-smoke")
    assert {r.data.tags["worker"] for r in runs} <= {"gpu0.1", "gpu0.2"}
    assert {r.data.tags["device"] for r in runs} == {"cuda:0"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a GPU machine)")
def test_gpu_workers_start_even_after_this_process_used_cuda(phantom_dir, workdir):
    torch.zeros(1, device="cuda")  # a notebook that trained on the GPU, then launches a study
    assert main(["demo", "--smoke", "--n-trials", "2", "--gpus", "0", "--data", str(phantom_dir)]) == 0
    s = study("demo-smoke")
    assert {t.state for t in s.trials} <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    runs = child_runs("demo-smoke")
    assert {(r.data.tags["worker"], r.data.tags["device"], r.data.params["device"]) for r in runs} == \
        {("gpu0", "cuda:0", "cuda")}
    for r in runs:
        if r.info.status == "FINISHED":  # AMP on CUDA, recorded with the run
            assert r.data.tags["environment.device_name"].startswith("NVIDIA")
            assert r.data.tags["environment.amp"] in ("bfloat16", "float16")


def test_reproduce_of_a_parent_run_says_it_is_not_a_trial(quick_copy, capsys):
    from mlflow.tracking import MlflowClient as Client

    parent = study("quick").trials[0].user_attrs["mlflow_run_id"]
    parent = Client(default_tracking_uri()).get_run(parent).data.tags["mlflow.parentRunId"]
    assert main(["reproduce", parent]) == 2
    err = capsys.readouterr().err
    assert f"run {parent} is not a trial's run" in err and err.count("\n") == 1


def test_runs_table_tells_an_interrupted_trial_from_a_pruned_one(stores):
    """Both runs end KILLED in MLflow: a pruned trial's is tagged pruned; an interrupted one's
    (Ctrl-C: Optuna holds it FAILED, its parameters enqueued again) is not."""
    from sweep.query import runs_table
    from sweep.tracking import Tracker

    tracker = Tracker()
    exp = tracker.ensure_experiment("states")
    pruned = tracker.start_run(exp, "states-t0", tags={"trial": 0})
    tracker.log_batch(pruned, metrics={"score": 0.9}, tags={"pruned": "true"})
    tracker.end_run(pruned, "KILLED")
    stopped = tracker.start_run(exp, "states-t1", tags={"trial": 1})
    tracker.fail_run(stopped, "interrupted (Ctrl-C); its parameters were enqueued again", "KILLED")
    states = {r["trial"]: (r["state"], r["score"]) for r in runs_table("states")}
    assert states == {0: ("PRUNED", 0.9), 1: ("INTERRUPTED", None)}

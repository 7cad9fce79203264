"""A thin MLflow layer: explicit run ids through `MlflowClient` (no global active run, so any
process can attach to a parent run), retries on transient store errors, and redaction of
credentials before anything is logged.

Stores: by default a SQLite tracking DB ``mlruns/mlflow.db`` with artifacts under
``mlruns/artifacts`` (MLflow 3 refuses the old file store). The launcher creates the store, the
experiment and the parent run once; workers only attach.
"""
from __future__ import annotations

import contextlib
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

from trainer.errors import UserError

DEFAULT_MLRUNS = Path("mlruns")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # downloads are small; keep output clean
_SECRET = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]+):(?P<pw>[^@/\s]+)@", re.I)


def redact(text: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db``."""
    return _SECRET.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(text))


def default_tracking_uri(root: Path = DEFAULT_MLRUNS) -> str:
    """The default tracking store: the SQLite URI ``sqlite:///<root>/mlflow.db``, `root` made absolute."""
    return f"sqlite:///{(Path(root) / 'mlflow.db').resolve()}"


def default_artifact_location(root: Path = DEFAULT_MLRUNS) -> str:
    """Where a SQLite store's experiments keep their artifacts: ``<root>/artifacts`` as an absolute ``file://`` URI."""
    return (Path(root) / "artifacts").resolve().as_uri()


def server_env() -> dict[str, str]:
    """The environment an MLflow server (`mlflow ui`, `mlflow server`) is started with: this one,
    with MLflow's job execution off unless ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION`` is set. MLflow 3
    otherwise starts a job runner with about eight huey consumer processes beside the server (for
    its GenAI jobs, which studies never submit), each importing mlflow: on 2 cores that more than
    doubled a server's start-up and kept the cores busy while it ran."""
    env = dict(os.environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return env


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _retry(fn: Callable, *args, attempts: int = 6, base_delay: float = 0.5, **kwargs):
    """Call an MLflow client method, retrying transient failures (SQLite locked, server away)."""
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            msg = str(e).lower()
            transient = any(s in msg for s in ("locked", "connection", "timed out", "temporarily", "503",
                                               "502", "max retries", "refused", "reset by peer"))
            if not transient or i == attempts - 1:
                raise
            time.sleep(base_delay * 2**i)


class TrackingError(UserError):
    """The MLflow tracking store cannot be reached or opened; the message names it (redacted)."""


PARAM_LIMIT = 6000  # characters: MLflow refuses a longer param value
PARAMS_CUT = "spinesweep.params_cut"  # the run's params logged cut at PARAM_LIMIT (comma-separated keys)
PROBE_TIMEOUT = 5.0  # seconds: an unreachable tracking server is one line, not a hang


def probe_server(uri: str, timeout: float = PROBE_TIMEOUT) -> None:
    """An HTTP tracking server must answer its /health endpoint within `timeout` seconds; any
    HTTP answer (even 401 behind a proxy) but 404 means it is there (404: a web server without
    MLflow behind it). Raises TrackingError otherwise."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError as e:
        if e.code == 404:  # a web server, but no MLflow behind it (MLflow serves /health)
            raise TrackingError(f"tracking URI {redact(uri)} answers but is not an MLflow tracking server "
                                f"(/health: HTTP 404); check --tracking-uri") from None
        return
    except Exception as e:
        reason = getattr(e, "reason", e)
        raise TrackingError(f"tracking server {redact(uri)} does not answer within {timeout:g} s ({reason}); "
                            f"start it (optuna-run server) or check --tracking-uri") from None


# the stores MLflow's tracking client opens without plugins (a database, a server, Databricks)
TRACKING_SCHEMES = {"sqlite", "postgresql", "postgres", "mysql", "mssql", "http", "https", "databricks",
                    "databricks-uc", "uc"}


def check_tracking_uri(tracking_uri: str) -> None:
    """Raise TrackingError for a URI naming MLflow's file store (a folder, ``file://...``), which
    MLflow 3 refuses with a traceback: the message says what to use instead (a SQLite file)."""
    uri = str(tracking_uri)
    if uri.startswith("file:") or ("://" not in uri and not uri.startswith(("sqlite:", "databricks"))):
        folder = uri[len("file://"):] if uri.startswith("file://") else uri.removeprefix("file:")
        raise TrackingError(f"tracking URI {uri}: MLflow 3 no longer opens a folder (its file store); use a SQLite "
                            f"file, e.g. --tracking-uri sqlite:///{Path(folder or '.').resolve() / 'mlflow.db'}")
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme not in TRACKING_SCHEMES:
        raise TrackingError(f"tracking URI {redact(uri)}: unknown scheme {scheme!r}; use sqlite:///PATH/mlflow.db, "
                            f"postgresql://..., mysql://... or an http(s):// tracking server")


def require_store(tracking_uri: str) -> None:
    """Raise TrackingError when `tracking_uri` is a SQLite store whose file does not exist (a
    command that only reads checks this before any slow step, and never creates the file)."""
    from .stores import missing_sqlite

    if db := missing_sqlite(tracking_uri):
        raise TrackingError(f"no tracking store {db}: nothing was logged there; run a study with this store first "
                            f"(optuna-run SPACE), or name another with --tracking-uri")


class Tracker:
    """One MLflow tracking store.

    Args:
        tracking_uri: a SQLite URI, a database URL or an ``http(s)://`` server (default:
            `default_tracking_uri`).
        create: make a SQLite store that does not exist yet (the launcher and the log importer,
            which write the first runs, do). Without it a missing SQLite file is an error, so a
            command that only reads (runs, promote, predict, ...) in the wrong folder says so
            instead of leaving an empty store behind.

    Raises:
        TrackingError: the store cannot be opened, or (without `create`) its SQLite file does not exist.
    """

    def __init__(self, tracking_uri: str | None = None, create: bool = False):
        from .stores import creation_lock, normalize_db_url

        tracking_uri = normalize_db_url(tracking_uri or default_tracking_uri())
        self.uri = tracking_uri
        check_tracking_uri(tracking_uri)
        if not create:
            require_store(tracking_uri)
        self._monitors: dict = {}
        if tracking_uri.startswith(("sqlite:", "postgresql")):
            # a database store is created (migrated) when the client is made: once, under a lock
            # every launcher sees, or two creating it at once crash
            try:
                with creation_lock(tracking_uri, "mlflow"):
                    self.client = _client(tracking_uri)
                    _retry(self.client.search_experiments, max_results=1)
            except UserError:
                raise
            except Exception as e:
                first = redact(str(e).strip().splitlines()[0] if str(e).strip() else "")
                raise TrackingError(f"tracking store {redact(tracking_uri)} cannot be opened: "
                                    f"{type(e).__name__}: {first[:300]}") from None
        else:  # a server: probed by the launcher before any trial (probe_server); clients retry
            self.client = _client(tracking_uri)

    # ---- set-up, done once by the launcher ----
    def ensure_experiment(self, name: str) -> str:
        """The id of experiment `name`: restored if it was deleted, created if missing (artifacts under
        `default_artifact_location` for a SQLite store, the server's default otherwise; tagged as a
        model-training experiment). A launcher that loses a creation race takes the winner's id."""
        exp = _retry(self.client.get_experiment_by_name, name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                _retry(self.client.restore_experiment, exp.experiment_id)
            return exp.experiment_id
        location = default_artifact_location() if self.uri.startswith("sqlite:") else None
        try:
            # a model-training experiment: the MLflow UI opens it on its runs, not the GenAI overview
            return _retry(self.client.create_experiment, name, artifact_location=location,
                          tags={"mlflow.experimentKind": "custom_model_development"})
        except Exception:
            exp = self.client.get_experiment_by_name(name)  # another launcher won the race
            if exp is None:
                raise
            return exp.experiment_id

    def start_run(self, experiment_id: str, name: str, tags: dict[str, Any] | None = None,
                  parent_run_id: str | None = None) -> str:
        """Create a live run (started now) named `name` in the experiment and return its id; with
        `parent_run_id` it is that run's child (MLflow's ``mlflow.parentRunId`` tag). Tags are redacted."""
        tags = dict(tags or {})
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        return self.create_run(experiment_id, name, tags)

    # ---- logging ----
    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        """Tag a run: values as strings, credentials redacted, cut to 5,000 characters, sent 100 tags
        per store call."""
        from mlflow.entities import RunTag

        items = [RunTag(k, redact(str(v))[:5000]) for k, v in tags.items()]
        for i in range(0, len(items), 100):
            _retry(self.client.log_batch, run_id, tags=items[i:i + 100])

    def log_batch(self, run_id: str, params: dict | None = None, tags: dict | None = None,
                  metrics: dict[str, float] | None = None, step: int = 0) -> None:
        """Params, tags and metrics in as few store transactions as MLflow allows.

        A param longer than MLflow's limit (`PARAM_LIMIT`, 6,000 characters) is logged cut, and
        the run's tag `PARAMS_CUT` lists the keys so cut: such a run's whole config is its
        ``config.yaml`` artifact (`query.run_config` reads it)."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        values = {k: redact(str(v)) for k, v in (params or {}).items()}
        cut = sorted(k for k, v in values.items() if len(v) > PARAM_LIMIT)
        if cut:
            tags = {**(tags or {}), PARAMS_CUT: ",".join(cut)}
        p = [Param(k, v[:PARAM_LIMIT]) for k, v in values.items()]
        t = [RunTag(k, redact(str(v))[:5000]) for k, v in (tags or {}).items()]
        m = [Metric(k, float(v), now, step) for k, v in (metrics or {}).items() if v is not None]
        first = True
        while first or p or t or m:  # MLflow takes at most 100 params, 100 tags, 1000 metrics a batch
            _retry(self.client.log_batch, run_id, params=p[:100], tags=t[:100], metrics=m[:1000])
            p, t, m, first = p[100:], t[100:], m[1000:], False

    def log_artifacts(self, run_id: str, folder: str | Path, artifact_path: str | None = None) -> None:
        """Upload the files under `folder` into the run's artifacts (under `artifact_path`, or at the
        root); an empty folder uploads nothing. Raises FileNotFoundError when `folder` does not exist."""
        if any(Path(folder).iterdir()):
            _retry(self.client.log_artifacts, run_id, str(folder), artifact_path)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        """Log metrics at `step` (timestamped now); None values are left out."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        _retry(self.client.log_batch, run_id, metrics=items)

    def start_system_metrics(self, run_id: str, interval: float = 5.0) -> None:
        """MLflow's own system metrics (``system/cpu_utilization_percentage``,
        ``system/gpu_0_utilization_percentage``, memory, disk, network) for the run, sampled every
        `interval` seconds (``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` overrides) until `end_run`.
        GPU figures need nvidia-ml-py and a GPU; NVML numbers the machine's GPUs (the run's `device`
        tag says which one it used)."""
        import logging

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop lines
        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, tracking_uri=self.uri)
        monitor.start()
        self._monitors[run_id] = monitor

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """Close a run with `status` (``FINISHED``, ``FAILED``, ``KILLED``), first stopping its system
        metrics monitor (`start_system_metrics`) and logging the samples it still holds."""
        monitor = self._monitors.pop(run_id, None)
        if monitor is not None:  # its last samples go in while the run is still open
            monitor.finish()
            # samples taken since the last logging step (all of them, in a run shorter than one
            # interval) are logged too, so every run has its system metrics
            with contextlib.suppress(Exception):
                last = monitor.aggregate_metrics()
                if last:
                    monitor.publish_metrics(last)
                    monitor.mlflow_logger.flush()
        self.terminate(run_id, status)

    def fail_run(self, run_id: str, reason: str, status: str = "FAILED") -> None:
        """End a run that did not finish: its `error` tag says why (cut to MLflow's 5,000
        characters, credentials redacted), then it ends with `status` (FAILED, or KILLED for an
        interrupted one). The one way every module closes a failed run."""
        self.set_tags(run_id, {"error": reason})
        self.end_run(run_id, status)

    # ---- reading ----
    def get_run(self, run_id: str):
        """The run, or a TrackingError naming the id when this store has none by that id."""
        from mlflow.exceptions import MlflowException

        try:
            return _retry(self.client.get_run, run_id)
        except MlflowException as e:
            if getattr(e, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise TrackingError(f"no run {run_id!r} in {redact(self.uri)} "
                                    f"(`optuna-run runs SPACE` lists the run ids)") from None
            raise

    def get_experiment(self, name: str):
        """The experiment of that name, or None."""
        return _retry(self.client.get_experiment_by_name, name)

    def experiment_names(self) -> list[str]:
        """The names of the store's active (not deleted) experiments: MLflow's first page, at most 1,000."""
        return list(self.experiment_ids())

    def experiment_ids(self) -> dict[str, str]:
        """Name -> id of the store's active experiments (MLflow's first page, at most 1,000)."""
        return {e.name: e.experiment_id for e in _retry(self.client.search_experiments)}

    def set_experiment_tag(self, experiment_id: str, key: str, value: str) -> None:
        """Set one tag on an experiment (the runs-table view of `runs_view` is kept this way)."""
        _retry(self.client.set_experiment_tag, experiment_id, key, value)

    def search_runs(self, experiment_ids: list[str], filter_string: str = "", order_by: list[str] | None = None,
                    max_results: int = 50000) -> list:
        """MLflow's search: the filter, sort and limit run in the store."""
        return _retry(self.client.search_runs, experiment_ids, filter_string, order_by=order_by,
                      max_results=max_results)

    def list_artifacts(self, run_id: str, path: str | None = None) -> list[str]:
        """Paths of a run's artifacts directly under `path` (the run's artifact root when None); not
        recursive, folders listed as entries."""
        return [a.path for a in _retry(self.client.list_artifacts, run_id, path)]

    def download(self, run_id: str, path: str, dst: str | Path) -> Path:
        """Download a run's artifact `path` (a file or a folder) into the folder `dst`; returns its local path."""
        return Path(_retry(self.client.download_artifacts, run_id, path, str(dst)))

    def create_run(self, experiment_id: str, name: str, tags: dict[str, Any], start_time: int | None = None) -> str:
        """A run with a given start time (an imported entry's date); `start_run` for live runs."""
        tags = {k: redact(str(v)) for k, v in tags.items()}
        return _retry(self.client.create_run, experiment_id, start_time=start_time, tags=tags, run_name=name).info.run_id

    def terminate(self, run_id: str, status: str, end_time: int | None = None) -> None:
        """Set a run's final `status` and end time (ms since the epoch; None: now), without touching its
        system metrics monitor (`end_run` stops it)."""
        _retry(self.client.set_terminated, run_id, status, end_time)

    def delete_run(self, run_id: str) -> None:
        """Delete a run the MLflow way: it is marked deleted (restorable) until ``mlflow gc`` removes it."""
        _retry(self.client.delete_run, run_id)

    def download_uri(self, artifact_uri: str, dst: str | Path) -> Path:
        """An artifact by its URI (``runs:/...``, ``models:/...``, a model version's source) into `dst`."""
        import mlflow.artifacts

        return Path(_retry(mlflow.artifacts.download_artifacts, artifact_uri=artifact_uri, dst_path=str(dst),
                           tracking_uri=self.uri))

    def load_model(self, model_uri: str):
        """A logged pyfunc model (``models:/NAME@ALIAS``) from this store's registry."""
        import mlflow
        import mlflow.pyfunc

        mlflow.set_tracking_uri(self.uri)  # pyfunc resolves models:/ URIs through the global store
        return _retry(mlflow.pyfunc.load_model, model_uri)

    # ---- the model registry ----
    def registered_model_exists(self, name: str) -> bool:
        """Whether the model registry holds a model named `name` (any MLflow error reads as no)."""
        from mlflow.exceptions import MlflowException

        try:
            _retry(self.client.get_registered_model, name)
            return True
        except MlflowException:
            return False

    def create_registered_model(self, name: str, description: str) -> None:
        """Create the registered model `name` with its description. MLflow raises when it exists already."""
        _retry(self.client.create_registered_model, name, description=description)

    def model_versions(self, prefix: str, name: str | None = None) -> list:
        """Every version of the registered model `name`, or of every model named `prefix...`."""
        if name:
            names = [name] if self.registered_model_exists(name) else []
        else:
            names = [m.name for m in _retry(self.client.search_registered_models, max_results=1000)
                     if m.name.startswith(prefix)]
        out = []
        for n in names:
            out += _retry(self.client.search_model_versions, f"name='{n}'")
        return out

    def create_model_version(self, name: str, source: str, run_id: str, tags: dict[str, str], description: str):
        """A new version of the registered model `name`, made from the artifacts at `source` (a URI) and
        linked to `run_id`; returns MLflow's ``ModelVersion``."""
        return _retry(self.client.create_model_version, name, source=source, run_id=run_id, tags=tags,
                      description=description)

    def model_version(self, name: str, ref: str):
        """The version `ref` (a number, or an alias) of the registered model `name`; None when the model,
        that version or that alias does not exist (any MLflow error reads as absent)."""
        from mlflow.exceptions import MlflowException

        try:
            if ref.isdigit():
                return _retry(self.client.get_model_version, name, ref)
            return _retry(self.client.get_model_version_by_alias, name, ref)
        except MlflowException:
            return None

    def set_model_alias(self, name: str, alias: str, version: str) -> None:
        """Point the alias `alias` of registered model `name` at `version` (moved there if it pointed elsewhere)."""
        _retry(self.client.set_registered_model_alias, name, alias, version)


VIEW_KEY = "spinesweep"  # the runs-table view every study experiment carries
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"  # where the MLflow UI (3.15+) keeps a shared view


def runs_view(params: list[str], direction: str = "minimize") -> dict:
    """The MLflow UI's runs-table state for a study: its trials listed flat (not folded under the
    invocation's parent run), best score first, with the score and every sampled parameter as
    columns. Stored as an experiment tag, opened by `view_url`."""
    columns = ["metrics.`score`", *(f"params.`{k}`" for k in params), "metrics.`prior_score`", "tags.`worker`"]
    return {"searchFilter": "tags.trial != ''", "orderByKey": "metrics.`score`",
            "orderByAsc": direction == "minimize", "startTime": "ALL", "lifecycleFilter": "Active",
            "datasetsFilter": [], "modelVersionFilter": "All Runs", "selectedColumns": columns,
            "columnOrder": columns}


def view_url(ui_url: str, experiment_id: str) -> str:
    """The MLflow UI address (served at `ui_url`) of an experiment's runs table opened on the study's
    shared view (`runs_view`, kept under the key `VIEW_KEY`)."""
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}"


class MlflowCurves:
    """A `fit` callback: per-epoch metrics into a run, at a global step (``offset + epoch``);
    with several folds in one run, each metric also under ``fold<k>_``. An epoch's validation score
    is the curve ``val_score``: the name ``score`` holds one value only, the run's own (a trial's
    final score, the value Optuna keeps for a pruned trial, a promoted fold's score), so MLflow's
    latest ``score`` means the same in the UI, in filters, in `runs` and in Optuna."""

    __name__ = "mlflow_curves"

    def __init__(self, tracker: Tracker, run_id: str, offset: int = 0, fold: int = 0, n_folds: int = 1):
        self.tracker, self.run_id, self.offset, self.fold, self.n_folds = tracker, run_id, offset, fold, n_folds

    def __call__(self, epoch: int, metrics: dict) -> None:
        m = {("val_score" if k == "score" else k): v for k, v in metrics.items() if k != "epoch"}
        if self.n_folds > 1:
            m.update({f"fold{self.fold}_{k}": v for k, v in list(m.items())})
        self.tracker.log_metrics(self.run_id, m, step=self.offset + epoch)


def package_versions() -> dict[str, str]:
    """The installed versions of the packages a run records (spinesweep, torch, timm, optuna, mlflow...);
    a package that is not installed is left out."""
    import importlib.metadata as md

    out = {}
    for name in ("spinesweep", "torch", "torchvision", "timm", "optuna", "mlflow", "albumentations", "dicomsdl",
                 "pydicom", "pandas", "scikit-learn"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def git_commit(repo: Path | None = None) -> str:
    """The commit checked out in `repo` (default: the checkout holding this module), with ``-dirty``
    appended when tracked files have changes; ``"unknown"`` outside a git repository or without git."""
    import subprocess

    repo = repo or Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"

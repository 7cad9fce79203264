"""Every command of the README's command table, with its documented arguments, through the real
`optuna-run` entry point on a phantom it builds itself: each exits 0 and prints something (servers:
they answer, then stop when told). A row added to the table without a run here fails the test, and
so does a registered command the table does not name: no command can break unseen."""
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
OPTUNA_RUN = [str(BIN / "optuna-run")] if (BIN / "optuna-run").exists() else [sys.executable, "-m", "spinesweep"]

LOG = """# 9.30

- **exp001**
    - use resnet10t
    - lr 3e-3
    - add augment
        - Noise
            - var_limit 10 to 50
    - [RESULT] fold0 CV: 0.52, LB:

- **exp002**
    - based: exp001
    - lr 1e-3
    - [RESULT] fold0 CV: 0.50, LB: 0.55
"""


def table_commands() -> set[str]:
    """The commands the README's command table names: `optuna-run COMMAND` (`data check`, `runs
    legacy` and the study's `SPACE` with their second word), other programs by name; rows of
    flags (indented) belong to the study command."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("## Commands"):text.index("`tests/test_readme_commands.py` runs")]
    out = set()
    for row in re.findall(r"^\| `([^`]+)`", table, flags=re.M):
        if row[0].isspace():
            continue
        words = row.split()
        if words[0] != "optuna-run":
            out.add(Path(words[0]).name)
        elif words[1] in ("data",) or words[1:3] == ["runs", "legacy"]:
            out.add(" ".join(words[1:3]))
        else:
            out.add(words[1])
    return out


def installed(args, cwd, timeout=600):
    """`optuna-run ARGS` through the installed console script, in a process of its own."""
    proc = subprocess.run(OPTUNA_RUN + args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, SPINESWEEP_PROGRESS="0"))
    assert proc.returncode == 0, f"optuna-run {' '.join(args)}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip(), f"optuna-run {' '.join(args)} printed nothing"
    return proc.stdout


def in_process(capsys):
    """`optuna-run ARGS` through the same parser and handlers (`spinesweep.cli.main`) in this
    process: what the console script runs, without paying torch's import once per command."""
    from spinesweep.cli import main

    def run(args, cwd=None):
        code = main(args)
        out, err = capsys.readouterr()
        assert code == 0, f"optuna-run {' '.join(args)}: exit {code}\n{err[-3000:]}"
        assert out.strip(), f"optuna-run {' '.join(args)} printed nothing"
        return out
    return run


def serve(cmd, cwd, port, path="/health"):
    """Start a server, wait until http://127.0.0.1:PORT/PATH answers, stop it with SIGTERM."""
    proc = subprocess.Popen(cmd, cwd=cwd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2).close()
                break
            except OSError:
                assert time.time() < deadline, f"{cmd} did not answer on port {port}"
                time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert out.strip()
        return out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_the_table_names_every_registered_command():
    from spinesweep.cli import COMMANDS

    names = {"study" if n == "SPACE" else n.split()[0] for n in table_commands()}  # the bare SPACE is `study`
    assert names >= set(COMMANDS), set(COMMANDS) - names


@pytest.mark.slow
def test_every_command_of_the_readme_table_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPINESWEEP_PROGRESS", "0")
    run = in_process(capsys)
    data = tmp_path / "phantom"
    done = {}
    done["--version"] = installed(["--version"], tmp_path)  # the console script itself
    done["make-phantom"] = run(["make-phantom", str(data), "--studies", "8", "--test-studies", "2", "--seed", "3",
                                "--jobs", "2"], tmp_path)
    assert "phantom dataset (small)" in done["make-phantom"]
    done["data check"] = run(["data", "check", "--data", str(data), "--jobs", "2", "--cache-budget", "2GB", "--json"],
                             tmp_path)
    assert json.loads(done["data check"])["failures"] == {}
    fast = ["model.backbone=test_efficientnet", "model.pretrained=false", "optim.epochs=1", "data.img_size=32"]
    done["train"] = run(["train", "--config", str(ROOT / "configs" / "phantom_scs.yaml"), "--data", str(data), *fast,
                         "--json"], tmp_path)
    assert json.loads(done["train"])["score"] > 0
    done["SPACE"] = run(["demo", "--n-trials", "2", "--smoke", "--data", str(data)], tmp_path)
    trials = json.loads(run(["runs", "demo-smoke", "--top", "2", "--json"], tmp_path))
    done["runs"] = trials
    done["reproduce"] = run(["reproduce", trials[0]["run_id"], "--data", str(data)], tmp_path)
    done["dashboard"] = run(["dashboard", "demo-smoke", "--out", str(tmp_path / "d.html")], tmp_path)
    (tmp_path / "log.md").write_text(LOG)
    done["import-log"] = run(["import-log", str(tmp_path / "log.md"), "--enqueue", "demo"], tmp_path)
    done["runs legacy"] = run(["runs", "legacy", "--top", "1", "--lineage", "exp002"], tmp_path)
    done["promote"] = run(["promote", "demo-smoke", "--folds", "all"], tmp_path)
    done["ensemble"] = run(["ensemble", "--name", "default", "--weights", "equal"], tmp_path)
    done["predict"] = run(["predict", "--data", str(data), "--ensemble", "default", "--localizer", "prior", "--out",
                           str(tmp_path / "submission.csv")], tmp_path)
    done["localize"] = run(["localize", "--data", str(data), "--split", "test", "--model", "prior", "--out",
                            str(tmp_path / "points.csv")], tmp_path)
    done["data audit"] = run(["data", "audit", "--data", str(data), "--out", str(tmp_path / "audit.csv")], tmp_path)
    assert "submission" in done["predict"] and (tmp_path / "submission.csv").exists()
    port = free_port()
    done["ui"] = serve(OPTUNA_RUN + ["ui", "--port", str(port), "--host", "127.0.0.1"], tmp_path, port)
    port = free_port()
    done["server"] = serve(OPTUNA_RUN + ["server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                                         "--artifacts-destination", str(tmp_path / "artifacts"), "--port", str(port),
                                         "--workers", "1"], tmp_path, port)
    port = free_port()
    done["optuna-dashboard"] = serve([str(BIN / "optuna-dashboard"), "sqlite:///studies.db", "--port", str(port)],
                                     tmp_path, port, path="/")
    assert set(done) == table_commands(), set(table_commands()) ^ set(done)

"""The command line's shape, as Optuna's: every command registered by name, the bare space name as
the `study` command's alias (so no space may be named like a command), handlers that a test calls
directly, `--json` on every command, shared flags only from the shared parents, and argument
errors in one line."""
from __future__ import annotations

import argparse
import json

import pytest

from spinesweep import cli
from spinesweep.cli import COMMANDS, PARENTS, build_parser, main, parse
from sweep.space import available_spaces


def _command_parsers() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_no_search_space_is_named_like_a_command():
    clash = set(available_spaces()) & set(COMMANDS)
    assert not clash, f"optuna-run {sorted(clash)[0]} would run the command, not the space"


def test_every_command_is_registered_with_json_and_its_shared_flags_from_the_parents():
    parsers = _command_parsers()
    assert set(parsers) == set(COMMANDS) >= {"study", "runs", "promote", "ensemble", "predict", "make-phantom",
                                              "data", "train", "reproduce", "dashboard", "import-log", "ui",
                                              "server"}
    shared = {f"--{k.replace('_', '-')}" for k in PARENTS if k != "json"} | {"--tracking-uri"}
    for name, p in parsers.items():
        flags = {s for a in p._actions for s in a.option_strings}
        assert "--json" in flags, name
        # a shared flag appears only where the command names its parent (promote's --data, which has
        # no default there, is the one documented exception)
        for parent in PARENTS:
            declared = {s for a in PARENTS[parent]._actions for s in a.option_strings}
            if declared & flags and parent not in COMMANDS[name].parents and parent != "json":
                assert name == "promote" and declared == {"--data"}, (name, parent)
    assert shared  # the parents exist


def test_a_bare_space_name_is_the_study_command():
    a = parse(["demo", "--n-trials", "3", "--smoke"])
    b = parse(["study", "demo", "--n-trials", "3", "--smoke"])
    assert vars(a) == vars(b) and a.func is cli.study


@pytest.mark.parametrize("argv,message", [
    (["demo", "--n-trials", "x"], "optuna-run: error: study: argument --n-trials: expected a whole number, got 'x'"),
    (["runs", "demo", "--top", "0"], "optuna-run: error: runs: argument --top: must be positive (got 0)"),
    (["make-phantom", "d", "--studies", "-3"], "optuna-run: error: make-phantom: argument --studies: must be positive"),
    (["make-phantom", "d", "--test-studies", "-1"], "optuna-run: error: make-phantom: argument --test-studies: must be 0 or more (got -1)"),
    (["make-phantom", "d", "--seed", "-2"], "optuna-run: error: make-phantom: argument --seed: must be 0 or more (got -2)"),
    (["promote"], "optuna-run: error: promote: the following arguments are required: space"),
])
def test_argument_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_handlers_are_plain_functions_a_test_calls(quick_copy, capsys):
    assert cli.runs(parse(["runs", "quick", "--json"])) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["trial"] for r in rows] == [3, 0, 1, 2]


def test_json_output_of_a_command_that_prints_a_table_by_default(quick_copy, capsys):
    assert main(["dashboard", "quick", "--json", "--out", "d.html"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["path"].endswith("d.html") and "history" in out["figures"]


def test_flags_before_the_space_still_mean_the_study_command():
    assert vars(parse(["--smoke", "demo", "--n-trials", "2"])) == vars(parse(["study", "demo", "--smoke",
                                                                              "--n-trials", "2"]))
    # a flag's value that is also a command's name is still a value
    for argv in (["--smoke", "demo", "--study-name", "runs"], ["--data", "data", "demo"], ["--study-name=train", "demo"]):
        args = parse(argv)
        assert (args.command, args.space) == ("study", "demo"), argv


def test_with_json_stdout_holds_the_result_alone(capsys, monkeypatch):
    """Whatever a command prints while it works (progress, notes) goes to stderr under --json, so
    stdout parses: checked on a command registered for this test only."""
    def chatty(args):
        print("working ...")
        return cli.emit(args, {"answer": 42}, lambda: print("the answer is 42"))

    monkeypatch.setitem(COMMANDS, "chatty", cli.Command("chatty", "prints while it works", (), None, chatty))
    assert main(["chatty", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"answer": 42} and "working ..." in err
    assert main(["chatty"]) == 0
    assert capsys.readouterr().out == "working ...\nthe answer is 42\n"


def test_json_may_come_before_the_command_and_version_has_json_too(quick_copy, capsys):
    assert main(["--json", "runs", "quick"]) == 0
    assert [r["trial"] for r in json.loads(capsys.readouterr().out)] == [3, 0, 1, 2]
    for argv in (["--version", "--json"], ["--json", "--version"]):
        assert main(argv) == 0
        v = json.loads(capsys.readouterr().out)
        assert v["spinesweep"] == "0.1.0" and v["python"].startswith("3.") and "torch" in v and "optuna" in v


@pytest.mark.parametrize("argv", [["runs", "demo"], ["ensemble"], ["reproduce", "0123abcd"], ["promote", "demo"],
                                  ["dashboard", "demo"], ["predict"], ["ui"], ["localize", "--out", "points.csv"],
                                  ["localize", "--out", "points.csv", "--model", "runs:/0123abcd"]])
def test_a_command_that_reads_says_its_store_is_missing_and_creates_nothing(argv, workdir, capsys):
    """In a folder where no study ran, a command that only reads names the missing store in one
    line, leaves no empty store behind, and builds no data first (predict and localize would build
    the phantom)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("no tracking store" in err or "the storage" in err), err
    assert str(workdir) in err  # the file it looked for, absolute
    assert list(workdir.iterdir()) == []


@pytest.mark.parametrize("argv", [["runs", "quick"], ["ensemble"], ["reproduce", "0123abcd"], ["promote", "quick"],
                                  ["dashboard", "quick"], ["predict"], ["localize", "--out", "points.csv"]])
def test_a_tracking_server_that_does_not_answer_is_one_line_in_seconds(argv, quick_copy, capsys):
    """MLflow's client retries a refused connection for minutes; every command asks the server once
    first (port 9 refuses at once)."""
    import time

    started = time.monotonic()
    assert main([*argv, "--tracking-uri", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tracking server http://127.0.0.1:9 does not answer" in err, err
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("argv", [["runs", "demo"], ["demo", "--smoke", "--n-trials", "1"], ["ui"],
                                  ["localize", "--out", "points.csv"]])
@pytest.mark.parametrize("uri", ["file:///tmp/spinesweep-no-such-store", "/tmp/spinesweep-no-such-store"])
def test_a_file_store_uri_is_one_line_that_says_what_to_use(argv, uri, workdir, capsys):
    """MLflow 3 refuses its file store with a traceback; every command says to use a SQLite file,
    before any data is built."""
    assert main([*argv, "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sqlite:////tmp/spinesweep-no-such-store/mlflow.db" in err, err
    assert list(workdir.iterdir()) == []


def test_checks_that_need_no_data_come_before_the_data_is_built(quick_copy, capsys):
    """A wrong ensemble name or search space is said before the phantom is built (seconds) or a
    store is created."""
    assert main(["predict", "--ensemble", "nosuch"]) == 2
    assert "ensemble 'nosuch' has no members" in capsys.readouterr().err
    assert not (quick_copy / "data").exists()
    empty = quick_copy / "empty"
    empty.mkdir()
    log = empty.parent / "log.md"
    log.write_text("exp001 resnet18 lr 1e-3 -> 0.5\n")
    import os

    os.chdir(empty)
    assert main(["import-log", str(log), "--enqueue", "nosuch"]) == 2
    assert "unknown search space 'nosuch'" in capsys.readouterr().err
    assert list(empty.iterdir()) == []


def test_an_unknown_scheme_or_a_web_server_that_is_not_mlflow_is_one_line(workdir, capsys):
    import http.server
    import threading

    assert main(["runs", "demo", "--tracking-uri", "bogus://x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown scheme 'bogus'" in err, err
    class NotMlflow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # a web server that has no /health: 404 for everything
            self.send_error(404)

        def log_message(self, *args):  # its access log is not the command's output
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotMlflow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        for argv in (["runs", "demo"], ["demo", "--smoke", "--n-trials", "1"]):
            assert main([*argv, "--tracking-uri", uri]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "is not an MLflow tracking server" in err, err
    finally:
        server.shutdown()
    assert list(workdir.iterdir()) == []

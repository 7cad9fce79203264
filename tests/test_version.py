from spinesweep.cli import main


def test_version_names_the_project_and_its_stack(capsys):
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("spinesweep 0.1.0 (git ") and "python 3." in out
    for lib in ("torch", "timm", "optuna", "mlflow", "dicomsdl"):
        assert f"  {lib} " in out, lib

"""The live per-worker progress: a bar per trial on a terminal, nothing per epoch otherwise."""
import io

from sweep.progress import TrialProgress, enabled


def test_a_trial_bar_shows_epoch_score_best_and_eta(monkeypatch, capsys):
    monkeypatch.setenv("SPINESWEEP_PROGRESS", "1")
    p = TrialProgress("[cpu1] trial 7", total_epochs=6, position=1)
    fold0, fold1 = p.at(0), p.at(3)
    for epoch, score in ((1, 0.9), (2, 0.7), (3, 0.8)):
        fold0(epoch, {"score": score, "val_loss": 1.0})
    fold1(1, {"score": 0.75})
    err = capsys.readouterr().err
    p.close()
    assert "[cpu1] trial 7" in err and "4/6" in err and "val 0.7500, best 0.7000" in err
    assert "<" in err  # elapsed<remaining


def test_quiet_when_the_output_is_not_a_terminal(monkeypatch, capsys):
    monkeypatch.delenv("SPINESWEEP_PROGRESS", raising=False)
    assert not enabled(io.StringIO())
    p = TrialProgress("[cpu0] trial 1", total_epochs=3)
    p.at(0)(1, {"score": 0.5})
    p.close()
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("SPINESWEEP_PROGRESS", "0")
    assert not enabled()

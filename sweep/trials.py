"""Questions about a study's trials that several modules ask: which were imported from the manual
log, which is the best, and the study without the imported ones (for Optuna's own figures)."""
from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState


def is_legacy(trial) -> bool:
    """A trial imported from the manual log (`optuna-run import-log --enqueue`), not run here."""
    return trial.user_attrs.get("source") == "legacy"


def own_trials(study: optuna.Study, states: tuple[TrialState, ...] | None = None) -> list[FrozenTrial]:
    """The trials run by spinesweep (not imported), optionally only those in `states`."""
    return [t for t in study.get_trials(deepcopy=False, states=states) if not is_legacy(t)]


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The best completed trial run here (imported ones left out), by the study's direction: the
    one definition of "best" that the study summary, the progress lines, `promote`, `runs` and
    the dashboard share. None when no trial of its own has completed."""
    done = [t for t in own_trials(study, (TrialState.COMPLETE,)) if t.value is not None]
    if not done:
        return None
    pick = min if study.direction == optuna.study.StudyDirection.MINIMIZE else max
    return pick(done, key=lambda t: t.value)


def best_imported(study: optuna.Study) -> FrozenTrial | None:
    """The best trial imported from the manual log (a warm start), shown as such beside the
    study's own best; None without imported trials."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if is_legacy(t) and t.value is not None]
    if not done:
        return None
    pick = min if study.direction == optuna.study.StudyDirection.MINIMIZE else max
    return pick(done, key=lambda t: t.value)


def without_legacy(study: optuna.Study) -> optuna.Study:
    """An in-memory copy of the study holding only its own trials: what `optuna.visualization`
    draws (imported trials have other parameters and real-data scores)."""
    copy = optuna.create_study(study_name=study.study_name, direction=study.direction)
    copy.add_trials(own_trials(study))
    return copy

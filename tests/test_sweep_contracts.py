"""The contracts `sweep/` relies on, each against real Optuna: the pruning reporter, the exact trial
quota across processes, pinned keys never sampled, and every sampler and pruner a space can name
running a short study of a cheap objective the way a trial reports."""
from __future__ import annotations

import multiprocessing as mp

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from sweep.objective import Reporter
from sweep.space import PRUNERS, SAMPLERS, SMOKE, Settings, load_space
from sweep.quota import TrialQuota
from sweep.storage import make_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


def test_the_reporter_reports_the_best_so_far_and_never_prunes_at_the_last_step():
    study = optuna.create_study(pruner=AlwaysPrune())
    trial = study.ask()
    last = Reporter(trial, offset=2, last_step=3, direction="minimize")  # the third and last epoch of the trial
    assert last(1, {"score": 0.9}) is False and last.pruned_at is None  # step 3: stopping saves nothing
    early = Reporter(study.ask(), offset=0, last_step=3, direction="minimize")
    assert early(1, {"score": 0.9}) is True and early.pruned_at == 1

    study = optuna.create_study(pruner=optuna.pruners.NopPruner())
    trial = study.ask()
    r = Reporter(trial, offset=0, last_step=10, direction="minimize")
    for epoch, s in enumerate([0.8, 0.6, 0.7, 0.5, 0.9], 1):
        assert r(epoch, {"score": s}) is False
    study.tell(trial, 0.5)
    assert study.trials[0].intermediate_values == {1: 0.8, 2: 0.6, 3: 0.6, 4: 0.5, 5: 0.5}
    up = Reporter(study.ask(), offset=0, last_step=10, direction="maximize")
    up(1, {"score": 0.2}), up(2, {"score": 0.1})
    assert up.best == 0.2


def _take_trials(url: str, name: str, n: int, out) -> None:
    """A worker's use of the quota, through the production code (`TrialQuota.ask`, the one call
    `loop.worker_loop` makes), with an instant objective."""
    storage = make_storage(url)
    study = optuna.load_study(study_name=name, storage=storage)
    quota = TrialQuota(url, name, n)
    ran = 0
    while (trial := quota.ask(study, storage)) is not None:
        study.tell(trial, float(trial.number))
        ran += 1
    out.put(ran)


def test_the_quota_is_exact_with_four_processes_asking_at_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    optuna.create_study(study_name="q", storage=make_storage(url))
    out = mp.get_context("fork").Queue()
    procs = [mp.get_context("fork").Process(target=_take_trials, args=(url, "q", 13, out)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    assert sum(out.get(timeout=5) for _ in procs) == 13
    assert len(optuna.load_study(study_name="q", storage=url).trials) == 13


def test_the_quota_counts_neither_replaced_nor_imported_nor_interrupted_trials(tmp_path):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    study = optuna.create_study(study_name="c", storage=make_storage(url))
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    study.add_trial(create_trial(value=1.0, params={"x": 0.1}, distributions=dist))  # 0: counts
    study.add_trial(create_trial(state=TrialState.FAIL, params={"x": 0.2}, distributions=dist))  # 1: retried below
    study.add_trial(create_trial(value=1.0, params={"x": 0.2}, distributions=dist,
                                 system_attrs={"failed_trial": 1}))  # 2: the retry, counts in 1's place
    study.add_trial(create_trial(value=0.1, params={"x": 0.3}, distributions=dist,
                                 user_attrs={"source": "legacy"}))  # 3: imported
    study.add_trial(create_trial(state=TrialState.FAIL, params={"x": 0.4}, distributions=dist,
                                 user_attrs={"interrupted": True}))  # 4: Ctrl-C, enqueued again
    study.enqueue_trial({"x": 0.4})  # 5: waiting, counts
    quota = TrialQuota(url, "c", 3)
    used, waiting = quota.used(study)
    assert (used, waiting) == (3, 1)
    trials = study.get_trials(deepcopy=False)
    assert not quota.full(trials)  # 3 counted, but one of them waits: it is run
    assert TrialQuota(url, "c", 4).full(trials) is False
    study.tell(quota.ask(study), 0.5)  # the waiting trial (5) is the one asked for
    assert quota.full(study.get_trials(deepcopy=False)) and quota.ask(study) is None


SPACE = """\
direction: minimize
fixed:
  optim.epochs: 4
params:
  optim.lr: {{type: float, low: 1.0e-4, high: 1.0e-2, log: true}}
  model.dropout: {{type: float, low: 0.0, high: 0.5}}
  model.head: {{type: categorical, choices: [linear, attention, lstm]}}
  model.rnn_hidden: {{type: int, low: 16, high: 64, step: 16, when: {{model.head: [lstm]}}}}
sampler: {{name: {sampler}, seed: 0}}
pruner: {{name: {pruner}{pruner_args}}}
folds: [0, 1, 2]
"""


PRUNER_ARGS = {"percentile": ", percentile: 25.0"}  # its one required argument


def _space(tmp_path, sampler="random", pruner="none"):
    path = tmp_path / f"{sampler}-{pruner}.yaml"
    path.write_text(SPACE.format(sampler=sampler, pruner=pruner, pruner_args=PRUNER_ARGS.get(pruner, "")))
    return load_space(str(path))


def test_pinned_and_smoke_capped_keys_are_never_sampled(tmp_path):
    space = _space(tmp_path)
    settings = Settings(smoke=True, pinned={"optim.lr": "0.003", "model.head": "lstm"})
    never = settings.never_sampled(space)
    assert {"optim.lr", "model.head"} | set(SMOKE) <= never
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(10):
        trial = study.ask()
        base = space.config(settings)
        cfg = space.config(settings, space.suggest(trial, base, never=never))
        assert "optim.lr" not in trial.params and "model.head" not in trial.params
        assert "model.rnn_hidden" not in trial.params  # a smoke cap: pinned too
        assert cfg.optim.lr == 0.003 and cfg.model.head == "lstm" and cfg.optim.epochs == SMOKE["optim.epochs"]
        assert trial.params.keys() == {"model.dropout"}
        study.tell(trial, 0.0)


def test_the_config_builder_applies_its_layers_in_the_stated_order(tmp_path):
    space = _space(tmp_path)
    sampled = {"optim.lr": 0.002, "optim.epochs": 7}
    assert space.config(Settings(), sampled).optim.epochs == 7  # sampled over fixed
    assert space.config(Settings(smoke=True), sampled).optim.epochs == 1  # smoke caps over sampled
    s = Settings(smoke=True, pinned={"optim.epochs": "3", "device": "cpu"}, device="cuda", data_dir="/d")
    cfg = space.config(s, sampled)
    assert cfg.optim.epochs == 3 and cfg.device == "cpu" and cfg.data.data_dir == "/d"  # --set over all
    assert space.config(Settings(device="cuda")).device == "cuda"


def _objective(space):
    """What a trial does, minus training: sample, report the best score so far every epoch of every
    fold (one value per fold for a fold-wise pruner), stop when pruned."""
    def run(trial):
        cfg = space.config(Settings(), space.suggest(trial, space.config()))
        score = (cfg.optim.lr * 100 - 0.3) ** 2 + cfg.model.dropout
        epochs = cfg.optim.epochs
        for i, fold in enumerate(space.folds):
            fold_score = score + 0.01 * fold
            if space.fold_wise:
                trial.report(fold_score, fold)
                if trial.should_prune():
                    raise optuna.TrialPruned()
                continue
            r = Reporter(trial, i * epochs, len(space.folds) * epochs, space.direction)
            for epoch in range(1, epochs + 1):
                if r(epoch, {"score": fold_score + 1.0 / epoch}):
                    raise optuna.TrialPruned()
        return score
    return run


@pytest.mark.parametrize("pruner", sorted(PRUNERS))
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_and_pruner_runs_a_study(tmp_path, sampler, pruner):
    space = _space(tmp_path, sampler, pruner)
    study = optuna.create_study(direction=space.direction, sampler=space.make_sampler(), pruner=space.make_pruner())
    import warnings

    with warnings.catch_warnings():  # CMA-ES and QMC fall back to independent sampling for categorical params
        warnings.simplefilter("ignore")
        study.optimize(_objective(space), n_trials=12)
    states = {t.state for t in study.trials}
    assert len(study.trials) == 12 and states <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert TrialState.COMPLETE in states
    for t in study.trials:
        assert ("model.rnn_hidden" in t.params) == (t.params["model.head"] == "lstm")
        assert 1e-4 <= t.params["optim.lr"] <= 1e-2
        if t.state == TrialState.PRUNED and not space.fold_wise:
            assert max(t.intermediate_values) < len(space.folds) * 4  # never at the last step

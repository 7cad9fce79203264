"""The manual exp001-exp190 log: the parser on excerpts of the real file (its odd cases included),
the mapping onto TrainConfig keys, the MLflow import (idempotent, queryable) and the warm start."""
import textwrap
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient

from spinesweep.cli import DEFAULT_LOG, main
from sweep.legacy.importer import entry_metrics, import_log
from sweep.legacy.mapping import map_entry, new_value, resolve
from sweep.legacy.parse import LogFormatError, parse_log, parse_result
from trainer.config import TrainConfig


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "log.md"
    p.write_text(textwrap.dedent(text).lstrip("\n"))
    return p



# ------------------------------------------------------------------ parser, on excerpts of the real file

EXCERPT_EARLY = """
# 8.8

- prioritize training first as there is a lot GPU quota left

- **exp001**
    - [RESULT] fold0 CV: 0.5168, LB:
    - result from 3rd epoch and it start to overfitting from 4th epoch
        - maybe augmentation can help

- **exp002**
    - change crop to ratio of 0.2 instead of absoluate value 64x64
    - [RESULT] fold0 CV: 0.5166, LB:
    - still overfitting at late epoch
    - [KEEP]

- **exp004**
    - change lr 3-e3 to 1e-3
    - [RESULT] fold0 CV: 0.5189, LB:
    - very unstable
    - [KEEP]

# 8.9

- **exp010**
    - based: exp002
    - change epoch from 5 to 3 and warm up from 0.1 to 0.375 (warmup only till the first epoch)
    - [RESULT] fold0 CV: , LB:

- **exp025**
    - based: exp004
    - use tf_efficientnet_b5.ns_jft_in1k
    - epoch 5
    - no warmup
- lr 3e-3
    - [RESULT] fold0 CV: 0.5116, LB:

- **exp026**
    - based: exp025
    - exp017 but 4 fold
    - [RESULT] fold0 CV: 0.4986, LB:
    - [RESULT] fold1 CV: 0.5240, LB:
    - [RESULT] fold2 CV: 0.5380, LB:
    - [RESULT] fold3 CV: 0.5118, LB:

- task for tmr
    - look into each plane for each symptom
"""


def test_sections_entries_results_notes_and_keep(tmp_path):
    entries = parse_log(write(tmp_path, EXCERPT_EARLY))
    assert [e.name for e in entries] == ["exp001", "exp002", "exp004", "exp010", "exp025", "exp026"]
    e1, e2, e4, e10, e25, e26 = entries
    assert (e1.date, e10.date) == ("2024-08-08", "2024-08-09")
    assert e1.settings == [] and e1.notes == ["result from 3rd epoch and it start to overfitting from 4th epoch",
                                              "maybe augmentation can help"]
    assert e2.keep == "yes" and e2.notes == ["still overfitting at late epoch"]
    assert entry_metrics(e1) == {"cv_fold0": 0.5168, "score": 0.5168}
    assert e10.based_on == "exp002" and entry_metrics(e10) == {}  # "fold0 CV: , LB:" states nothing
    assert [r.fold for r in e26.results] == [0, 1, 2, 3]
    assert entry_metrics(e26)["cv_fold3"] == 0.5118
    # the task list after the last entry is not part of it
    assert e26.end_lineno < len((tmp_path / "log.md").read_text().splitlines())


def test_a_setting_that_lost_its_indentation_stays_in_its_entry(tmp_path):
    e25 = parse_log(write(tmp_path, EXCERPT_EARLY))[4]
    assert [s.text for s in e25.settings] == ["use tf_efficientnet_b5.ns_jft_in1k", "epoch 5", "no warmup", "lr 3e-3"]
    assert entry_metrics(e25)["cv_fold0"] == 0.5116


def test_inheritance_typos_and_changes_as_new_values(tmp_path):
    resolved = {r.entry.name: r for r in resolve(parse_log(write(tmp_path, EXCERPT_EARLY)))}
    assert resolved["exp002"].params["data.window_ratio"] == 0.2
    assert resolved["exp004"].params["optim.lr"] == 1e-3  # "3-e3 to 1e-3"
    assert resolved["exp004"].inherits_from == "exp002" and resolved["exp004"].implicit_base
    r10 = resolved["exp010"]
    assert (r10.params["optim.epochs"], r10.params["optim.warmup_ratio"]) == (3, 0.375)
    assert r10.params["data.window_ratio"] == 0.2 and "optim.lr" not in r10.params  # based on exp002
    r25 = resolved["exp025"]
    assert r25.params["model.backbone"] == "tf_efficientnet_b5.ns_jft_in1k"
    assert (r25.params["optim.lr"], r25.params["optim.warmup_ratio"], r25.params["optim.epochs"]) == (3e-3, 0.0, 5)
    assert resolved["exp026"].own.folds_evaluated == 4


@pytest.mark.parametrize("text,value", [
    ("3-e3", "3e-3"), ("0.2 instead of absoluate value 64x64", "0.2"), ("from 5 to 3", "3"),
    ("reduced to 0.1 from 0.2", "0.1"), ("0.12 to 0.15", "0.15"), ("10", "10"), ("none", None),
])
def test_new_value(text, value):
    assert new_value(text) == value


EXCERPT_LATE = """
# 8.29

- **exp098**
    - based: exp097
        - 4 folds
    - use tf_efficientnetv2_s.in21k_ft_in1k
    - epoch 10
    - *save based on both loss*
    - [RESULT] 4 folds oof (valid loss) CV: 0.4444, LB: 0.44
        - fold0 VL: 0.3417, CV: 0.4313
        - fold1 VL: 0.3588, CV: 0.4291
    - [RESULT] 4 folds oof (log loss)   CV: 0.4413, LB: 0.45
        - fold0 VL: 0.3570, CV: 0.4187 *diif here*
    - colab creadit
        - start: 91.92

# 9.8

- **exp118**
    - based: exp098
    - lr 4e-4
    - use 5 head separately for each symptom
        - each head recieve extracted features from LSTM head
        - *added Attention*
        - logits is now modified to have dropout
    - 25 slices
        - each 11 from sagittal t1 and t2
        - 3 axial t2
            - use coords as center when crop
            - window ratio size 0.35
    - add augment
        - RandomBrightnessContrast
        - Blur
        - CroarseDropout (Cutout)
        - *MixUp*
    - [RESULT] fold0 CV: 0.4143, LB: 0.45 (better than exp114_f0)
        - valid_loss: 0.3340
    - [RESULT-RE] fold0 CV: 0.4091, LB: 0.47
        - valid_loss: 0.3372
    - [KEEP?]

- **exp120**
    - based: exp118
    - [RESULT] fold0 CV: 0.4166, LB: (LL)
    - [RESULT] fold0 CV: 0.4246, LB: (VL)

- **exp100**
    - based: exp098
    - [RESULT] fold0 CV: 0.4322, LB: 0.46S (picked valid loss)

# 9.23

- **exp164**
    - based: exp118
    - [RESULT] 4 folds CV: 0.44082, LB: 0.45

- **exp164**
    - based: exp118
    - add augment
        - randombrightnesscontrast
        - croarsedropout (cutout)
    - [result] 4 folds cv: 0.44082, lb: 0.45

- **exp144-2**
    - based: exp164
    - *using datset v7*
    - [RESULT] folds0 CV: 0.4087, LB:
"""


def test_result_forms(tmp_path):
    entries = {e.name: e for e in parse_log(write(tmp_path, EXCERPT_LATE))}
    m98 = entry_metrics(entries["exp098"])
    assert m98["cv_oof"] == 0.4444 and m98["cv_oof_vl"] == 0.4444 and m98["cv_oof_ll"] == 0.4413
    assert m98["lb"] == 0.44 and m98["lb_ll"] == 0.45
    assert m98["cv_fold0"] == 0.4313 and m98["cv_fold0_ll"] == 0.4187 and m98["valid_loss_fold1"] == 0.3588
    assert entries["exp098"].notes == ["colab creadit", "start: 91.92"]
    m118 = entry_metrics(entries["exp118"])
    assert (m118["cv_fold0"], m118["cv_fold0_re1"], m118["lb_re1"]) == (0.4143, 0.4091, 0.47)
    assert (m118["valid_loss"], m118["valid_loss_re1"]) == (0.334, 0.3372)
    assert entries["exp118"].keep == "maybe"
    assert entries["exp118"].results[0].note == "(better than exp114_f0)"
    m120 = entry_metrics(entries["exp120"])
    assert (m120["cv_fold0"], m120["cv_fold0_ll"], m120["cv_fold0_vl"]) == (0.4166, 0.4166, 0.4246)
    m100 = entry_metrics(entries["exp100"])
    assert m100["lb"] == 0.46 and entries["exp100"].results[0].selection == "vl"
    assert entry_metrics(entries["exp144-2"])["cv_fold0"] == 0.4087  # "folds0"


def test_repeated_numbers_are_kept_apart_and_lower_case_results_parse(tmp_path):
    entries = parse_log(write(tmp_path, EXCERPT_LATE))
    names = [e.name for e in entries]
    assert names == ["exp098", "exp118", "exp120", "exp100", "exp164", "exp164-2", "exp144-2"]
    assert entry_metrics(entries[5])["cv_oof"] == 0.44082
    resolved = {r.entry.name: r for r in resolve(entries)}
    # `based: exp164` means the latest exp164 before it
    assert resolved["exp144-2"].inherits_from == "exp164-2"
    assert resolved["exp144-2"].own.dataset_version == "v7"


def test_mapping_of_blocks(tmp_path):
    resolved = {r.entry.name: r for r in resolve(parse_log(write(tmp_path, EXCERPT_LATE)))}
    r118 = resolved["exp118"]
    p = r118.params
    assert p["model.head"] == "lstm_attention" and p["model.backbone"] == "tf_efficientnetv2_s.in21k_ft_in1k"
    assert (p["data.sag_t2_slices"], p["data.axial_slices"], p["data.axial_window_ratio"]) == (11, 3, 0.35)
    assert p["augment.ops"] == [{"name": "RandomBrightnessContrast"}, {"name": "Blur"}, {"name": "CoarseDropout"}]
    assert "augment: MixUp" in r118.own.unmapped  # kept verbatim, never dropped
    assert "head: logits is now modified to have dropout" in r118.own.unmapped
    assert resolved["exp098"].own.folds_evaluated == 4
    assert resolved["exp164-2"].params["augment.ops"] == [{"name": "RandomBrightnessContrast"},
                                                          {"name": "CoarseDropout"}]
    assert "added Attention" in resolved["exp118"].entry.changed
    for r in resolved.values():  # every mapped value is a valid TrainConfig
        TrainConfig().with_overrides(r.params)


def test_not_a_log(tmp_path):
    with pytest.raises(LogFormatError, match="no experiment entries"):
        parse_log(write(tmp_path, "# 8.8\n- just notes\n"))


def test_parse_result_keeps_odd_suffixes():
    r = parse_result("fold0 re1 CV: 0.4110, LB: 0.47", 1)
    assert (r.fold, r.rerun, r.cv, r.lb) == (0, 1, 0.411, 0.47)
    r = parse_result("4 fold oof CV: 0.4514, LB:", 1)
    assert (r.scope, r.n_folds, r.cv, r.lb) == ("oof", 4, 0.4514, None)


# ------------------------------------------------------------------ the whole real log


def test_the_real_log():
    entries = parse_log(DEFAULT_LOG)
    names = [e.name for e in entries]
    assert len(names) == len(set(names)) == 189
    assert {"exp164-2", "exp178-2", "exp144-2"} <= set(names)
    numbers = {e.number for e in entries}
    assert numbers == set(range(1, 191)) - {152, 157, 183, 186}  # the numbers the log skips
    fold0 = [(entry_metrics(e)["cv_fold0"], e.name) for e in entries if "cv_fold0" in entry_metrics(e)]
    assert min(fold0) == (0.3986, "exp127")
    assert all(e.date for e in entries)
    resolved = resolve(entries)
    for r in resolved:
        TrainConfig().with_overrides(r.params)
    assert sum(bool(map_entry(e).unmapped) for e in entries) > 100  # kept, never dropped


# ------------------------------------------------------------------ MLflow and Optuna


@pytest.mark.slow
def test_import_is_idempotent_and_queryable(stores, capsys):
    assert main(["import-log"]) == 0
    out = capsys.readouterr().out
    assert "189 entries" in out and "189 runs created" in out
    assert main(["import-log"]) == 0
    assert "0 runs created, 0 updated, 189 unchanged" in capsys.readouterr().out

    mlflow.set_tracking_uri(f"sqlite:///{stores / 'mlruns' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["legacy"], order_by=["metrics.cv_fold0 ASC"], max_results=1000)
    assert len(runs) == 189
    best = runs.iloc[0]
    assert best["tags.mlflow.runName"] == "exp127" and best["metrics.cv_fold0"] == 0.3986
    assert best["tags.date"] == "2024-09-11" and best["metrics.lb"] == 0.46
    assert best["params.model.head"] == "lstm_attention" and best["params.amp"] == "false"
    client = MlflowClient(f"sqlite:///{stores / 'mlruns' / 'mlflow.db'}")
    run = client.get_run(best["run_id"])
    assert "full precision training" in run.data.tags["mlflow.note.content"]
    assert run.data.tags["source.lines"] == "3641-3669" and run.data.tags["based_on"] == "exp118"

    assert main(["runs", "legacy", "--top", "1", "--json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)[0]["entry"] == "exp127"
    assert main(["runs", "legacy", "--lineage", "exp127", "--json"]) == 0
    chain = [r["entry"] for r in json.loads(capsys.readouterr().out)]
    assert chain[:4] == ["exp127", "exp118", "exp114", "exp110"] and chain[-1] == "exp001"
    assert main(["runs", "legacy", "--json", "--where",
                 "params.`model.backbone` = 'tf_efficientnet_b3.ns_jft_in1k'"]) == 0
    b3 = json.loads(capsys.readouterr().out)
    assert {r["model.backbone"] for r in b3} == {"tf_efficientnet_b3.ns_jft_in1k"} and len(b3) >= 5


SPACE = """
# a test space the manual log's later entries fall into
direction: minimize
fixed: {}
params:
  optim.lr: {type: float, low: 1.0e-5, high: 1.0e-2, log: true}
  model.head: {type: categorical, choices: [multihead, lstm, gru, lstm_attention]}
  data.window_ratio: {type: float, low: 0.1, high: 0.2}
sampler: {name: tpe, seed: 0, n_startup_trials: 2}
pruner: {name: none}
folds: [0]
n_trials: 2
"""


@pytest.mark.slow
def test_warm_start_puts_legacy_trials_before_the_first_sampled_one(stores, phantom_dir, capsys):
    space = stores / "warm.yaml"
    space.write_text(SPACE)
    summary, resolved = import_log(DEFAULT_LOG)
    from sweep.legacy.importer import enqueue

    q = enqueue(resolved, str(space), run_ids=summary.run_ids)
    assert len(q.added) > 100 and "exp127" in q.added and q.outside
    again = enqueue(resolved, str(space))
    assert again.added == [] and len(again.already) == len(q.added)
    s = optuna.load_study(study_name="warm", storage="sqlite:///studies.db")
    assert s.best_trial.user_attrs["legacy_entry"] == "exp127" and s.best_value == 0.3986
    assert s.best_trial.user_attrs["mlflow_run_id"] == summary.run_ids["exp127"]
    # the study then runs its N sampled trials on top, without --resume
    assert main([str(space), "--smoke", "--study-name", "warm", "--n-trials", "2", "--data", str(phantom_dir)]) == 0
    trials = optuna.load_study(study_name="warm", storage="sqlite:///studies.db").trials
    legacy = [t.number for t in trials if t.user_attrs.get("source") == "legacy"]
    sampled = [t.number for t in trials if t.user_attrs.get("source") != "legacy"]
    assert len(legacy) == len(q.added) and len(sampled) == 2 and max(legacy) < min(sampled)
    assert f"{len(q.added)} legacy" in capsys.readouterr().out


def test_a_log_that_is_not_utf8_is_one_line(tmp_path, capsys):
    from spinesweep.cli import main

    bad = tmp_path / "log.txt"
    bad.write_bytes(b"exp001 \xff\xfe resnet\n")
    assert main(["import-log", str(bad)]) == 2
    assert "log.txt: cannot read the log ('utf-8' codec can't decode" in capsys.readouterr().err


EXCERPT_V1_ARGUMENTS = """
# 9.30

- **exp140**
    - add augment
        - Noise
            - var_limit 0.1 to 0.2
        - CroarseDropout (Cutout)
            - *increase cutout size ratio 0.2 from 0.1 and reduce number of box to 2 instead 4*
        - Blur
            - *adjust gaussnoise range from 5,9 to 0.0,0.1*
        - Distortion
            - shift_limit 0.05
    - [RESULT] fold0 CV: 0.4249, LB:
"""


def test_albumentations_1x_settings_become_albumentations_2_arguments(tmp_path):
    """The log was written against albumentations 1.x: a setting whose meaning carries over is an
    argument the installed albumentations takes (so the run does what the log says), the rest
    stays verbatim."""
    from trainer.augment import build_augment
    from trainer.config import TrainConfig

    (r,) = resolve(parse_log(write(tmp_path, EXCERPT_V1_ARGUMENTS)))
    ops = {op["name"]: op for op in r.params["augment.ops"]}
    assert ops["GaussNoise"]["std_range"] == pytest.approx([0.1 ** 0.5 / 255, 0.2 ** 0.5 / 255], abs=1e-6)
    assert ops["CoarseDropout"] == {"name": "CoarseDropout", "num_holes_range": [2, 2],
                                    "hole_height_range": [0.2, 0.2], "hole_width_range": [0.2, 0.2]}
    assert ops["Blur"] == {"name": "Blur"} and ops["OpticalDistortion"] == {"name": "OpticalDistortion"}
    assert "augment Blur: adjust gaussnoise range from 5,9 to 0.0,0.1" in r.own.unmapped
    assert "augment Distortion: shift_limit 0.05" in r.own.unmapped  # removed in albumentations 2
    assert not any("var_limit" in u or "cutout size" in u for u in r.own.unmapped)
    assert build_augment(TrainConfig().with_overrides({"augment.ops": r.params["augment.ops"]}).augment) is not None

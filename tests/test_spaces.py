
import optuna
import pytest

from sweep.space import SPACES_DIR, SpaceError, available_spaces, load_space

ALL = sorted(SPACES_DIR.rglob("*.yaml"))


def test_every_space_file_is_collected():
    # recursive, and the count is pinned so a file that is not picked up fails here
    assert len(ALL) == 7
    assert {p.stem for p in ALL} == {"demo", "scs_heads", "nfn_backbones", "slices_windows", "augment", "full",
                                     "localizer"}
    assert available_spaces() == sorted(p.stem for p in ALL)


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.stem)
def test_every_space_validates_and_documents_its_command(path):
    space = load_space(str(path))
    assert space.params and space.description
    header = path.read_text().splitlines()[:4]
    assert any(f"optuna-run {path.stem}" in line for line in header if line.startswith("#"))
    space.make_sampler(), space.make_pruner()
    # every parameter can be sampled into a valid config
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    base = space.config()
    for _ in range(5):
        trial = study.ask()
        base.with_overrides(space.suggest(trial, base))
        study.tell(trial, 0.0)


def test_conditional_parameters_only_for_recurrent_heads():
    space = load_space("scs_heads")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        out = space.suggest(trial, space.config())
        recurrent = out["model.head"] in ("lstm", "gru", "lstm_attention")
        assert ("model.rnn_hidden" in out) == recurrent
        seen.add(recurrent)
        study.tell(trial, 0.0)
    assert seen == {True, False}


def test_per_op_probabilities_set_the_fixed_ops():
    space = load_space("augment")
    trial = optuna.create_study().ask()
    out = space.suggest(trial, space.config())
    ops = {op["name"]: op["p"] for op in out["augment.ops"]}
    assert ops["Blur"] == trial.params["augment.ops.Blur.p"]
    assert "augment.ops.Blur.p" not in out


def write(tmp_path, text) -> str:
    p = tmp_path / "s.yaml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("text,message", [
    ("params: {optim.lr: {type: float, low: 0.1, high: 0.01}}", r"params.optim.lr: low 0.1 > high 0.01"),
    ("params: {optim.lr: {type: float, low: 0, high: 0.01, log: true}}", "log scale needs low > 0"),
    ("params: {model.backbone: {type: categorical, choices: [resnet18, resnet1800]}}",
     "params.model.backbone: unknown timm backbone 'resnet1800'"),
    ("params: {model.head: {type: categorical, choices: [lstm, lstn]}}", "unknown head 'lstn'; did you mean lstm"),
    ("params: {optim.lrr: {type: float, low: 0.1, high: 1}}", "optim.lrr: unknown config key; did you mean lr"),
    ("fixed: {optim.epochs: many}", "fixed: optim.epochs: expected an integer"),
    ("params: {model.rnn_hidden: {type: int, low: 8, high: 16, when: {model.hed: [lstm]}}}",
     "'model.hed' is neither a fixed value nor an earlier parameter"),
    ("sampler: {name: bayes}", "sampler.name: unknown sampler 'bayes'"),
    ("pruner: {name: median, warmup: 3}", "median takes no argument"),
    ("folds: [0, 7]", r"folds: must be a non-empty list of folds in \[0, 4\)"),
    ("params: {augment.ops.Blur.p: {type: float, low: 0, high: 1}}", "op 'Blur' is not in the fixed augment.ops"),
    ("optim: [1,", "invalid YAML"),
    ("paramz: {}", r"unknown key\(s\) \['paramz'\]"),
    ("", "the file is empty"),
    ("fixed: {optim.lr: 0.001}\nparams: {optim.lr: {type: float, low: 0.1, high: 1}}",
     "params.optim.lr: is also in `fixed`"),
    ("params: {model.head: {type: categorical, choices: [linear, lstm]},\n"
     "         model.rnn_hidden: {type: int, low: 16, high: 64, when: {model.head: [gru]}}}",
     r"model.head value\(s\) \['gru'\] are not among its choices \['linear', 'lstm'\]"),
    ("fixed: {model.head: linear}\nparams: {model.rnn_hidden: {type: int, low: 16, high: 64, when: {model.head: [lstm]}}}",
     "model.head is fixed to 'linear', so this parameter would never be sampled"),
    ("params: {model.rnn_hidden: {type: int, low: 16, high: 64, step: 0.5}}", "step must be an integer for an int parameter"),
])
def test_bad_spaces_fail_naming_file_and_key(tmp_path, text, message):
    with pytest.raises(SpaceError, match=message) as e:
        load_space(write(tmp_path, text))
    assert "s.yaml" in str(e.value)


def test_a_binary_space_file_is_one_line(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe" + bytes(range(256)))
    with pytest.raises(SpaceError, match=r"s\.yaml: not a text file \(YAML is UTF-8 text\)"):
        load_space(str(p))


def test_unknown_space_lists_the_available_ones():
    with pytest.raises(SpaceError, match=r"unknown search space 'scs_head'; did you mean scs_heads.*available: augment, demo"):
        load_space("scs_head")


@pytest.mark.parametrize("pin,message", [
    ("model.backbone=resnet10t.no_such_tag", "model.backbone: unknown pretrained tag 'no_such_tag'"),
    ("augment.ops=[{name: GaussNoise, var_limit: [10, 50]}]",
     r"augment.ops\[0\] \(GaussNoise\): argument 'var_limit' .* replaced it with std_range"),
    ("augment.ops=[{name: CoarseDropout, max_holes: 8, max_height: 16, max_width: 16}]",
     r"argument 'max_holes' .* num_holes_range"),
])
def test_a_study_refuses_an_unbuildable_set_value_before_any_trial(tmp_path, monkeypatch, capsys, pin, message):
    import re

    from spinesweep.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--smoke", "--data", str(tmp_path), "--set", pin]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "studies.db").exists()  # refused before any store or trial


def test_a_space_with_an_unbuildable_fixed_value_fails_on_load(tmp_path):
    with pytest.raises(SpaceError, match=r"s.yaml: fixed: model.backbone: unknown pretrained tag"):
        load_space(write(tmp_path, "fixed: {model.backbone: resnet10t.nope}"))
    with pytest.raises(SpaceError, match=r"fixed: augment.ops\[0\] \(Blur\): argument 'always_apply'"):
        load_space(write(tmp_path, "fixed: {augment.ops: [{name: Blur, always_apply: true}]}"))


@pytest.mark.parametrize("arg,hint", [("var_limit", "replaced it with std_range"), ("noise_scale_factor", None)])
def test_sampling_an_op_argument_other_than_p_is_refused_in_one_line(tmp_path, arg, hint):
    from sweep.space import SpaceError, load_space

    path = tmp_path / "ops.yaml"
    path.write_text("direction: minimize\nfixed:\n  augment.ops: [{name: GaussNoise, p: 0.5}]\nparams:\n"
                    f"  augment.ops.GaussNoise.{arg}: {{type: float, low: 0.1, high: 0.5}}\n")
    with pytest.raises(SpaceError) as e:
        load_space(str(path))
    assert "only an op's probability can be sampled (augment.ops.<Op>.p)" in str(e.value)
    assert (hint in str(e.value)) if hint else "did you mean" not in str(e.value)

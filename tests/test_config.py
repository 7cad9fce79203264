import pytest

from trainer.config import ConfigError, TrainConfig


def test_yaml_round_trip(tmp_path):
    cfg = TrainConfig().with_overrides({"optim.lr": 3e-4, "model.head": "gru", "data.conditions": ["spinal_canal_stenosis"],
                                        "augment.ops": [{"name": "Blur", "p": 0.3}], "model.pretrained": "auto"})
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert TrainConfig.from_yaml(path) == cfg


def test_flat_round_trip_from_strings_alone():
    cfg = TrainConfig().with_overrides({"optim.class_weights": [1, 3, 9], "data.planes": ["sag_t2"], "amp": False,
                                        "optim.ema": 0.99, "augment.ops": [{"name": "GaussNoise", "p": 0.2}]})
    flat = cfg.to_flat()
    assert all(isinstance(v, str) for v in flat.values())
    assert flat["optim.lr"] == "0.001" and flat["amp"] == "false" and flat["data.planes"] == '["sag_t2"]'
    assert TrainConfig.from_flat(flat) == cfg
    import dataclasses

    def leaves(cls, prefix=""):
        for f in dataclasses.fields(cls):
            t = f.default_factory if f.default_factory is not dataclasses.MISSING else None
            if t is not None and dataclasses.is_dataclass(t):
                yield from leaves(t, prefix + f.name + ".")
            else:
                yield prefix + f.name

    assert set(flat) == set(leaves(TrainConfig))  # every leaf field appears, nothing else


def test_unknown_keys_fail_naming_the_key():
    with pytest.raises(ConfigError, match=r"optim\.lrr: unknown config key; did you mean lr"):
        TrainConfig.from_dict({"optim": {"lrr": 1}})
    with pytest.raises(ConfigError, match=r"modle: unknown config key; did you mean model"):
        TrainConfig().with_overrides({"modle.head": "gru"})
    with pytest.raises(ConfigError, match=r"data\.conditions: spinal_stenosis: unknown condition"):
        TrainConfig.from_dict({"data": {"conditions": ["spinal_stenosis"]}})


@pytest.mark.parametrize("key,value,message", [
    ("optim.lr", "fast", "optim.lr: expected a number"),
    ("optim.epochs", 2.5, "optim.epochs: expected an integer"),
    ("amp", "maybe", "amp: expected true/false"),
    ("model.pooling", "mean", r"model.pooling: 'mean' is not one of \['avg', 'max', 'gem'\]"),
    ("optim.class_weights", [1, 2], "optim.class_weights: expected 3 values"),
    ("data.window_ratio", 1.5, r"data.window_ratio: must be in \(0, 1\]"),
    ("data.fold", 4, r"data.fold: must be in \[0, n_folds=4\)"),
    ("model.pretrained", "sometimes", "model.pretrained: 'sometimes' matches none of"),
])
def test_wrong_types_and_values_fail_naming_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig().with_overrides({key: value})


def test_configs_are_immutable():
    base = TrainConfig()
    changed = base.with_overrides({"optim.lr": "0.5"})
    assert base.optim.lr == 1e-3 and changed.optim.lr == 0.5
    with pytest.raises(Exception):
        base.optim.lr = 2.0  # frozen


def test_planes_follow_conditions():
    cfg = TrainConfig().with_overrides({"data.conditions": ["left_subarticular_stenosis", "spinal_canal_stenosis"]})
    assert cfg.data.used_planes() == ("sag_t2", "axial")
    assert TrainConfig().data.used_planes() == ("sag_t2", "sag_t1", "axial")


def test_invalid_yaml_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("optim: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        TrainConfig.from_yaml(p)
    p.write_text("optim:\n  lr: x\n")
    with pytest.raises(ConfigError, match="bad.yaml: optim.lr: expected a number"):
        TrainConfig.from_yaml(p)


@pytest.mark.parametrize("make,message", [
    (lambda p: None, "no such file"),
    (lambda p: p.mkdir(), "a folder, not a YAML file"),
    (lambda p: p.write_bytes(b"\x89PNG\r\n\xff\xfe" + bytes(range(256))), "not a text file"),
    (lambda p: p.write_text("optim: [1,\n  lr: 2\n"), "invalid YAML at line 3, column 1"),
])
def test_a_config_file_that_cannot_be_read_is_one_line_naming_it(tmp_path, make, message, capsys):
    from spinesweep.cli import main

    p = tmp_path / "cfg.yaml"
    make(p)
    with pytest.raises(ConfigError, match=message) as e:
        TrainConfig.from_yaml(p)
    assert str(e.value).startswith(f"{p}: ") and "\n" not in str(e.value)
    assert main(["train", "--config", str(p)]) == 2  # the command line: one line, no traceback
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err

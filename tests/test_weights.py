"""Pretrained weights found once, before the first trial (issue 22): a weights folder the user
names, the Hugging Face cache, or one attempt at the hub; a backbone without weights refused in
one line before any trial. The hub is never reached here: the refusals run offline or against a
closed loopback port, so they behave the same on a machine with internet."""
from __future__ import annotations

import socket
import time

import pytest
import timm
import torch

from trainer.config import TrainConfig
from trainer.models import PretrainedUnavailable, build_model
from trainer.models.weights import local_weights, resolve_weights

SPACE = """\
direction: minimize
fixed:
  data.conditions: [spinal_canal_stenosis]
  optim.epochs: 1
  model.pretrained: true
{weights}params:
  model.backbone: {{type: categorical, choices: [resnet10t, test_efficientnet]}}
  model.head: {{type: categorical, choices: [linear]}}
sampler: {{name: random, seed: 0}}
folds: [0]
n_trials: 1
"""


@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """An empty Hugging Face and torch hub cache, and a hub that refuses connections (a closed
    loopback port): what a machine without internet sees, at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


@pytest.fixture
def weights_dir(tmp_path):
    """A folder of weights files saved from timm models built without pretrained weights."""
    from safetensors.torch import save_file

    folder = tmp_path / "weights"
    folder.mkdir()
    for name in ("resnet10t", "test_efficientnet"):
        torch.manual_seed(3)
        save_file(timm.create_model(name, pretrained=False).state_dict(), folder / f"{name}.safetensors")
    return folder


def test_a_model_loads_its_weights_from_the_named_folder_without_the_network(weights_dir, no_hub):
    from safetensors.torch import load_file

    cfg = TrainConfig().with_overrides({"model.backbone": "resnet10t", "model.pretrained": True,
                                        "model.weights_dir": str(weights_dir), "model.head": "linear"})
    assert local_weights("resnet10t.c3_in1k", weights_dir) == weights_dir / "resnet10t.safetensors"
    model = build_model(cfg.model, n_slices=3, n_conditions=1)
    saved = load_file(weights_dir / "resnet10t.safetensors")
    assert model.pretrained_loaded
    assert torch.equal(model.backbone.state_dict()["layer1.0.conv1.weight"], saved["layer1.0.conv1.weight"])


def test_a_backbone_without_weights_is_refused_before_any_trial(no_hub, phantom_dir, quick_copy):
    """No weights anywhere and the hub refusing: one line naming both backbones and the ways to
    provide weights, within seconds (one attempt each, no retries), and no trial or run made."""
    from sweep.study import run_study

    path = quick_copy / "pre.yaml"
    path.write_text(SPACE.format(weights=""))
    t0 = time.perf_counter()
    with pytest.raises(PretrainedUnavailable) as e:
        run_study(str(path), data=str(phantom_dir), log=lambda line: None)
    message = str(e.value)
    assert time.perf_counter() - t0 < 10 and "\n" not in message
    assert "resnet10t, test_efficientnet cannot be had" in message and "unreachable" in message
    for way in ("model.weights_dir", "HF_HOME", "HF_HUB_OFFLINE=1", "--set model.pretrained=false"):
        assert way in message
    import optuna

    assert "pre" not in [s.study_name for s in optuna.get_all_study_summaries("sqlite:///studies.db")]


def test_offline_mode_with_an_empty_cache_is_refused_without_a_download(no_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedUnavailable, match="resnet10t: not cached, and HF_HUB_OFFLINE is set"):
        resolve_weights(["resnet10t"])


def test_a_study_with_a_weights_folder_resolves_every_backbone_and_runs(weights_dir, no_hub, phantom_dir,
                                                                        quick_copy):
    from fakes import quick_fit
    from sweep.study import run_study

    path = quick_copy / "pre.yaml"
    path.write_text(SPACE.format(weights=f"  model.weights_dir: {weights_dir}\n"))
    outcome = run_study(str(path), data=str(phantom_dir), log=lambda line: None, fit_fn=quick_fit)
    assert outcome.counts["COMPLETE"] == 1


@pytest.mark.parametrize("content", ["another architecture", "not a weights file"])
def test_a_weights_file_that_does_not_load_is_refused_before_any_trial(content, weights_dir, no_hub, phantom_dir,
                                                                       quick_copy):
    """A file that is there but does not fit (resnet18's weights under resnet10t's name, or text
    under a .safetensors name) is refused in one line naming it, not by every trial."""
    from safetensors.torch import save_file

    from sweep.study import run_study

    bad = weights_dir / "resnet10t.safetensors"
    if content == "another architecture":
        save_file(timm.create_model("resnet18", pretrained=False).state_dict(), bad)
    else:
        bad.write_text("these are not weights")
    path = quick_copy / "pre.yaml"
    path.write_text(SPACE.format(weights=f"  model.weights_dir: {weights_dir}\n"))
    with pytest.raises(PretrainedUnavailable) as e:
        run_study(str(path), data=str(phantom_dir), log=lambda line: None)
    message = str(e.value)
    assert "\n" not in message and "not loadable for backbone(s) resnet10t" in message and str(bad) in message
    import optuna

    assert "pre" not in [s.study_name for s in optuna.get_all_study_summaries("sqlite:///studies.db")]


def test_a_weights_folder_that_does_not_exist_is_named(no_hub, tmp_path):
    with pytest.raises(PretrainedUnavailable, match="no such folder"):
        resolve_weights(["resnet10t"], tmp_path / "nowhere")

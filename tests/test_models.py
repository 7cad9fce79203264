import pytest
import torch

from trainer.config import ModelConfig
from trainer.models import PretrainedUnavailable, build_model, check_backbone, head_names
from trainer.models.heads import register_head

BACKBONES = ["test_efficientnet", "test_convnext"]


def test_registry_holds_the_required_heads():
    assert {"linear", "multihead", "lstm", "gru", "attention", "lstm_attention"} <= set(head_names())


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("head", head_names())
def test_every_head_with_every_test_backbone_forward_backward(backbone, head):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, pretrained=False, head=head, rnn_hidden=16, rnn_layers=2,
                      attention_hidden=8, in_chans=3)
    model = build_model(cfg, n_slices=7, n_conditions=5)  # 7 slices: padded to 3 images of 3
    x = torch.randn(2, 7, 32, 32, requires_grad=False)
    logits = model(x)
    assert logits.shape == (2, 5, 3)
    logits.logsumexp(-1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("pooling", ["avg", "max", "gem"])
def test_pooling_options(pooling):
    model = build_model(ModelConfig(backbone="test_efficientnet", pretrained=False, head="linear", pooling=pooling),
                        n_slices=4, n_conditions=1)
    assert model(torch.randn(3, 4, 32, 32)).shape == (3, 1, 3)


def test_backbone_with_a_pre_logits_head():
    # MobileNetV3 emits head_hidden_size (1024), not num_features (576), with num_classes=0
    model = build_model(ModelConfig(backbone="mobilenetv3_small_050", pretrained=False, head="lstm", rnn_hidden=8),
                        n_slices=2, n_conditions=1)
    assert model(torch.randn(2, 2, 32, 32)).shape == (2, 1, 3)


def test_gem_on_a_token_backbone():
    model = build_model(ModelConfig(backbone="test_vit", pretrained=False, head="attention", pooling="gem"),
                        n_slices=2, n_conditions=2)
    assert model(torch.randn(1, 2, 32, 32)).shape == (1, 2, 3)


def test_unknown_names_fail_with_suggestions():
    with pytest.raises(ValueError, match="unknown timm backbone 'tf_efficientnet_b00'; did you mean tf_efficientnet_b0"):
        check_backbone("tf_efficientnet_b00")
    check_backbone("tf_efficientnet_b0.ns_jft_in1k")  # a pretrained tag is fine
    # a tag timm does not have fails here, not inside every trial's timm.create_model
    with pytest.raises(ValueError, match=r"unknown pretrained tag 'no_such_tag' of timm backbone 'resnet10t'; "
                                         r"did you mean resnet10t.c3_in1k\?"):
        check_backbone("resnet10t.no_such_tag")
    with pytest.raises(ValueError, match=r"unknown pretrained tag 'ns_jft_in1'.*did you mean tf_efficientnet_b0.ns_jft_in1k"):
        check_backbone("tf_efficientnet_b0.ns_jft_in1")
    with pytest.raises(ValueError, match="unknown head 'lstn'; did you mean lstm"):
        build_model(ModelConfig(backbone="test_efficientnet", head="lstn", pretrained=False), 3, 1)


def test_duplicate_head_registration_raises():
    with pytest.raises(ValueError, match="head 'lstm' is registered twice"):
        @register_head("lstm")
        class Again(torch.nn.Module):
            pass


def test_pretrained_unavailable_is_a_clear_error_or_a_recorded_fallback(monkeypatch):
    import huggingface_hub.constants

    # no weights can be had here; offline makes the hub refuse at once instead of retrying
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = ModelConfig(backbone="resnet10t", pretrained=True, head="linear")
    with pytest.raises(PretrainedUnavailable, match=r"pretrained weights for backbone\(s\) resnet10t cannot be had.*model.pretrained=false.*model.pretrained=auto"):
        build_model(cfg, 3, 1)
    with pytest.warns(UserWarning, match="using random init"):
        model = build_model(ModelConfig(backbone="resnet10t", pretrained="auto", head="linear"), 3, 1)
    assert model.pretrained_loaded is False

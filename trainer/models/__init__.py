"""The network: a timm backbone run over the slice stack, `in_chans` slices per image, features
``[B, T, F]`` into a head from the registry, logits ``[B, conditions, 3]``.

Backbones come from timm's own registry (`timm.create_model(..., num_classes=0, in_chans=k)`), sized
from `head_hidden_size` (= `num_features` unless the model has a pre-logits head); names are checked with `timm.is_model` before anything is built.
"""
from __future__ import annotations

import math
import warnings
from functools import lru_cache

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..errors import UserError, did_you_mean
from .heads import get_head, head_names

__all__ = ["SpineNet", "build_model", "check_backbone", "check_head", "create_backbone", "PretrainedUnavailable",
           "head_names"]


class PretrainedUnavailable(UserError):
    """Pretrained weights were asked for and cannot be had (no network, unknown tag...)."""


@lru_cache(maxsize=1)
def _all_models() -> tuple[str, ...]:
    return tuple(timm.list_models())


def check_backbone(name: str) -> None:
    """Raise ConfigError for a name timm does not know, with close matches."""
    if timm.is_model(name):
        return
    raise ConfigError(f"unknown timm backbone {name!r}{did_you_mean(name.split('.')[0], _all_models())}")


def check_head(name: str) -> None:
    try:
        get_head(name)
    except KeyError as e:
        raise ConfigError(e.args[0]) from None


class GeM(nn.Module):
    """Generalised mean pooling over H, W (or tokens), p learned."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(p))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = (2, 3) if x.ndim == 4 else (1,)
        return x.clamp_min(self.eps).pow(self.p).mean(dims).pow(1.0 / self.p)


def create_backbone(name: str, pretrained, **kwargs):
    """(timm model, pretrained_loaded). pretrained: True (fail clearly), False, or 'auto' (fall
    back); `kwargs` go to `timm.create_model` (num_classes=0 and a pool, or features_only)."""
    if pretrained is False:
        return timm.create_model(name, pretrained=False, **kwargs), False
    try:
        return timm.create_model(name, pretrained=True, **kwargs), True
    except Exception as e:  # download refused, no weights for this tag, hub unreachable...
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if pretrained == "auto":
            warnings.warn(f"pretrained weights for {name} unavailable ({reason}); using random init",
                          stacklevel=3)
            return timm.create_model(name, pretrained=False, **kwargs), False
        raise PretrainedUnavailable(
            f"pretrained weights for backbone {name!r} could not be loaded ({reason}). Set "
            f"model.pretrained=false to train from random init, or model.pretrained=auto to fall "
            f"back automatically (recorded on the run)") from e


class SpineNet(nn.Module):
    def __init__(self, model_cfg, n_slices: int, n_conditions: int):
        super().__init__()
        check_backbone(model_cfg.backbone)
        check_head(model_cfg.head)
        self.k = model_cfg.in_chans
        self.n_tokens = math.ceil(n_slices / self.k)
        self.pad = self.n_tokens * self.k - n_slices  # zero slices so the stack splits into images
        timm_pool = "" if model_cfg.pooling == "gem" else model_cfg.pooling
        self.backbone, self.pretrained_loaded = create_backbone(
            model_cfg.backbone, model_cfg.pretrained, num_classes=0, in_chans=self.k, global_pool=timm_pool)
        self.pool = GeM() if model_cfg.pooling == "gem" else nn.Identity()
        # what the backbone emits with num_classes=0: after its pre-logits head when it has one
        # (MobileNetV3: num_features 576, head_hidden_size 1024)
        self.n_features = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        self.head = get_head(model_cfg.head)(self.n_features, self.n_tokens, n_conditions, model_cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h, w = x.shape
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, 0, self.pad))
        feats = self.pool(self.backbone(x.reshape(b * self.n_tokens, self.k, h, w)))
        return self.head(feats.reshape(b, self.n_tokens, -1))


def build_model(model_cfg, n_slices: int, n_conditions: int) -> SpineNet:
    return SpineNet(model_cfg, n_slices, n_conditions)

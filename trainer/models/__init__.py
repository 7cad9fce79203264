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
from ..errors import did_you_mean
from .heads import get_head, head_names
from .weights import PretrainedUnavailable, resolve_weights

__all__ = ["SpineNet", "build_model", "check_backbone", "check_head", "create_backbone", "PretrainedUnavailable",
           "head_names"]


@lru_cache(maxsize=1)
def _all_models() -> tuple[str, ...]:
    return tuple(timm.list_models())


@lru_cache(maxsize=256)  # a name timm accepted stays accepted; a refused one raises, and is not cached
def check_backbone(name: str) -> None:
    """Raise ConfigError, with close matches, for a backbone timm cannot build: an architecture
    its registry does not hold, or a pretrained tag (``resnet10t.c3_in1k``: the part after the
    dot) that the architecture does not have. `timm.is_model` ignores the tag, and timm would only
    refuse it when the model is created, inside every trial."""
    arch, dot, tag = str(name).partition(".")
    if dot and not tag:
        raise ConfigError(f"timm backbone {name!r}: an empty pretrained tag after the dot (drop the dot, or name "
                          f"a tag: {', '.join(timm.list_pretrained(f'{arch}.*')[:5]) or 'none'})")
    if not timm.is_model(arch):
        raise ConfigError(f"unknown timm backbone {name!r}{did_you_mean(arch, _all_models())}")
    if not tag:
        return
    tags = timm.list_pretrained(f"{arch}.*")
    if name in tags:
        return
    known = ", ".join(tags) if tags else "none: use the name without a tag and model.pretrained=false"
    raise ConfigError(f"unknown pretrained tag {tag!r} of timm backbone {arch!r}"
                      f"{did_you_mean(name, tags, cutoff=0.5)} (its tags: {known})")


def check_head(name: str) -> None:
    """Raise ConfigError (with close names) for a head the registry does not hold."""
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
        """``[N, C, H, W]`` -> ``[N, C]``, or ``[N, T, C]`` tokens -> ``[N, C]``."""
        dims = (2, 3) if x.ndim == 4 else (1,)
        return x.clamp_min(self.eps).pow(self.p).mean(dims).pow(1.0 / self.p)


def create_backbone(name: str, pretrained, weights_dir: str = "", **kwargs):
    """(timm model, pretrained_loaded). pretrained: True (fail clearly), False, or 'auto' (fall
    back to random init, with a warning); `kwargs` go to `timm.create_model` (``num_classes=0``
    and a pool, or ``features_only``). Weights come from the file `weights.resolve_weights` finds
    in `weights_dir` or a cache (a study resolves them before its first trial, so no trial
    downloads).

    Raises:
        PretrainedUnavailable: `pretrained` is True and the weights cannot be found or loaded.
    """
    if pretrained is False:
        return timm.create_model(name, pretrained=False, **kwargs), False
    try:
        file = resolve_weights([name], weights_dir or None)[name]
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(file)), **kwargs), True
    except PretrainedUnavailable:
        if pretrained == "auto":
            warnings.warn(f"pretrained weights for {name} unavailable; using random init", stacklevel=3)
            return timm.create_model(name, pretrained=False, **kwargs), False
        raise
    except Exception as e:  # a weights file that does not fit, an unknown tag...
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
    """Slice stack ``[B, n_slices, H, W]`` -> logits ``[B, n_conditions, 3]``: zero slices pad the stack to
    a multiple of `in_chans`, each group of `in_chans` slices is one backbone image (a token), the head
    reads the ``[B, tokens, n_features]`` features.

    Raises:
        ConfigError: an unknown backbone, pretrained tag or head.
        PretrainedUnavailable: `pretrained` is True and the weights cannot be loaded."""

    def __init__(self, model_cfg, n_slices: int, n_conditions: int):
        super().__init__()
        check_backbone(model_cfg.backbone)
        check_head(model_cfg.head)
        self.k = model_cfg.in_chans
        self.n_tokens = math.ceil(n_slices / self.k)
        self.pad = self.n_tokens * self.k - n_slices  # zero slices so the stack splits into images
        timm_pool = "" if model_cfg.pooling == "gem" else model_cfg.pooling
        self.backbone, self.pretrained_loaded = create_backbone(
            model_cfg.backbone, model_cfg.pretrained, model_cfg.weights_dir, num_classes=0, in_chans=self.k,
            global_pool=timm_pool)
        self.pool = GeM() if model_cfg.pooling == "gem" else nn.Identity()
        # what the backbone emits with num_classes=0: after its pre-logits head when it has one
        # (MobileNetV3: num_features 576, head_hidden_size 1024)
        self.n_features = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        self.head = get_head(model_cfg.head)(self.n_features, self.n_tokens, n_conditions, model_cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, n_slices, H, W]`` -> logits ``[B, n_conditions, 3]``."""
        b, s, h, w = x.shape
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, 0, self.pad))
        feats = self.pool(self.backbone(x.reshape(b * self.n_tokens, self.k, h, w)))
        return self.head(feats.reshape(b, self.n_tokens, -1))


def build_model(model_cfg, n_slices: int, n_conditions: int) -> SpineNet:
    """The classifier network of a `ModelConfig` (`SpineNet`; raises as it does)."""
    return SpineNet(model_cfg, n_slices, n_conditions)

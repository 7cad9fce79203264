"""The keypoint network: a timm backbone (`features_only`) and a light feature-pyramid head that
emits one heatmap logit map per channel (`CHANNELS`) at stride 4, or 2 (`localizer.stride`).

Channels: the spinal canal point of each level (Sagittal T2/STIR), the foramen of each level
(Sagittal T1, either side: a lateral slice looks the same on both sides, the side comes from the
slice's patient x when decoding), and the left and right subarticular recess (Axial T2, any level:
an axial slice shows one level, which comes from the sagittal points through patient space).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.layout import LEVELS
from ..models import check_backbone, create_backbone

GROUPS = ("sag_t2", "sag_t1", "axial")
CHANNELS = {"sag_t2": range(0, 5), "sag_t1": range(5, 10), "axial": range(10, 12)}
N_CHANNELS = 12
GROUP_OF_SERIES = {"Sagittal T2/STIR": "sag_t2", "Sagittal T1": "sag_t1", "Axial T2": "axial"}


class KeypointNet(nn.Module):
    """Input ``[B, in_chans, S, S]`` (a slice and its neighbours, S a multiple of 32); output
    heatmap logits ``[B, N_CHANNELS, S / stride, S / stride]``.

    The backbone's maps of stride 4 and coarser are projected to `width` channels, upsampled and
    summed at the finest of them, as in a feature pyramid (Lin et al. 2017), and go through a 3x3
    conv block and a 1x1 output conv. With ``min_stride=2`` and a backbone that has a stride-2 map
    (ResNets, EfficientNets; not ConvNeXts, which start at 4), the block's output is upsampled
    once more, added to the projected stride-2 map, and goes through a second, half-width 3x3
    block before the output conv (a U-Net-style decoder step): heatmap cells of 2 input pixels."""

    def __init__(self, backbone: str, pretrained, in_chans: int = 3, width: int = 64, min_stride: int = 4):
        super().__init__()
        check_backbone(backbone)
        self.backbone, self.pretrained_loaded = create_backbone(backbone, pretrained, features_only=True,
                                                                in_chans=in_chans)
        info = self.backbone.feature_info
        keep = [i for i, r in enumerate(info.reduction()) if r >= 4]
        self.keep = keep
        self.stride = info.reduction()[keep[0]]
        self.lateral = nn.ModuleList(nn.Conv2d(info.channels()[i], width, 1) for i in keep)
        block = [nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        fine = [i for i, r in enumerate(info.reduction()) if min_stride <= r < self.stride]
        self.fine = fine[-1] if fine else None
        if self.fine is None:
            self.head = nn.Sequential(*block, nn.Conv2d(width, N_CHANNELS, 1))
        else:  # the stride-4 block, then a narrower one at stride 2 on it and the stem's map
            self.stride = info.reduction()[self.fine]
            self.head = nn.Sequential(*block)
            self.fine_lateral = nn.Conv2d(info.channels()[self.fine], width, 1)
            half = width // 2
            self.fine_head = nn.Sequential(nn.Conv2d(width, half, 3, padding=1), nn.BatchNorm2d(half),
                                           nn.ReLU(inplace=True), nn.Conv2d(half, N_CHANNELS, 1))
        out = (self.head if self.fine is None else self.fine_head)[-1]
        nn.init.constant_(out.bias, -4.0)  # heatmaps start near 0: most cells hold no point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_chans, S, S]`` -> heatmap logits ``[B, N_CHANNELS, S / stride, S / stride]``."""
        feats = self.backbone(x)
        coarse = feats[self.keep[0]]
        out = 0
        for conv, i in zip(self.lateral, self.keep):
            y = conv(feats[i])
            if y.shape[-2:] != coarse.shape[-2:]:
                y = F.interpolate(y, size=coarse.shape[-2:], mode="bilinear", align_corners=False)
            out = out + y
        if self.fine is None:
            return self.head(out)
        fine = self.fine_lateral(feats[self.fine])
        h = F.interpolate(self.head(out), size=fine.shape[-2:], mode="bilinear", align_corners=False) + fine
        return self.fine_head(h)


def build_keypoint_model(model_cfg, stride: int = 4) -> KeypointNet:
    """A `KeypointNet` from a `ModelConfig` (backbone, pretrained, in_chans) and the heatmap
    stride asked for (`LocalizerConfig.stride`)."""
    return KeypointNet(model_cfg.backbone, model_cfg.pretrained, model_cfg.in_chans, min_stride=stride)


def save_checkpoint(path: Path, model, cfg, epoch: int, metrics: dict) -> None:
    """A self-describing localiser checkpoint: config (task localize), stride, state."""
    import timm

    module = model.module if hasattr(model, "module") else model
    tmp = path.with_suffix(".tmp")
    payload = dict(config=cfg.to_dict(), task="localize", stride=module.stride, epoch=epoch, metrics=metrics,
                   channels={g: list(r) for g, r in CHANNELS.items()}, levels=list(LEVELS),
                   state_dict=module.state_dict(), versions=dict(torch=torch.__version__, timm=timm.__version__))
    try:
        torch.save(payload, tmp)
        tmp.replace(path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        raise OSError(f"{path}: checkpoint could not be written ({e})") from e


def load_localizer_checkpoint(path, device: str = "cpu") -> tuple[KeypointNet, "TrainConfig"]:
    """(model in eval mode, TrainConfig) from a checkpoint written by `fit_localizer`; raises
    ValueError for a checkpoint of another task (a classifier's)."""
    import dataclasses

    from ..config import TrainConfig

    from ..training import read_checkpoint

    ckpt = read_checkpoint(path)
    if ckpt.get("task") != "localize":
        raise ValueError(f"{path}: not a localiser checkpoint (task {ckpt.get('task', 'classify')!r})")
    cfg = TrainConfig.from_dict(ckpt["config"])
    # the stride the model was built with: checkpoints older than `localizer.stride` used 4
    model = build_keypoint_model(dataclasses.replace(cfg.model, pretrained=False), ckpt.get("stride", 4))
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), cfg

"""Heads without sequence modelling: one shared classifier, or one per condition (the manual
log's "5 heads"). Both read the flattened token sequence, so each output sees which plane and
side every feature came from."""
from __future__ import annotations

import torch
from torch import nn

from ._registry import register_head


@register_head("linear")
class LinearHead(nn.Module):
    """``linear``: dropout and one linear layer from the flattened tokens to every condition's logits."""

    def __init__(self, in_features: int, n_tokens: int, n_conditions: int, cfg):
        super().__init__()
        self.n_conditions = n_conditions
        self.drop = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(in_features * n_tokens, n_conditions * 3)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """Token features ``[B, T, F]`` -> logits ``[B, n_conditions, 3]``."""
        return self.fc(self.drop(feats.flatten(1))).view(-1, self.n_conditions, 3)


@register_head("multihead")
class MultiHead(nn.Module):
    """``multihead``: dropout, then one linear layer per condition from the flattened tokens to its 3 logits."""

    def __init__(self, in_features: int, n_tokens: int, n_conditions: int, cfg):
        super().__init__()
        self.drop = nn.Dropout(cfg.dropout)
        self.fcs = nn.ModuleList(nn.Linear(in_features * n_tokens, 3) for _ in range(n_conditions))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """Token features ``[B, T, F]`` -> logits ``[B, n_conditions, 3]``."""
        x = self.drop(feats.flatten(1))
        return torch.stack([fc(x) for fc in self.fcs], dim=1)

"""Recurrent heads: a bidirectional LSTM or GRU mixes context along the slice sequence; its
per-token outputs are flattened (keeping plane and side positions) into the classifier."""
from __future__ import annotations

import torch
from torch import nn

from ._registry import register_head


class _RecurrentHead(nn.Module):
    rnn_cls: type[nn.RNNBase] = nn.LSTM

    def __init__(self, in_features: int, n_tokens: int, n_conditions: int, cfg):
        super().__init__()
        self.n_conditions = n_conditions
        self.rnn = self.rnn_cls(in_features, cfg.rnn_hidden, num_layers=cfg.rnn_layers, batch_first=True,
                                bidirectional=True, dropout=cfg.dropout if cfg.rnn_layers > 1 else 0.0)
        self.drop = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(2 * cfg.rnn_hidden * n_tokens, n_conditions * 3)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(feats)
        return self.fc(self.drop(out.flatten(1))).view(-1, self.n_conditions, 3)


@register_head("lstm")
class LSTMHead(_RecurrentHead):
    """``lstm``: a bidirectional LSTM (``cfg.rnn_hidden`` per direction, ``cfg.rnn_layers``) over the
    tokens, its flattened outputs into one linear layer. ``[B, T, F]`` -> logits ``[B, n_conditions, 3]``."""

    rnn_cls = nn.LSTM


@register_head("gru")
class GRUHead(_RecurrentHead):
    """``gru``: as ``lstm`` with a bidirectional GRU. ``[B, T, F]`` -> logits ``[B, n_conditions, 3]``."""

    rnn_cls = nn.GRU

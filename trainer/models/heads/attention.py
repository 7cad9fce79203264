"""Attention heads: each condition learns where along the slice sequence to look (attention
pooling with one query per condition over position-tagged tokens), then classifies what it pooled.
`lstm_attention` runs a bidirectional LSTM over the tokens first."""
from __future__ import annotations

import torch
from torch import nn

from ._registry import register_head


class AttentionPool(nn.Module):
    """Attention pooling with `n_queries` learned queries: each query's softmax weights over the `n_tokens`
    tokens (plus a learned position embedding) give a weighted mean of the tokens. ``[B, T, D] -> [B, Q, D]``."""

    def __init__(self, dim: int, n_tokens: int, n_queries: int, hidden: int):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(n_tokens, dim))
        self.key = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh())
        self.query = nn.Parameter(torch.randn(n_queries, hidden) * hidden**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, Q, D]
        """Token features ``[B, T, D]`` -> one pooled vector per query ``[B, Q, D]``."""
        x = x + self.pos
        weights = torch.softmax(self.key(x) @ self.query.T, dim=1)  # [B, T, Q]
        return weights.transpose(1, 2) @ x


class _AttentionHead(nn.Module):
    use_lstm = False

    def __init__(self, in_features: int, n_tokens: int, n_conditions: int, cfg):
        super().__init__()
        dim = in_features
        self.rnn = None
        if self.use_lstm:
            self.rnn = nn.LSTM(in_features, cfg.rnn_hidden, num_layers=cfg.rnn_layers, batch_first=True,
                               bidirectional=True, dropout=cfg.dropout if cfg.rnn_layers > 1 else 0.0)
            dim = 2 * cfg.rnn_hidden
        self.pool = AttentionPool(dim, n_tokens, n_conditions, cfg.attention_hidden)
        self.drop = nn.Dropout(cfg.dropout)
        # one classifier per condition, applied to that condition's pooled vector
        self.weight = nn.Parameter(torch.randn(n_conditions, dim, 3) * dim**-0.5)
        self.bias = nn.Parameter(torch.zeros(n_conditions, 3))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = self.rnn(feats)[0] if self.rnn is not None else feats
        pooled = self.drop(self.pool(x))  # [B, C, D]
        return torch.einsum("bcd,cdk->bck", pooled, self.weight) + self.bias


@register_head("attention")
class AttentionHead(_AttentionHead):
    """``attention``: one attention query per condition over the tokens, then a per-condition linear
    classifier. Token features ``[B, T, F]`` -> logits ``[B, n_conditions, 3]``."""

    use_lstm = False


@register_head("lstm_attention")
class LSTMAttentionHead(_AttentionHead):
    """``lstm_attention``: a bidirectional LSTM (``cfg.rnn_hidden`` per direction, ``cfg.rnn_layers``)
    over the tokens, then the ``attention`` head on its outputs. ``[B, T, F]`` -> logits ``[B, n_conditions, 3]``."""

    use_lstm = True

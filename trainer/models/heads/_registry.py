"""The head registry: a name -> class map that refuses duplicates and suggests close names."""
from __future__ import annotations

import difflib

from torch import nn

_HEADS: dict[str, type[nn.Module]] = {}

RECURRENT_HEADS = {"lstm", "gru", "lstm_attention"}  # heads that read rnn_hidden / rnn_layers


def register_head(name: str):
    """Class decorator. A head is built as ``cls(in_features, n_tokens, n_conditions, cfg)`` and maps
    token features ``[B, T, F]`` to logits ``[B, n_conditions, 3]``."""

    def deco(cls):
        if name in _HEADS:
            raise ValueError(f"head {name!r} is registered twice ({_HEADS[name].__module__} and {cls.__module__})")
        _HEADS[name] = cls
        cls.head_name = name
        return cls

    return deco


def head_names() -> list[str]:
    return sorted(_HEADS)


def get_head(name: str) -> type[nn.Module]:
    if name not in _HEADS:
        close = difflib.get_close_matches(name, _HEADS, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown head {name!r}{hint} (registered: {', '.join(head_names())})")
    return _HEADS[name]

"""The head registry: a name -> class map that refuses duplicates and suggests close names."""
from __future__ import annotations

from torch import nn

from ...errors import did_you_mean

_HEADS: dict[str, type[nn.Module]] = {}


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
    """The registered head names, sorted."""
    return sorted(_HEADS)


def get_head(name: str) -> type[nn.Module]:
    """The head class registered as `name`.

    Raises:
        KeyError: for an unknown name; the message suggests close names and lists the registered ones.
    """
    if name not in _HEADS:
        raise KeyError(f"unknown head {name!r}{did_you_mean(name, _HEADS, cutoff=0.5)} (registered: {', '.join(head_names())})")
    return _HEADS[name]

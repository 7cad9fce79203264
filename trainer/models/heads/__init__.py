"""Heads: token features ``[B, T, F]`` -> logits ``[B, conditions, 3]``, by name.

A new head is one module here with a ``@register_head("name")`` class, imported below; the
parametrised tests then cover it with every test backbone.
"""
from ._registry import get_head, head_names, register_head
from . import attention, linear, recurrent  # noqa: F401  (registration)

__all__ = ["get_head", "head_names", "register_head"]

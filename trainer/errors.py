"""The one base class of the errors a user can fix, and the "did you mean" hint they share.

Every error raised for bad input (a config key, a data file, a search space, a study, a
promotion) is a `UserError`: `optuna-run` prints its message in one line and exits 2. Any other
exception is a bug and keeps its traceback. `UserError` is a `ValueError`, so code that guards
against bad values catches it too. It lives in the trainer, the lowest layer, so that the trainer's
own errors (`ConfigError`, `LayoutError`, ...) can be user errors without importing `sweep`.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class UserError(ValueError):
    """Bad input: the message names the file, key or value and says what is wrong."""


def did_you_mean(name: str, known: Iterable[str], n: int = 3, cutoff: float = 0.6) -> str:
    """``"; did you mean a, b?"`` for the close matches of `name` among `known`, or ``""``."""
    close = difflib.get_close_matches(str(name), list(known), n=n, cutoff=cutoff)
    return f"; did you mean {', '.join(close)}?" if close else ""

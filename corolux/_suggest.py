"""The "did you mean ...?" text shared by every name check."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """Return ``" did you mean 'x'?"`` for the closest candidate, or ``""``.

    >>> did_you_mean("on_train_batch_ned", ["on_train_batch_end", "on_fit_end"])
    " did you mean 'on_train_batch_end'?"
    """
    close = difflib.get_close_matches(str(name), sorted(map(str, candidates)), n=1, cutoff=0.6)
    return f" did you mean {close[0]!r}?" if close else ""


def unknown_stage_message(name: object, where: str, known: Iterable[str]) -> str:
    """Build the error text for a stage name that is not in ``known``."""
    return f"unknown stage {name!r} in {where}:{did_you_mean(str(name), known) or ' see corolux.Stage'}"

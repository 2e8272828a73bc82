"""Breakpoint: enter the debugger at a stage, with the live ``ctx`` in scope."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from corolux._suggest import did_you_mean
from corolux.callback import Callback
from corolux.context import Context
from corolux.debug import position
from corolux.events import Stage

__all__ = ["Breakpoint"]


class Breakpoint(Callback):
    """Enter ``pdb`` at ``stage`` when ``when(ctx)`` holds, with ``ctx`` as a local variable.

    It calls ``breakpoint()``, so ``sys.breakpointhook`` and ``PYTHONBREAKPOINT`` decide the
    debugger (``PYTHONBREAKPOINT=0`` turns every Breakpoint off). In ``pdb``, ``p ctx.loss``
    looks, ``ctx.loss = ctx.loss * 0`` changes what the step uses next, ``c`` resumes
    training. Not a default callback; weight 0 (set ``bp.weight`` to move it).

    ``stage`` may be any built-in stage or a custom stage of your trainer: the name is
    checked here for its form, and against the trainer's stages when the callback is
    handed to ``run``/``fit``, before the first event.

    Args:
        stage: the stage to stop at, e.g. ``"on_train_batch_after_loss"``.
        when: ``fn(ctx) -> bool``; None stops every time.

    Raises:
        ValueError: ``stage`` is not a stage name (with a suggestion).
        TypeError: ``stage`` is not a string, or ``when`` is not callable.

    Example:
        >>> import torch
        >>> Breakpoint("on_train_batch_after_loss", when=lambda ctx: not torch.isfinite(ctx.loss))
        Breakpoint('on_train_batch_after_loss', when=<lambda>)

    .. warning::
       Progress bars write to the terminal while ``pdb`` waits; train with
       ``Trainer(progress=False)`` for a clean debugger screen.
    """

    stage: str
    when: Callable[[Context], Any] | None

    def __init__(self, stage: str, when: Callable[[Context], Any] | None = None) -> None:
        self.stage = _check_stage(stage)
        if when is not None and not callable(when):
            raise TypeError(f"Breakpoint(when=...) takes a predicate fn(ctx) -> bool, got {when!r}")
        self.when = when
        #: How many times it stopped.
        self.hits = 0
        setattr(self, self.stage, self._check)  # the handler of that one stage

    def _check(self, ctx: Context) -> None:
        if self.when is None or self.when(ctx):
            self._pause(ctx)

    def _pause(self, ctx: Context) -> None:
        """Enter the debugger in this frame: ``ctx`` is a local variable here."""
        self.hits += 1
        if sys.breakpointhook is sys.__breakpointhook__ and os.environ.get("PYTHONBREAKPOINT") == "0":
            return
        print(
            f"corolux Breakpoint at {position(ctx, self.stage)}\n"
            "  `ctx` is the live context (p ctx.loss; ctx.loss = ctx.loss * 0); `c` resumes training",
            flush=True,
        )
        breakpoint()  # paused by corolux.callbacks.Breakpoint: `ctx` is the live context
        return  # paused by corolux.callbacks.Breakpoint: `ctx` is the live context; `c` resumes

    def __repr__(self) -> str:
        name = getattr(self.when, "__name__", None) or repr(self.when)
        when = "" if self.when is None else f", when={name}"
        return f"Breakpoint({self.stage!r}{when})"


def _check_stage(stage: Any) -> str:
    """A built-in stage, or a name of the form custom stages have (the driver checks those
    against the trainer's stages)."""
    if not isinstance(stage, str):
        raise TypeError(f"Breakpoint(stage) takes a stage name such as 'on_train_batch_end', got {stage!r}")
    if stage.startswith("on_") and stage.isidentifier():
        return str(stage)
    raise ValueError(
        f"Breakpoint: {stage!r} is not a stage name;"
        f"{did_you_mean(stage, list(Stage)) or ''} stage names start with 'on_' (see corolux.Stage)"
    )

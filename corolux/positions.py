"""Where a run is: one line for a stage (``position``), the tree of a run's stages, and the
stages a run can never reach; for the Stepper and ``Breakpoint``."""

from __future__ import annotations

from corolux.context import Context
from corolux.events import ONE_OFF_STAGES, SCOPE_STAGES, STEP_STAGES, Stage

__all__ = ["position", "tree", "unreachable"]

_BUILTIN = frozenset(Stage)


def position(ctx: Context, stage: str, *, in_phase: bool = False) -> str:
    """One line saying where ``stage`` is in the run: epoch, phase, batch, stage.

    The batch count reads ``5/?`` when the data has no length. ``in_phase`` says that a
    phase is open, for the stages that may come anywhere (``on_interrupt``, custom ones).

    Example:
        >>> position(ctx, "on_train_batch_after_loss")      # doctest: +SKIP
        'epoch 2/10 · train · batch 5/32 · on_train_batch_after_loss'
    """
    parts = []
    if ctx.kind == "fit" and ctx.epoch:  # past on_fit_begin
        parts.append(f"epoch {ctx.epoch}/{ctx.max_epochs}")
    builtin = stage if isinstance(stage, Stage) else None
    # ctx.in_batch also covers custom and one-off stages yielded inside a batch.
    in_batch = ctx.in_batch or (builtin is not None and builtin.in_batch)
    if ctx.phase and (in_batch or in_phase or (builtin is not None and builtin.phase is not None)):
        parts.append(ctx.phase)
    if in_batch:
        total = "?" if ctx.num_batches is None else ctx.num_batches
        parts.append(f"batch {ctx.iter}/{total}")
    parts.append(str(stage))
    return " · ".join(parts)


def unreachable(ctx: Context) -> dict[str, str]:
    """Built-in stages this run can never yield, each with the reason."""
    if ctx.kind == "fit":
        reasons: dict[str, str] = {s: "fit runs do not predict" for s in Stage if s.phase == "predict"}
        if ctx.valid_data is None:
            reasons.update(
                (s, "it has no validation data (pass valid_data=...)") for s in Stage if s.phase == "valid"
            )
        return reasons
    phase = "valid" if ctx.kind == "evaluate" else "predict"
    reason = f"it is a run_{ctx.kind}() run"
    return {
        s: reason for s in Stage if (s.phase is not None and s.phase != phase) or s.scope in ("fit", "epoch")
    }


def tree(ctx: Context | None) -> list[tuple[int, str]]:
    """The stages of this run's kind as ``(depth, stage)``, in order; depth -1 for headings
    of the stages outside the nesting."""

    def phase(name: str, depth: int) -> list[tuple[int, str]]:
        begin, batch_begin, batch_end, end = SCOPE_STAGES[name]
        inner = [s for s in Stage if s in STEP_STAGES[name]]  # in the tree's order
        return [
            (depth, begin),
            (depth + 1, batch_begin),
            *((depth + 2, s) for s in inner),
            (depth + 1, batch_end),
            (depth, end),
        ]

    if ctx is None or ctx.kind == "fit":
        epoch = phase("train", 2)
        if ctx is None or ctx.valid_data is not None:
            epoch += phase("valid", 2)
        lines = [(0, Stage.on_fit_begin), (1, Stage.on_epoch_begin), *epoch]
        lines += [(1, Stage.on_epoch_end), (0, Stage.on_fit_end)]
    else:
        lines = phase("valid" if ctx.kind == "evaluate" else "predict", 0)
    lines.append((-1, "outside the nesting:"))
    lines.extend((1, s) for s in Stage if s in ONE_OFF_STAGES)
    custom = sorted(s for s in (ctx.stages if ctx is not None else ()) if s not in _BUILTIN)
    if custom:
        lines.append((-1, "custom stages of this trainer:"))
        lines.extend((1, s) for s in custom)
    return lines

"""GradientAccumulation: step the optimizer once every ``steps`` batches."""

from __future__ import annotations

from corolux.callback import Callback
from corolux.context import Context

__all__ = ["GradientAccumulation"]


class GradientAccumulation(Callback):
    """Sum the gradients of ``steps`` batches, then step the optimizer once.

    It sets ``ctx.accumulate_steps`` in ``setup``; the default step and the custom-step
    helpers own the windows (DESIGN section 8):

    - ``ctx.backward`` scales each loss by ``1/steps``, and by ``1/k`` in an epoch's last,
      shorter window of k batches when the data has a length (so every window's gradient
      is a mean over its batches); without a length, by ``1/steps``, and the open window is
      stepped when the data ends.
    - The optimizer steps, and ``on_train_batch_before_step``/``_after_step`` fire, every
      ``steps`` batches and at the epoch's end (``ctx.accumulating`` is true in between);
      ``ctx.step`` counts optimizer steps only, so ``max_steps``, per-step schedules
      (``LRScheduler(call_on="on_train_batch_after_step")``), ``GradientClip`` and
      ``AutoResume(every_n_steps=...)`` count windows.
    - Every batch is counted in the epoch's metrics.

    A custom ``train_step`` gets the same through ``ctx.backward``, ``ctx.accumulating``
    and ``ctx.step_optimizer``. Weight 0 (it acts in ``setup`` only).

    Args:
        steps: the number of batches per optimizer step (an integer >= 1; 1 is no accumulation).

    Raises:
        ValueError: ``steps`` is not an integer >= 1.

    Example:
        >>> GradientAccumulation(4)
        GradientAccumulation(4)
        >>> trainer.fit(data, epochs=3, callbacks=[GradientAccumulation(4)])  # doctest: +SKIP
    """

    def __init__(self, steps: int) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(
                f"GradientAccumulation: steps must be an integer >= 1 (batches per optimizer step), "
                f"got {steps!r}"
            )
        self.steps = steps

    def setup(self, ctx: Context) -> None:
        if ctx.kind == "fit":
            ctx.accumulate_steps = self.steps

    def __repr__(self) -> str:
        return f"GradientAccumulation({self.steps})"

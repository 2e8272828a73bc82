"""Profile: where a run's time goes, per phase: the data, the callbacks, the rest; and what
torch.compile compiled in each phase."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

from corolux.callback import Callback
from corolux.compiling import CompileCounts, compile_counts
from corolux.context import Context

__all__ = ["Profile"]

_PHASES = ("train", "valid", "predict")


class Profile(Callback):
    """Measure a run: seconds per phase, how much of it was spent waiting for data and in
    callbacks, and with ``detailed=True`` each callback's seconds per stage. It answers "is
    it my data loader, a callback, or the model?".

    It wraps every other callback's handlers when the run starts (through the
    ``wrap_handler`` protocol: two clock reads per handler call, in this run only) and has
    the loop time each ``next()`` on the data. Coroutine callbacks are not timed one by one;
    their time shows in the phase's remainder. Weight ``-inf``: its phase clocks start first
    and stop first. Times add up over the run (all epochs); ``reset()`` starts over.

    Each phase also reports what ``torch.compile`` did during it, read from torch's own
    counters (``corolux.compiling.compile_counts()``): ``compilations`` (graphs compiled, the
    first ones and recompilations), ``recompiles`` (of a function compiled before: a new batch
    size, train/eval mode...) and ``graph_breaks``; all 0 without compilation. The seconds a
    compilation takes are in the phase's ``other``.

    Example:
        >>> profile = Profile(detailed=True)
        >>> trainer.fit(data, epochs=2, callbacks=[profile])          # doctest: +SKIP
        >>> profile.summary()["train"]                                # doctest: +SKIP
        {'seconds': 1.92, 'data': 0.61, 'callbacks': 0.05, 'other': 1.26, 'compilations': 0,
         'recompiles': 0, 'graph_breaks': 0}
        >>> print(profile)                                            # doctest: +SKIP
    """

    weight = float("-inf")

    def __init__(self, detailed: bool = False) -> None:
        if not isinstance(detailed, bool):
            raise TypeError(f"Profile: detailed must be True or False, got {detailed!r}")
        self.detailed = detailed
        self.reset()

    def reset(self) -> None:
        """Forget what was measured."""
        self._phase_seconds: dict[str, float] = {}
        self._callback_seconds: dict[str, float] = {}  # phase -> seconds in handlers
        self._detail: dict[str, dict[str, float]] = {}  # callback -> stage -> seconds
        self._timing: dict[str, float] = {}  # the loop's data times (ctx.timing)
        self._started: dict[str, float] = {}
        self._compiled: dict[str, CompileCounts] = {}  # phase -> what was compiled in it
        self._counts_at: dict[str, CompileCounts] = {}  # phase -> the counters at its begin
        self._names: dict[int, str] = {}
        self._phase_of: dict[str, str] = {}

    # -- wrapping -----------------------------------------------------------------------------

    def wrap_handler(
        self, handler: Callable[[Context], Any], owner: Any, stage: str
    ) -> Callable[[Context], Any]:
        """The handler, timed (the driver calls this once per run for each handler)."""
        name = self._name(owner)
        phase = _phase(stage)
        clock = time.perf_counter
        detail = self._detail.setdefault(name, {}) if self.detailed else None
        seconds = self._callback_seconds

        def timed(ctx: Context) -> Any:
            start = clock()
            try:
                return handler(ctx)
            finally:
                spent = clock() - start
                seconds[phase] = seconds.get(phase, 0.0) + spent
                if detail is not None:
                    detail[stage] = detail.get(stage, 0.0) + spent

        return functools.update_wrapper(timed, handler)

    def _name(self, owner: Any) -> str:
        name = self._names.get(id(owner))
        if name is None:
            base = type(owner).__name__
            taken = set(self._names.values())
            name, n = base, 1
            while name in taken:
                n += 1
                name = f"{base}#{n}"
            self._names[id(owner)] = name
        return name

    # -- phases ---------------------------------------------------------------------------------

    def setup(self, ctx: Context) -> None:
        ctx.timing = self._timing

    def _begin(self, phase: str) -> None:
        self._counts_at[phase] = compile_counts()  # once per phase: no cost per batch
        self._started[phase] = time.perf_counter()

    def _end(self, phase: str) -> None:
        started = self._started.pop(phase, None)
        if started is not None:
            self._phase_seconds[phase] = self._phase_seconds.get(phase, 0.0) + time.perf_counter() - started
            done = compile_counts() - self._counts_at.pop(phase)
            self._compiled[phase] = self._compiled.get(phase, CompileCounts()) + done

    def on_train_begin(self, ctx: Context) -> None:
        self._begin("train")

    def on_train_end(self, ctx: Context) -> None:
        self._end("train")

    def on_valid_begin(self, ctx: Context) -> None:
        self._begin("valid")

    def on_valid_end(self, ctx: Context) -> None:
        self._end("valid")

    def on_predict_begin(self, ctx: Context) -> None:
        self._begin("predict")

    def on_predict_end(self, ctx: Context) -> None:
        self._end("predict")

    def teardown(self, ctx: Context) -> None:
        for phase in list(self._started):  # a run that failed inside a phase
            self._end(phase)
        ctx.timing = None

    # -- results --------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Seconds per phase that ran: ``{"train": {"seconds", "data", "callbacks", "other",
        "compilations", "recompiles", "graph_breaks"}, "valid": {...}}``, where ``other`` is the
        rest (the model's step, the loop, compiling) and the last three count torch.compile's
        work in the phase (see the class docstring); with
        ``detailed=True`` also ``"callbacks"``: ``{callback: {stage: seconds}}``, slowest first."""
        result: dict[str, Any] = {}
        for phase in _PHASES:
            if phase not in self._phase_seconds:
                continue
            seconds = self._phase_seconds[phase]
            data = self._timing.get(f"{phase}_data", 0.0)
            handlers = self._callback_seconds.get(phase, 0.0)
            compiled = self._compiled.get(phase, CompileCounts())
            result[phase] = {
                "seconds": seconds,
                "data": data,
                "callbacks": handlers,
                "other": max(seconds - data - handlers, 0.0),
                "compilations": compiled.compilations,
                "recompiles": compiled.recompiles,
                "graph_breaks": compiled.graph_breaks,
            }
        between = self._callback_seconds.get("epoch", 0.0)
        if between:  # on_fit_begin, on_epoch_begin/_end...: handlers outside the phases
            result["between_phases"] = {"callbacks": between}
        if self.detailed:
            totals = {name: sum(stages.values()) for name, stages in self._detail.items()}
            result["callbacks"] = {
                name: dict(sorted(self._detail[name].items(), key=lambda item: -item[1]))
                for name in sorted(totals, key=lambda n: -totals[n])
                if totals[name] > 0
            }
        return result

    def __str__(self) -> str:
        summary = self.summary()
        rows = [(phase, summary[phase]) for phase in _PHASES if phase in summary]
        compiled = any(row["compilations"] or row["graph_breaks"] for _, row in rows)
        head = f"{'phase':<8} {'seconds':>9} {'data':>9} {'callbacks':>10} {'other':>9}"
        lines = [head + (f" {'compiled':>9} {'breaks':>7}" if compiled else "")]
        for phase, row in rows:
            line = (
                f"{phase:<8} {row['seconds']:>9.3f} {row['data']:>9.3f} {row['callbacks']:>10.3f} "
                f"{row['other']:>9.3f}"
            )
            if compiled:
                line += f" {row['compilations']:>9} {row['graph_breaks']:>7}"
            lines.append(line)
        for name, stages in summary.get("callbacks", {}).items():
            lines.append(f"{name}: " + ", ".join(f"{stage} {s:.4f}s" for stage, s in stages.items()))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Profile(detailed={self.detailed})"


def _phase(stage: str) -> str:
    """The phase a stage belongs to, for the time its handlers take ("train" for the epoch's
    own stages, which bracket training)."""
    for phase in _PHASES:
        if stage.startswith(f"on_{phase}_"):
            return phase
    return "epoch"

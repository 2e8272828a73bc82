"""The only code that yields stages: default steps, phases, and begin/end symmetry.

Every generator here yields stage names and nothing else; the driver turns them into
events and runs the callbacks. Before each stage the loop writes ``ctx.stage``; after each
it acts on the control signals: ``ctx.stop_reason``, ``ctx.skipped``,
``ctx.validation_skipped`` and ``ctx.signals`` (stages emitted by callbacks, Ctrl-C), which
it checks after every stage, yielded or passed over.

*Passing over*: the stages of a batch named in ``pass_over`` are recorded in ``ctx.stage``
and not yielded. ``fit()``, ``evaluate()`` and ``predict()``, which have no consumer, pass
over the batch stages that no handler listens to, so they cost nothing; since the signals
are checked after them as after any other stage, handlers see the same run as under
``run()``, and only a consumer could tell the difference (the grammar property tests drive
both). When every stage inside a default step is passed over (and training has one
optimizer), the loop runs that step's body itself, without the step's generator: the same
calls in the same order, ``ctx.stage`` and the signals as at its stages (``_flat``;
``tests/test_flat_steps.py`` holds the two paths to the same results).

*Delivering in place*: in a run without a consumer and without coroutines a stage's handlers
are fixed from its start to its end, so the driver gives the loop those of the
``*_batch_end`` stages (``Routing.in_place``; the MetricsTracker listens there in every run).
The loop calls them itself, in the driver's order, instead of yielding the stage: a batch of
``fit()`` with the default callbacks then yields nothing. An exception of such a handler goes
to the driver's ``Routing.failed``, which applies a control signal, turns Ctrl-C into a stop,
or notes the callback and stage on an error and re-raises it; what it re-raises the loop
yields as a ``Failure``, which the driver raises while the batch is still open, as when it
calls the handlers itself (``tests/test_in_place_delivery.py`` holds both ways to the same
runs).

A consumer's ``close()`` arrives as ``GeneratorExit`` at a yield: nothing here catches it,
so cleanup runs (``with`` blocks, ``finally``) and nothing more is yielded.

*Rewinds* (``corolux.rewind``), in a run that a rewindable ``Stepper`` drives (``ctx.rewinder``
set): a training pass draws its batches through the rewinder, which keeps each batch's
starting state; a ``Rewind`` thrown in at a yield of a training batch (its stages, its
``on_train_batch_end``, an ``on_interrupt`` inside it) abandons the batch (its step is
closed) and asks for the next batch, which the rewinder gives again, restored; an error of
the batch's step is yielded as a ``Failure`` instead of raised, so that it can be rewound
too. Without a rewinder none of this runs (the ``except`` clauses cost nothing untaken).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
import types
import warnings
from collections.abc import Callable, Collection, Container, Generator, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from corolux.checkpoint import ResumePoint, resume, set_rng_state
from corolux.context import Context, loss_problem
from corolux.data import (
    default_unpack,
    fast_forward_problem,
    length,
    pass_state,
    resume_batches,
    set_epoch,
    to_device,
)
from corolux.events import BATCH_ENDS, SCOPE_STAGES, STEP_STAGES, Stage
from corolux.rewind import Failure, Rewind

__all__ = [
    "compute_loss",
    "evaluate_loop",
    "fit_loop",
    "forward",
    "forward_and_loss",
    "predict_loop",
    "predict_step",
    "Routing",
    "train_step",
    "valid_step",
]

Step = Callable[[Context], Generator[Stage | str, None, None]]
Loop = Generator[Stage | str | Failure, None, None]
Handler = Callable[[Context], Any]


def _reraise(exc: BaseException, stage: str, handler: Handler) -> None:
    raise exc


@dataclasses.dataclass(frozen=True, slots=True)
class Routing:
    """What the driver lets the loop do with its batch stages instead of yielding each one
    (the module docstring: passing over, delivering in place). ``YIELD_ALL``, for a run with
    a consumer or with coroutines, yields them all.

    Attributes:
        pass_over: the stages no handler listens to; those of a batch are recorded in
            ``ctx.stage`` and not yielded.
        in_place: ``*_batch_end`` stages with handlers, fixed for the run, mapped to them in
            delivery order: the loop calls them itself.
        failed: ``failed(exc, stage, handler)``, for an exception of an in-place handler.
    """

    pass_over: frozenset[str]
    in_place: Mapping[str, tuple[Handler, ...]]
    failed: Callable[[BaseException, str, Handler], None]


YIELD_ALL = Routing(frozenset(), types.MappingProxyType({}), _reraise)

_Tensor = torch.Tensor


# Local names for the stages the hot path yields (one global lookup instead of two).
TRAIN_AFTER_PRED = Stage.on_train_batch_after_pred
TRAIN_AFTER_LOSS = Stage.on_train_batch_after_loss
TRAIN_BEFORE_BACKWARD = Stage.on_train_batch_before_backward
TRAIN_BEFORE_STEP = Stage.on_train_batch_before_step
TRAIN_AFTER_STEP = Stage.on_train_batch_after_step
VALID_AFTER_PRED = Stage.on_valid_batch_after_pred
VALID_AFTER_LOSS = Stage.on_valid_batch_after_loss
PREDICT_AFTER_PRED = Stage.on_predict_batch_after_pred


# -- default steps (the reference for custom ones) ------------------------------------------


def forward(ctx: Context) -> Any:
    """Call the model on ``ctx.input``: ``model(x)``, ``model(*x)`` for a tuple or list,
    ``model(**x)`` for a dict; under autocast when the precision asks for it."""
    x = ctx.input
    model = ctx.model
    autocast = ctx.precision.autocast
    if autocast is None:
        if type(x) is _Tensor:
            return model(x)
        return _call(model, x)
    with autocast():
        return _call(model, x)


def _call(model: Callable[..., Any], x: Any) -> Any:
    if isinstance(x, (tuple, list)):
        return model(*x)
    if isinstance(x, Mapping):
        return model(**x)
    return model(x)


def compute_loss(ctx: Context) -> torch.Tensor:
    """``loss_fn(pred, target)``, or the loss the output carries (``out.loss``,
    ``out["loss"]``) when ``loss_fn`` is None.

    What it returns is checked where it is used, at no cost per batch: a loss that is not a
    scalar (one-element) tensor gets a clear error from ``ctx.backward`` and from the loss
    tracker; a custom step that backpropagates by itself gets torch's.
    """
    loss_fn = ctx.loss_fn
    if loss_fn is None:
        return _carried_loss(ctx.pred)
    autocast = ctx.precision.autocast
    try:
        if autocast is None:
            return loss_fn(ctx.pred, ctx.target)
        with autocast():
            return loss_fn(ctx.pred, ctx.target)
    except (TypeError, AttributeError, ValueError, RuntimeError):
        _check_target(ctx)  # checked here, on the error path: free on the normal one
        raise


def _check_target(ctx: Context) -> None:
    """After ``loss_fn`` failed: a batch without a target gets an error that says so."""
    if ctx.target is None:
        raise ValueError(
            f"the {ctx.phase} batch has no target for loss_fn: a bare tensor or a 1-tuple batch "
            "is the input alone (for predict()); give (input, target) batches, or split yours "
            "with Trainer(unpack=lambda batch: (input, target))"
        ) from None


def _carried_loss(pred: Any) -> Any:
    loss = getattr(pred, "loss", None)
    if loss is None and isinstance(pred, Mapping):
        loss = pred.get("loss")
    if loss is None:
        raise ValueError(
            f"loss_fn is None, so the model output must carry its loss (out.loss or "
            f"out['loss'], as Hugging Face models do), but it is a {type(pred).__name__} "
            "without one; pass Trainer(loss_fn=...)"
        )
    return loss


def forward_and_loss(
    model: torch.nn.Module, loss_fn: Callable[..., Any] | None
) -> Callable[[Any, Any], tuple[Any, Any]]:
    """The forward and the loss as one function ``(input, target) -> (pred, loss)``: what
    ``Trainer(compile="step")`` compiles into one graph (the steps' ``fused``)."""

    def forward_and_loss(x: Any, y: Any) -> tuple[Any, Any]:
        pred = model(x) if type(x) is _Tensor else _call(model, x)
        return pred, (_carried_loss(pred) if loss_fn is None else loss_fn(pred, y))

    return forward_and_loss


def _fused_pred_and_loss(
    ctx: Context, fused: Callable[[Any, Any], tuple[Any, Any]], after_pred: Stage
) -> Generator[Stage, None, None]:
    """``compile="step"``: the prediction and the loss from one compiled call, then
    ``after_pred``; a ``ctx.pred`` replaced there could not reach the loss, and is refused."""
    ctx.pred, ctx.loss = pred, _ = _fused(ctx, fused)
    yield after_pred
    if ctx.pred is not pred:
        raise RuntimeError(
            f"ctx.pred was replaced at {str(after_pred)!r}, but Trainer(compile='step') computed the "
            "loss with the forward, in one compiled call, so the change cannot reach it; change the "
            f"loss at {str(after_pred).replace('pred', 'loss')!r} instead, or use compile=True (the "
            "forward alone)"
        )


def _fused(ctx: Context, fused: Callable[[Any, Any], tuple[Any, Any]]) -> tuple[Any, Any]:
    autocast = ctx.precision.autocast
    if autocast is None:
        return fused(ctx.input, ctx.target)
    with autocast():
        return fused(ctx.input, ctx.target)


def train_step(
    ctx: Context, fused: Callable[[Any, Any], tuple[Any, Any]] | None = None
) -> Generator[Stage, None, None]:
    """The default training step: forward, loss, backward, optimizer step.

    With several optimizers it runs once per optimizer, in dict order, with ``ctx.opt``
    and ``ctx.opt_name`` set, and records each loss in ``ctx.losses``. With ``fused`` (a
    compiled ``forward_and_loss``, ``Trainer(compile="step")``) the forward and the loss are
    one call, before ``on_train_batch_after_pred``, where no callback may listen.
    """
    optimizers = ctx.optimizers
    several = len(optimizers) > 1
    for name, opt in optimizers.items():
        ctx.opt_name = name
        ctx.opt = opt
        if fused is None:
            ctx.pred = forward(ctx)
            yield TRAIN_AFTER_PRED
            ctx.loss = compute_loss(ctx)
        else:
            yield from _fused_pred_and_loss(ctx, fused, TRAIN_AFTER_PRED)
        yield TRAIN_AFTER_LOSS
        if several:
            try:
                ctx.losses[name] = ctx.loss.detach()
            except AttributeError:  # not a tensor: the same error as at the backward
                raise ValueError(loss_problem(ctx.loss)) from None
        yield TRAIN_BEFORE_BACKWARD
        ctx.backward(ctx.loss)
        if ctx.accumulate_steps == 1 or not ctx.accumulating:  # (no property call in the common case)
            yield TRAIN_BEFORE_STEP
            ctx.step_optimizer(opt)
            yield TRAIN_AFTER_STEP


def valid_step(
    ctx: Context, fused: Callable[[Any, Any], tuple[Any, Any]] | None = None
) -> Generator[Stage, None, None]:
    """The default validation step: forward and loss (the phase runs under ``torch.no_grad()``);
    with ``fused``, one call of both, as in ``train_step``."""
    if fused is None:
        ctx.pred = forward(ctx)
        yield VALID_AFTER_PRED
        ctx.loss = compute_loss(ctx)
    else:
        yield from _fused_pred_and_loss(ctx, fused, VALID_AFTER_PRED)
    yield VALID_AFTER_LOSS


def predict_step(ctx: Context) -> Generator[Stage, None, None]:
    """The default prediction step: forward (the phase runs under ``torch.no_grad()``)."""
    ctx.pred = forward(ctx)
    yield PREDICT_AFTER_PRED


# -- begin/end symmetry ----------------------------------------------------------------------
#
# Every scope below has the same shape, so that every begin gets its end:
#
#     try:
#         yield BEGIN                          # then: if signals.pending: yield from _attend(ctx)
#         ...body...
#     except KeyboardInterrupt as exc:
#         yield from _interrupt(ctx, exc)      # on_interrupt, or re-raise to abort
#     yield END
#
# Ordinary exceptions and GeneratorExit pass through without yielding. The scopes are
# written out in two generators (fit_loop: fit + epoch; _phase: phase + batch) rather than
# nested through a helper: each level of ``yield from`` costs every event of the batch loop
# a frame resume, and these events are the hot path. Stages outside the batch loop go
# through _at (one frame more, once per phase or epoch).


def _at(ctx: Context, stage: Stage) -> Loop:
    """Yield ``stage``, then act on what it raised (emitted stages, Ctrl-C)."""
    ctx.stage = stage
    yield stage
    if ctx.signals.pending:
        yield from _attend(ctx)


def _attend(ctx: Context) -> Loop:
    """After a stage: run the work queued with ``ctx.after_stage``, yield the stages
    callbacks emitted, in order; then, if Ctrl-C asked
    for a stop, raise ``KeyboardInterrupt`` here, inside the open scope."""
    signals = ctx.signals
    at = ctx.stage
    if at in BATCH_ENDS:
        ctx.end_batches()  # a stage emitted at *_batch_end comes after the batch: no skip_batch there
    while True:
        after = signals.next_after()  # first the work queued at the stage just delivered
        if after is not None:
            after()
            continue
        stage = signals.next_emitted()
        if stage is None:
            break
        ctx.stage = stage
        yield stage
    ctx.stage = at
    if signals.take_interrupt():
        raise KeyboardInterrupt


def _interrupt(ctx: Context, exc: KeyboardInterrupt) -> Loop:
    """Turn a first Ctrl-C into a graceful stop and yield ``on_interrupt``; re-raise a
    Ctrl-C that aborts."""
    _stop_for_interrupt(ctx, exc)
    yield from _at(ctx, Stage.on_interrupt)


def _stop_for_interrupt(ctx: Context, exc: KeyboardInterrupt) -> None:
    ctx.signals.begin_stop(exc)  # re-raises exc when this Ctrl-C aborts
    ctx.history.interrupted = True
    ctx.stop_training("interrupted")


def _phase(
    ctx: Context,
    phase: str,
    data: Iterable[Any],
    step: Step,
    allowed: Collection[str] | None,
    routing: Routing,
    last: bool = False,
    resume: ResumePoint | None = None,
) -> Loop:
    """One pass over ``data``: ``on_<phase>_begin``, a step per batch between
    ``on_<phase>_batch_begin`` and ``_end``, then ``on_<phase>_end``.

    ``allowed`` checks a custom step's stages (None for the built-in steps); ``routing``
    is described in the module docstring; ``last`` says ``on_<phase>_end`` is the run's
    last stage (evaluate, predict). ``resume`` continues a training pass that a checkpoint
    cut: ``ctx.iter`` starts at its batches done (so ``on_train_begin`` sees them) and the
    pass goes on with the next batch of the same order.
    """
    begin, batch_begin, batch_end, end = SCOPE_STAGES[phase]
    training = phase == "train"
    ctx.begin_phase(phase, data, length(data))
    if resume is not None:
        ctx.iter = resume.batches_done
    ctx.model.train(training)
    outputs: list[Any] | None = [] if phase == "predict" else None
    if allowed is not None:  # a custom step: its yields are checked (one generator more)
        step = functools.partial(_checked_step, step, {str(stage): stage for stage in allowed}, batch_begin)
    unpack = ctx.unpack
    pairs = unpack is default_unpack
    device = ctx.device
    move = device.type != "cpu"  # on the CPU a batch is used as it comes
    signals = ctx.signals
    settle = ctx.precision.scaler is not None  # each batch's GradScaler update (ctx.end_batch)
    # DDP: the gradients of a batch that only accumulates are not all-reduced (no_sync's flag;
    # the model reads it in its forward); the batch that steps reduces the window's sum.
    ddp = ctx.model if training and isinstance(ctx.model, DistributedDataParallel) else None
    after_pred, after_loss = _PRED_LOSS[phase]
    pass_over = routing.pass_over
    yield_begin = batch_begin not in pass_over
    yield_end = batch_end not in pass_over
    end_handlers = routing.in_place.get(batch_end)
    failed = routing.failed
    exhausted = between = False
    # Validation and prediction run under one torch.no_grad() for the whole phase; its handlers
    # (and a consumer of run()) run inside it too (DESIGN section 8).
    with contextlib.nullcontext() if training else torch.no_grad():
        try:
            yield from _at(ctx, begin)
            max_steps = ctx.max_steps  # as set by on_<phase>_begin at the latest
            # The optimizers as on_<phase>_begin left them (a handler may replace them there).
            optimizers = ctx.optimizers
            flat = _flat(ctx, step, phase, pass_over)
            flat_name, flat_opt = next(iter(optimizers.items()), (None, None))
            plain = ctx.precision.autocast is None  # no autocast around the forward and the loss
            # A hand-written loop's order of work: the next batch is requested only after this
            # one's *_batch_end handlers ran (data may depend on the model, and a dataset's RNG
            # draws interleave with the step's as in `for x, y in loader:`); after a stop, none is.
            # On CUDA the copy is non-blocking and kernels are asynchronous: the CPU runs ahead.
            if ctx.stop_reason is not None:
                batches: Iterator[Any] = iter(())  # a stop at *_begin: no batch
            elif not training:
                batches = iter(data)
            elif resume is None:
                set_epoch(data, ctx.epoch - 1)
                ctx.data_state = pass_state(data)  # what this pass's order comes from (checkpoints)
                batches = iter(data)
            else:
                assert resume.data_state is not None  # a training pass's checkpoint records it
                set_epoch(data, ctx.epoch - 1)
                ctx.data_state = resume.data_state
                rng = resume.rng
                batches = resume_batches(
                    data, resume.data_state, resume.batches_done, lambda: set_rng_state(rng)
                )
            rewinder = ctx.rewinder if training else None
            if rewinder is not None:  # a rewindable Stepper: each batch's start is kept (corolux.rewind)
                batches = rewinder.batches(ctx, batches)
            if ctx.timing is not None:  # Profile: time what waiting for data costs (a frame per batch)
                batches = _timed(batches, ctx.timing, f"{phase}_data")
            for batch in batches:
                if move:
                    batch = to_device(batch, device)
                if pairs and type(batch) is tuple and len(batch) == 2:
                    x, y = batch  # the common layouts, without a call
                elif pairs and type(batch) is tuple and len(batch) == 1:
                    x, y = batch[0], None  # inputs alone (predict(x))
                else:
                    x, y = unpack(batch)
                between = False
                ctx.begin_batch(batch, x, y)
                if ddp is not None:
                    ddp.require_backward_grad_sync = not ctx.accumulating
                stages = None
                try:
                    ctx.stage = batch_begin
                    if yield_begin:
                        yield batch_begin
                    if signals.pending:
                        yield from _attend(ctx)
                    if ctx.skipped:
                        pass
                    # The default steps with no handler inside the batch (fit(), evaluate(),
                    # predict() without such callbacks): their bodies without their generators,
                    # the same calls in the same order, ctx.stage and Ctrl-C as at their stages.
                    # (Only a Ctrl-C can be pending inside: no handler ran to queue anything.)
                    elif flat is not None and (ctx.optimizers is optimizers or not training):
                        # (ctx.optimizers replaced inside the phase: the step's generator, which
                        # reads them per batch, runs from then on)
                        if training:
                            ctx.opt_name, ctx.opt = flat_name, flat_opt
                        # forward() and compute_loss() written out for a tensor input at full
                        # precision (the commonest case; each call read the precision, a cold
                        # object by then: about 1 us a step among a real model's torch ops).
                        x = ctx.input
                        if plain and type(x) is _Tensor:
                            # Read, then called: `ctx.model(x)` would be a method call that
                            # CPython 3.11 cannot specialize (the model is an attribute).
                            model = ctx.model
                            ctx.pred = pred = model(x)
                        else:
                            ctx.pred = pred = forward(ctx)
                        ctx.stage = after_pred
                        if signals.pending:
                            yield from _attend(ctx)
                        if after_loss is not None:
                            loss_fn = ctx.loss_fn
                            if plain and loss_fn is not None:
                                try:
                                    ctx.loss = loss_fn(pred, ctx.target)
                                except (TypeError, AttributeError, ValueError, RuntimeError):
                                    _check_target(ctx)
                                    raise
                            else:
                                ctx.loss = compute_loss(ctx)
                            ctx.stage = after_loss
                            if signals.pending:
                                yield from _attend(ctx)
                        if training:
                            ctx.stage = TRAIN_BEFORE_BACKWARD
                            if signals.pending:
                                yield from _attend(ctx)
                            ctx.backward(ctx.loss)
                            if ctx.accumulate_steps == 1 or not ctx.accumulating:
                                ctx.stage = TRAIN_BEFORE_STEP
                                if signals.pending:
                                    yield from _attend(ctx)
                                ctx.step_optimizer(flat_opt)
                                ctx.step = count = ctx.step + 1
                                if max_steps is not None and count >= max_steps and not ctx.is_last_batch:
                                    ctx.stop_training("max_steps")
                                ctx.stage = TRAIN_AFTER_STEP
                                if signals.pending:
                                    yield from _attend(ctx)
                    else:
                        stages = step(ctx)
                        for stage in stages:
                            if stage is TRAIN_AFTER_STEP:  # ctx.step counts here (and in _step_open_window)
                                ctx.step = count = ctx.step + 1
                                if max_steps is not None and count >= max_steps and not ctx.is_last_batch:
                                    # On an epoch's last batch the epoch ends first (fit_loop stops
                                    # after it); without a length that batch is not known, so the
                                    # stop cuts the epoch short there.
                                    ctx.stop_training("max_steps")
                            ctx.stage = stage
                            if stage not in pass_over:
                                yield stage
                            if signals.pending:
                                yield from _attend(ctx)
                            if ctx.skipped:
                                stages.close()
                                break
                    if settle or ctx.skipped:  # the cases end_batch() has work for (see its docstring)
                        ctx.end_batch()
                except KeyboardInterrupt as exc:  # the phase's end settles what it cut short
                    ctx.skipped = True  # an interrupted batch is neither counted nor kept
                    if stages is not None:
                        stages.close()  # the step's own cleanup (with blocks) runs before on_interrupt
                    try:
                        yield from _interrupt(ctx, exc)
                    except Rewind:  # Stepper.rewind() at this batch's on_interrupt
                        continue
                # Only a rewindable Stepper's run gets here (a Rewinder is set; try costs nothing).
                except Rewind:  # Stepper.rewind(): the batch starts again, restored (corolux.rewind)
                    if stages is not None:
                        stages.close()
                    continue  # the rewinder's batches give this batch again
                except Exception as exc:
                    if rewinder is None:
                        raise
                    if stages is not None:
                        stages.close()
                    _settle(ctx)  # on_exception sees what it sees without a rewinder (a rewind restores)
                    try:  # the driver raises it (on_exception) while the batch stays open to a rewind
                        yield Failure(exc)
                    except Rewind:
                        continue
                    raise  # resumed otherwise (never by the driver): the error escapes, as without
                try:
                    ctx.stage = batch_end
                    if end_handlers is not None:
                        try:
                            for handler in end_handlers:
                                try:
                                    handler(ctx)
                                except BaseException as exc:
                                    failed(exc, batch_end, handler)  # a signal or Ctrl-C taken, or re-raised
                        except BaseException as exc:
                            yield Failure(exc)  # the driver raises it (never resumes here)
                            raise
                    elif yield_end:
                        yield batch_end
                    if signals.pending:
                        yield from _attend(ctx)
                except Rewind:  # Stepper.rewind() at on_train_batch_end
                    continue
                finally:  # also when a Ctrl-C during *_batch_end ends the phase: this batch is done
                    if outputs is not None and not ctx.skipped:
                        outputs.append(ctx.pred)
                if ctx.stop_reason is not None:
                    break  # before the next batch is requested
                between = True  # what fails from here to the next batch is the data's (or the loop's)
            else:
                if ctx.iter == 0 and ctx.stop_reason is None and resume is None:
                    raise ValueError(f"the {phase} data yielded no batches; pass at least one batch")
                exhausted = ctx.stop_reason is None
            ctx.end_batches()
            if exhausted and training:
                ctx.is_last_batch = True  # now known: the data has ended
                yield from _step_open_window(ctx)
            _settle(ctx)
        except KeyboardInterrupt as exc:
            ctx.end_batches()
            _settle(ctx)
            yield from _interrupt(ctx, exc)
        except BaseException as exc:  # an error, or close(): settle, and let it through
            if between or isinstance(exc, GeneratorExit):  # no batch is open any more
                ctx.end_batches()
            _settle(ctx)
            raise
        finally:
            if ddp is not None:
                ddp.require_backward_grad_sync = True
        yield from _end_phase(ctx, end, outputs, last)


# The stages after the forward and after the loss in each phase's default step.
_PRED_LOSS = {
    "train": (TRAIN_AFTER_PRED, TRAIN_AFTER_LOSS),
    "valid": (VALID_AFTER_PRED, VALID_AFTER_LOSS),
    "predict": (PREDICT_AFTER_PRED, None),
}


def _flat(ctx: Context, step: Step, phase: str, pass_over: Container[str]) -> Step | None:
    """``step`` when it is a default step that the loop may run without its generator (with
    one optimizer for training) because none of its stages is listened to, else None."""
    if step is train_step and len(ctx.optimizers) != 1 or step not in (train_step, valid_step, predict_step):
        return None
    return step if all(stage in pass_over for stage in STEP_STAGES[phase]) else None


def _timed(batches: Iterator[Any], timing: dict[str, float], key: str) -> Iterator[Any]:
    """``batches``, adding the seconds spent in each ``next()`` to ``timing[key]``."""
    clock = time.perf_counter
    timing.setdefault(key, 0.0)
    while True:
        start = clock()
        try:
            batch = next(batches)
        except StopIteration:
            timing[key] += clock() - start
            return
        timing[key] += clock() - start
        yield batch


def _end_phase(ctx: Context, end: Stage, outputs: list[Any] | None, last: bool) -> Loop:
    """``on_<phase>_end``, after a predict phase's outputs are joined into
    ``ctx.predictions`` (interrupted or not); after the run's last stage a Ctrl-C has
    nothing left to stop."""
    if outputs:
        try:
            ctx.predictions = concat(outputs)
        except KeyboardInterrupt as exc:
            yield from _interrupt(ctx, exc)
    ctx.stage = end
    yield end
    if last:
        ctx.signals.take_interrupt()


def _settle(ctx: Context) -> None:
    """At a phase's end, in every outcome: a step cut short before its batch's end leaves
    the GradScaler ready for the next one, and an accumulation window cut short (stop,
    Ctrl-C, error) leaks into nothing."""
    ctx.precision.update()
    if ctx.training:
        ctx.zero_grad()


def _checked_step(
    step: Step, allowed: Mapping[str, str], begin: Stage, ctx: Context
) -> Generator[Stage | str, None, None]:
    """Run a custom step, checking each stage it yields against ``allowed`` (given as its
    Stage member, so the loop finds it by identity)."""
    stages = step(ctx)
    if not isinstance(stages, Generator):
        raise _not_a_generator(step, stages)
    with contextlib.closing(stages):  # a skip or Ctrl-C closing this closes the step too
        for stage in stages:
            try:
                known = allowed.get(stage)
            except TypeError:  # unhashable: a list, a dict...
                known = None
            if known is None:
                raise _bad_step_stage(stage, begin, allowed)
            yield known


def _step_open_window(ctx: Context) -> Loop:
    """Step the accumulation window that is still open when data without a length ends
    (with a length, its last batch steps it): ``on_train_batch_before_step`` and
    ``_after_step`` come between the last ``on_train_batch_end`` and ``on_train_end``, once
    per optimizer, with ``ctx.in_batch`` false."""
    if ctx.accumulate_steps == 1 or not ctx.gradients_pending:
        return  # every batch stepped (a step that updates by hand owns its own window)
    for name, opt in ctx.optimizers.items():
        ctx.opt_name, ctx.opt = name, opt
        yield from _at(ctx, TRAIN_BEFORE_STEP)
        ctx.step_optimizer(opt)
        ctx.step += 1  # the other place ctx.step counts; max_steps: after the epoch (data ended)
        yield from _at(ctx, TRAIN_AFTER_STEP)
    ctx.precision.update()


def _not_a_generator(step: Step, returned: Any) -> TypeError:
    name = getattr(step, "__qualname__", repr(step))
    return TypeError(
        f"the step {name} returned {type(returned).__name__}, not a generator; a step is a "
        "generator function that yields its stages, e.g. `yield 'on_train_batch_after_loss'`"
    )


def _bad_step_stage(stage: Any, begin: Stage, allowed: Collection[str]) -> ValueError:
    from corolux._suggest import did_you_mean

    inner = sorted(allowed)
    return ValueError(
        f"the step yielded {stage!r}, which is not a stage a step may yield inside "
        f"{begin.value.replace('_begin', '')};{did_you_mean(str(stage), inner) or ''} "
        f"allowed: {', '.join(inner)}"
    )


# -- runs --------------------------------------------------------------------------------------


def fit_loop(
    ctx: Context,
    train: Step,
    valid: Step,
    allowed: Mapping[str, Collection[str] | None],
    routing: Routing = YIELD_ALL,
) -> Loop:
    """The whole training run: ``on_fit_begin``, the epochs, ``on_fit_end``.

    Epochs run from ``ctx.completed_epochs + 1`` to ``ctx.max_epochs``; an epoch counts as
    completed when no stop was given before its ``on_epoch_end``.
    """
    history = ctx.history
    signals = ctx.signals
    try:
        point = _resume(ctx) if ctx.resume_from is not None else None
        yield from _at(ctx, Stage.on_fit_begin)
        for epoch in range(ctx.completed_epochs + 1, ctx.max_epochs + 1):
            if ctx.max_steps is not None and ctx.step >= ctx.max_steps:
                ctx.stop_training("max_steps")  # a resumed run that had taken them all
            if ctx.stop_reason is not None:
                break
            ctx.begin_epoch(epoch)
            resumed = point if point is not None and point.epoch == epoch else None
            if resumed is not None:
                ctx.metrics.update(resumed.metrics)  # what ctx.log recorded before the checkpoint
            try:
                yield from _at(ctx, Stage.on_epoch_begin)
                if resumed is None or resumed.phase == "train":
                    yield from _phase(
                        ctx, "train", ctx.train_data, train, allowed["train"], routing, resume=resumed
                    )
                else:  # the checkpoint was taken in validation: training is done, validation runs again
                    ctx.data_state = resumed.data_state
                if signals.pending:
                    yield from _attend(ctx)
                if ctx.valid_data is not None and ctx.stop_reason is None and not ctx.validation_skipped:
                    if resumed is not None and resumed.phase == "valid" and resumed.data_state is not None:
                        torch.set_rng_state(resumed.data_state["valid"])  # as the validation began
                    elif ctx.data_state is not None:
                        ctx.data_state["valid"] = torch.get_rng_state()  # a checkpoint in it runs it again
                    yield from _phase(ctx, "valid", ctx.valid_data, valid, allowed["valid"], routing)
                    if signals.pending:
                        yield from _attend(ctx)
                if ctx.stop_reason is None:
                    ctx.completed_epochs += 1
                    history.completed_epochs = ctx.completed_epochs
                    if ctx.max_steps is not None and ctx.step >= ctx.max_steps and epoch < ctx.max_epochs:
                        ctx.stop_training("max_steps")  # reached on the epoch's last batch
            except KeyboardInterrupt as exc:
                yield from _interrupt(ctx, exc)
            ctx.end_epoch()
            yield from _at(ctx, Stage.on_epoch_end)
    except KeyboardInterrupt as exc:
        yield from _interrupt(ctx, exc)
    history.stop_reason = ctx.stop_reason
    ctx.stage = Stage.on_fit_end
    yield Stage.on_fit_end
    signals.take_interrupt()  # the run's last stage: nothing is left to stop (ctx.emit refuses it)


def _resume(ctx: Context) -> ResumePoint | None:
    """Restore the checkpoint asked for in ``ctx.resume_from``; return where inside an epoch
    it continues (None: at the start of the next one). Data whose pass cannot be resumed at
    a batch by index resumes at the start of the interrupted epoch, with a warning."""
    source, ctx.resume_from = ctx.resume_from, None
    point = resume(ctx, source)
    if point is not None and point.phase == "train":
        workers = getattr(ctx.train_data, "num_workers", 0)
        if workers:
            warnings.warn(
                f"resuming inside epoch {point.epoch} with a DataLoader of num_workers={workers}: the "
                "batches are the same, but random draws made in the workers (per-sample augmentation) "
                "start from the workers' seeds again, so the rest of this epoch is not bit-identical "
                "to an uninterrupted run (from the next epoch on it is)",
                RuntimeWarning,
                stacklevel=2,
            )
        problem = fast_forward_problem(ctx.train_data)
        if problem is not None:
            warnings.warn(
                f"the checkpoint was taken after batch {point.batches_done} of epoch {point.epoch}, "
                f"but the training data cannot be resumed at a batch: {problem}; epoch "
                f"{point.epoch} runs again from its start (from the weights of the checkpoint). "
                "Pass a Dataset, tensors, a list of batches or a DataLoader with torch's samplers "
                "to resume at the next batch",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
    return point


def evaluate_loop(
    ctx: Context,
    data: Iterable[Any],
    valid: Step,
    allowed: Collection[str] | None,
    routing: Routing = YIELD_ALL,
) -> Loop:
    """One validation pass: ``on_valid_begin`` .. ``on_valid_end``."""
    ctx.metrics = {}
    return _phase(ctx, "valid", data, valid, allowed, routing, last=True)


def predict_loop(
    ctx: Context,
    data: Iterable[Any],
    predict: Step,
    allowed: Collection[str] | None,
    routing: Routing = YIELD_ALL,
) -> Loop:
    """One prediction pass: ``on_predict_begin`` .. ``on_predict_end``; the outputs are
    concatenated into ``ctx.predictions`` before ``on_predict_end``."""
    return _phase(ctx, "predict", data, predict, allowed, routing, last=True)


def concat(outputs: list[Any]) -> Any:
    """Concatenate per-batch outputs along the first dimension, leaf by leaf, on the CPU."""
    first = outputs[0]
    if isinstance(first, _Tensor):
        return torch.cat([o if o.ndim else o.reshape(1) for o in outputs]).cpu()
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(concat([o[i] for o in outputs]) for i in range(len(first))))
    if isinstance(first, tuple):
        return type(first)(concat([o[i] for o in outputs]) for i in range(len(first)))
    if isinstance(first, list):  # one entry per sample (e.g. detection models): join the lists
        return [item for output in outputs for item in output]
    if isinstance(first, Mapping):
        return {k: concat([o[k] for o in outputs]) for k in first}
    return list(outputs)

"""torch.compile in corolux: the ``Trainer(compile=...)`` argument, the compiled forward a run
installs on the user's module, and torch's own compile counters.

What is compiled is the model's ``forward`` and nothing else: the loop, the callbacks, the loss
and the optimizer step run eagerly, so no corolux code is ever traced (``fullgraph=True``
holds for any model whose own forward has no graph break). While a run of the trainer is open
the compiled forward is the module's instance attribute ``forward``, as ``torch.compile(model)``
does on its ``OptimizedModule``: ``model(x)`` (the default step, a custom step, a callback)
runs the module's hooks eagerly and the forward compiled, the module's ``state_dict()`` has no
prefixes, and ``ctx.model`` is the user's module. When the run ends (in every outcome) the
attribute is removed; a deep copy or pickle of the module taken during a run gets the plain
forward (``torch.optim.swa_utils.AveragedModel(ctx.model)`` in a callback works).

Under DDP the compiled function is the user's module's forward, which the
``DistributedDataParallel`` wrapper calls inside its forward: dynamo's ``DDPOptimizer`` splits
the graph at the gradient buckets just as for ``torch.compile(ddp_model)`` (it looks for the
DDP module whose forward is running), while DDP's own Python (its reducer's bookkeeping, which
dynamo cannot trace: a graph break under ``fullgraph=True``) stays outside the compiled region;
``evaluate()`` and ``predict()``, which call the module itself, use the same compiled function.

``compile="step"`` compiles more: the default train and valid steps call
``corolux.loop.forward_and_loss`` compiled (the forward and the loss, one graph), so no callback
may listen between the two (``check_listeners``); ``predict()`` installs the forward as above.

The counters: ``compile_counts()`` reads dynamo's own (``torch._dynamo.utils.counters``) into a
``CompileCounts``; two readings subtract (``Profile`` does so per phase).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from corolux._suggest import did_you_mean

__all__ = [
    "CompileCounts",
    "CompileOptions",
    "CompiledForward",
    "check_listeners",
    "compile_counts",
    "compile_forward",
    "compile_function",
    "fused_steps",
    "installed",
    "options",
    "run_scope",
]

# torch.compile's keyword arguments (mode, dynamic, fullgraph, backend, options, ...), read
# from the torch installed, so that what it accepts is what compile={...} accepts.
COMPILE_KEYWORDS: tuple[str, ...] = tuple(
    name
    for name, parameter in inspect.signature(torch.compile).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY
)

_FIX = (
    "pass compile=False to train eagerly, or compile={'backend': 'aot_eager'} to trace without "
    "generating code"
)


STEP = "step"  # compile="step": the forward and the loss as one graph


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """What ``Trainer(compile=...)`` asks for: ``torch.compile``'s keyword arguments, and
    whether the default steps compile their forward and loss as one graph (``"step"``)
    rather than the model's forward alone."""

    kwargs: Mapping[str, Any]
    step: bool = False
    given: Any = True  # the argument as given (for messages)

    @property
    def backend(self) -> Any:
        return self.kwargs.get("backend") or "inductor"


def options(compile: bool | str | Mapping[str, Any], model: torch.nn.Module) -> CompileOptions | None:
    """Check ``Trainer(compile=...)``: None for ``False``; else what to compile, with which
    ``torch.compile`` arguments. ``True`` is the forward with torch's defaults, a dict gives
    the arguments (its key ``"step": True`` compiles the step, as ``"step"`` does).

    Raises:
        TypeError: ``compile`` is not a bool, ``"step"`` or a dict.
        ValueError: a key ``torch.compile`` does not take, or a model that is compiled already.
        RuntimeError: ``torch.compile`` does not work on this Python or platform.

    Example:
        >>> options({"mode": "max-autotune"}, torch.nn.Linear(2, 2)).kwargs
        {'mode': 'max-autotune'}
        >>> options({"fulgraph": True}, torch.nn.Linear(2, 2))
        Traceback (most recent call last):
        ...
        ValueError: compile={'fulgraph': True}: torch.compile takes no argument 'fulgraph';
            did you mean 'fullgraph'? ...
    """
    if compile is False:
        return None
    if compile is True or compile == STEP:
        kwargs: dict[str, Any] = {}
        step = compile == STEP
    elif isinstance(compile, Mapping):
        kwargs = dict(compile)
        step = kwargs.pop(STEP, False)
        if not isinstance(step, bool):
            raise TypeError(f"compile={compile!r}: 'step' must be True or False, got {step!r}")
        for key in kwargs:
            if key not in COMPILE_KEYWORDS:
                raise ValueError(
                    f"compile={compile!r}: torch.compile takes no argument {key!r};"
                    f"{did_you_mean(str(key), (*COMPILE_KEYWORDS, STEP)) or ''} it takes: "
                    f"{', '.join(COMPILE_KEYWORDS)} (and corolux's 'step')"
                )
    else:
        hint = f"compile={{'mode': {compile!r}}}" if isinstance(compile, str) else "compile=True"
        raise TypeError(
            f"compile must be False, True, 'step' or a dict of torch.compile's arguments, got "
            f"{compile!r}; e.g. {hint}"
        )
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise RuntimeError(
            f"compile={compile!r}: torch.compile does not work with this PyTorch "
            f"{torch.__version__} on Python {sys.version.split()[0]} ({sys.platform}); "
            "use a Python and PyTorch that torch.compile supports (see the torch.compiler docs), "
            "or pass compile=False"
        )
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise ValueError(
            f"compile={compile!r}: the model is compiled already (torch.compile(model) returned "
            "it), and corolux would compile it a second time; pass the plain module with "
            "compile=True (or a dict of options), or keep torch.compile(model) and compile=False"
        )
    if model.__dict__.get("_compiled_call_impl") is not None:
        raise ValueError(
            f"compile={compile!r}: the model was compiled in place (model.compile(), which compiles "
            "its hooks too); drop model.compile() and pass compile=True, or keep it and compile=False"
        )
    return CompileOptions(kwargs, step, compile)


# -- the compiled forward ----------------------------------------------------------------------


class CompiledForward:
    """A function under ``torch.compile`` (the model's forward a run installs, or the fused
    forward and loss of ``compile="step"``); nothing is compiled until its first call."""

    __slots__ = ("function", "options", "what")

    def __init__(self, function: Callable[..., Any], options: CompileOptions, what: str) -> None:
        self.function = function
        self.options = options
        self.what = what  # for messages: "model's forward", or the step's "forward and loss"

    def failure_note(self) -> str:
        """The note a compiler failure gets: what failed, and the fix."""
        backend = self.options.backend
        if backend == "inductor":
            need = (
                "torch.compile's default backend, inductor, generates code: on the CPU it needs a "
                "working C++ compiler (install g++ or clang, or set CXX), on a GPU triton; "
            )
        else:
            need = f"the backend {backend!r} failed (see the error above); "
        given = self.options.given
        return f"corolux: Trainer(compile={given!r}) could not compile the {self.what}: {need}{_FIX}"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True
        try:
            return self.function(*args, **kwargs)
        except Exception as exc:  # (free when nothing is raised)
            if isinstance(exc, torch._dynamo.exc.BackendCompilerFailed):
                exc.add_note(self.failure_note())
            raise

    def __repr__(self) -> str:
        return f"CompiledForward(compile={self.options.given!r})"


def compile_function(function: Callable[..., Any], options: CompileOptions, what: str) -> CompiledForward:
    """``torch.compile(function, **options.kwargs)`` (``what`` it is, for messages);
    ``torch.compile``'s own errors (an unknown mode or backend) are raised here, noted with
    the argument."""
    try:
        return CompiledForward(torch.compile(function, **options.kwargs), options, what)
    except Exception as exc:
        exc.add_note(f"in corolux.Trainer(compile={options.given!r})")
        raise


def compile_forward(module: torch.nn.Module, options: CompileOptions) -> CompiledForward:
    """The module's forward compiled, for ``installed``: its own (an instance attribute the
    user set, or the class's), never one a run has installed."""
    forward = module.__dict__.get("forward", _MISSING)
    while isinstance(forward, _Installed):
        forward = forward.previous
    if forward is _MISSING:
        forward = type(module).forward.__get__(module)
    return compile_function(forward, options, "model's forward")


_MISSING: Any = object()


class _Installed:
    """The module's ``forward`` while a run is open: calls the compiled function.

    A deep copy or a pickle of the module gets its plain forward instead (``__reduce__``), so
    a copy never calls into the original module's compiled code.
    """

    __slots__ = ("active", "compiled", "module", "previous")

    def __init__(self, module: torch.nn.Module, compiled: CompiledForward, previous: Any) -> None:
        self.module = module
        self.compiled = compiled
        self.previous = previous  # the instance attribute it replaced (_MISSING: none)
        self.active = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True
        return self.compiled(*args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_plain_forward, (self.module,))


def _plain_forward(module: torch.nn.Module) -> Callable[..., Any]:
    """What a copy of a module taken during a run gets as ``forward``: its class's."""
    return type(module).forward.__get__(module)


@contextlib.contextmanager
def installed(module: torch.nn.Module, compiled: CompiledForward) -> Iterator[None]:
    """Make ``compiled`` the forward of ``module`` for the block; afterwards the module is as
    it was (no instance ``forward``, or the one it had).

    Runs of two trainers over one module may overlap (a stepper of each, or a run inside a
    callback of another): each installs over the current forward and, when it ends, restores
    the forward it replaced unless another run has installed over it since (that one restores
    it later, skipping the runs that have ended).
    """
    previous = module.__dict__.get("forward", _MISSING)
    entry = _Installed(module, compiled, previous)
    module.forward = entry  # type: ignore[method-assign]
    try:
        yield
    finally:
        entry.active = False
        if module.__dict__.get("forward") is entry:
            while isinstance(previous, _Installed) and not previous.active:
                previous = previous.previous
            if previous is _MISSING:
                del module.forward
            else:
                module.forward = previous  # type: ignore[method-assign]


def run_scope(
    compiled: CompiledForward | None, module: torch.nn.Module, kind: str
) -> contextlib.AbstractContextManager[None] | None:
    """What a run of ``kind`` (``"fit"``, ``"evaluate"``, ``"predict"``) installs: the compiled
    forward, if any (with ``compile="step"``, in ``predict()`` only: the steps of fit and
    evaluate call their fused forward and loss)."""
    if compiled is None or (compiled.options.step and kind != "predict"):
        return None
    return installed(module, compiled)


# -- compile="step" ------------------------------------------------------------------------------

_STEP_STAGES = ("on_train_batch_after_pred", "on_valid_batch_after_pred")


def fused_steps(
    options: CompileOptions,
    forward_and_loss: Callable[[Any, Any], tuple[Any, Any]],
    steps: Mapping[str, tuple[bool, Callable[..., Any]]],
    *,
    distributed: bool,
) -> dict[str, Callable[..., Any]]:
    """``compile="step"``: the default steps (``steps``: phase -> (custom, default step)),
    each given the compiled ``forward_and_loss`` as ``fused``.

    Raises:
        ValueError: a custom step (whose forward and loss corolux does not see), or DDP
            (whose forward would be traced).
    """
    custom = [f"{phase}_step" for phase, (is_custom, _) in steps.items() if is_custom]
    if custom:
        raise ValueError(
            f"compile={options.given!r} compiles the forward and the loss of the default steps, but "
            f"this trainer has its own {custom[0]}; pass compile=True: the ctx.model(x) calls of a "
            "custom step get the compiled forward"
        )
    if distributed:
        raise ValueError(
            f"compile={options.given!r} is not available under DDP (DDP's own forward would be "
            "traced); pass compile=True: DDP calls the compiled forward of your module"
        )
    fused = compile_function(forward_and_loss, options, "step's forward and loss")
    return {phase: functools.partial(default, fused=fused) for phase, (_, default) in steps.items()}


def check_listeners(options: CompileOptions | None, listeners: Callable[[str], Sequence[Any]]) -> None:
    """``compile="step"`` computes ``ctx.pred`` and ``ctx.loss`` in one call: refuse a run whose
    callbacks listen between them (``listeners``: the driver's, stage -> its callbacks)."""
    if options is None or not options.step:
        return
    for stage in _STEP_STAGES:
        owners = listeners(stage)
        if owners:
            names = ", ".join(dict.fromkeys(getattr(o, "name", None) or type(o).__name__ for o in owners))
            raise ValueError(
                f"Trainer(compile={options.given!r}) computes the forward and the loss in one compiled "
                f"call, so a change of ctx.pred at {stage!r} would not reach the loss, and {names} "
                f"listen(s) there; pass compile=True (the forward alone), or let the callback work at "
                f"{stage.replace('pred', 'loss')!r}"
            )


# -- counting ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CompileCounts:
    """torch.compile's work in this process, read from dynamo's own counters
    (``torch._dynamo.utils.counters``); subtract two readings for what happened in between.

    Attributes:
        compilations: graphs compiled (``counters["stats"]["unique_graphs"]``): one per
            function dynamo compiled, first compilation or recompilation, plus one per graph
            break in it. (Dynamo's count of frames, ``counters["frames"]``, is not used: it
            misses the compilations of ``fullgraph=True`` and of DDP's graph splitting.)
        recompiles: compilations of a frame that was compiled before, because its guards
            failed (a new batch size, train/eval mode, grad mode...).
        graph_breaks: graph breaks (``counters["graph_break"]``, every reason).
    """

    compilations: int = 0
    recompiles: int = 0
    graph_breaks: int = 0
    _per_frame: Mapping[Any, int] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def __add__(self, other: CompileCounts) -> CompileCounts:
        """Both counts together (e.g. a phase's over several epochs)."""
        return CompileCounts(
            compilations=self.compilations + other.compilations,
            recompiles=self.recompiles + other.recompiles,
            graph_breaks=self.graph_breaks + other.graph_breaks,
        )

    def __sub__(self, before: CompileCounts) -> CompileCounts:
        """What was compiled between the reading ``before`` and this one."""
        per_frame = self._per_frame
        recompiles = sum(max(0, n - max(before._per_frame.get(k, 0), 1)) for k, n in per_frame.items())
        return CompileCounts(
            compilations=max(0, self.compilations - before.compilations),
            recompiles=recompiles,
            graph_breaks=max(0, self.graph_breaks - before.graph_breaks),
        )


def compile_counts() -> CompileCounts:
    """Read torch's compile counters now: totals since the process started (or since
    ``torch._dynamo.reset()``, which clears the per-frame ones).

    Example:
        >>> before = compile_counts()
        >>> trainer.fit(data, epochs=3, valid_data=valid)              # doctest: +SKIP
        >>> compile_counts() - before                                  # doctest: +SKIP
        CompileCounts(compilations=3, recompiles=2, graph_breaks=0)
    """
    if "torch._dynamo" not in sys.modules:  # nothing can have been compiled (and reading costs no import)
        return CompileCounts()
    from torch._dynamo.utils import counters

    per_frame: Mapping[Any, int] = dict(getattr(torch._dynamo.convert_frame, "FRAME_COMPILE_COUNTER", {}))
    return CompileCounts(
        compilations=int(counters["stats"].get("unique_graphs", 0)),
        recompiles=sum(max(0, n - 1) for n in per_frame.values()),
        graph_breaks=int(sum(counters["graph_break"].values())),
        _per_frame=per_frame,
    )

"""Checkpoints: the full training state of a run, written atomically, read safely.

``save(ctx, path)`` writes what a run needs to continue exactly: the model (unwrapped: no
``module.`` or ``_orig_mod.`` prefixes), every optimizer, the GradScaler, the counters, the
history, every stateful callback's ``state_dict()`` (keyed by :func:`callback_key`), the RNG
states (torch CPU and every CUDA device, Python ``random``, NumPy) and, for a checkpoint taken
inside an epoch, where its data stood (see :class:`ResumePoint`). ``load(ctx, path)`` restores
it all; the loop then continues at the next batch. :func:`load_weights` restores only the
model, optimizers and GradScaler (``trainer.load_checkpoint``).

Files hold tensors and plain Python values only, so ``torch.load(path, weights_only=True)``
reads them with no allow-listing, and corolux never reads a file any other way: a file that
would run code when unpickled is refused, never run.

Example:
    >>> corolux.checkpoint.save(ctx, "run.pt")          # doctest: +SKIP
    >>> corolux.checkpoint.load(ctx, "run.pt")          # doctest: +SKIP
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import pickle
import random
import socket
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from corolux import distributed
from corolux.context import Context
from corolux.data import generators_of
from corolux.events import BATCH_ENDS

__all__ = [
    "CheckpointError",
    "ResumePoint",
    "callback_key",
    "capture",
    "check_weights",
    "load",
    "load_weights",
    "publish",
    "read",
    "restore",
    "resume",
    "rng_snapshot",
    "rng_state",
    "save",
    "set_rng_state",
    "unwrap",
    "weights_state",
    "write",
]

#: The marker of a corolux checkpoint and the version of its layout.
FORMAT = "corolux-checkpoint"
VERSION = 1

PathLike = str | os.PathLike[str]


class CheckpointError(ValueError):
    """A file that is not a loadable corolux checkpoint, or one that does not fit this run."""


@dataclasses.dataclass
class ResumePoint:
    """Where a checkpoint taken inside an epoch stood: the loop continues ``epoch`` at batch
    ``batches_done + 1`` of its training (``phase`` ``"train"``), or, for one taken during the
    epoch's validation (``"valid"``), runs that validation again.

    ``data_state`` is what the epoch's pass over the training data drew from at its start
    (``corolux.data.pass_state``), so the same order can be replayed and the batches already
    trained skipped by index; ``rng`` is the RNG state at the save, set again once they are
    skipped; ``metrics`` is what ``ctx.log`` had recorded in the epoch so far.
    """

    epoch: int
    phase: str
    batches_done: int
    data_state: dict[str, Any] | None
    rng: dict[str, Any]
    metrics: dict[str, Any]


# -- the model -------------------------------------------------------------------------------


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside DDP/DataParallel (``.module``) and ``torch.compile``
    (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            inner = model.module
        else:
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def _model_state(model: torch.nn.Module) -> dict[str, Any]:
    """The state dict of the unwrapped model, without ``_orig_mod.``/``module.`` segments left
    by wrapped submodules."""
    state = unwrap(model).state_dict()
    return {_plain_key(k): v for k, v in state.items()}


def _plain_key(key: str) -> str:
    parts = [p for p in key.split(".") if p != "_orig_mod"]
    return ".".join(parts)


# -- capture ---------------------------------------------------------------------------------


def callback_key(callbacks: list[Any]) -> list[str]:
    """The stable key of each callback's saved state: its ``state_key`` attribute when it
    has one, else its class name; a second callback of the same key gets ``"#2"``, in the
    run's callback order. Saved states are matched to callbacks by these keys."""
    keys: list[str] = []
    seen: dict[str, int] = {}
    for cb in callbacks:
        base = getattr(cb, "state_key", None) or type(cb).__name__
        seen[base] = seen.get(base, 0) + 1
        keys.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return keys


def _stateful(callbacks: list[Any]) -> dict[str, Any]:
    """The callbacks that have state to save, by key."""
    return {
        key: cb
        for key, cb in zip(callback_key(callbacks), callbacks, strict=True)
        if callable(getattr(cb, "state_dict", None)) and callable(getattr(cb, "load_state_dict", None))
    }


def rng_snapshot() -> dict[str, Any]:
    """The RNG states of torch (CPU, every CUDA device), Python ``random`` and NumPy as those
    libraries give them: cheaper to take than :func:`rng_state` (no conversion), for keeping in
    memory (a rewind, an anomaly capture); :func:`rng_state` turns one into the plain form of
    a checkpoint. No host-device sync (a CUDA generator's state is its seed and offset)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    numpy = _numpy()
    if numpy is not None:
        state["numpy"] = numpy.random.get_state(legacy=True)
    return state


def rng_state(snapshot: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The RNG states of torch (CPU, every CUDA device), Python ``random`` and NumPy, as
    tensors and plain values (what checkpoints hold): the current ones, or those of a
    :func:`rng_snapshot`."""
    raw = rng_snapshot() if snapshot is None else snapshot
    version, internal, gauss = raw["python"]
    state: dict[str, Any] = {"torch": raw["torch"], "python": (version, list(internal), gauss)}
    if "cuda" in raw:
        state["cuda"] = raw["cuda"]
    if "numpy" in raw:
        kind, keys, pos, has_gauss, gauss = raw["numpy"]
        state["numpy"] = {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        }
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (the parts this machine has)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            warnings.warn(
                f"the checkpoint holds the RNG states of {len(cuda)} CUDA device(s), this machine "
                f"has {torch.cuda.device_count()}: CUDA RNG states restored for "
                f"{min(len(cuda), torch.cuda.device_count())} only",
                RuntimeWarning,
                stacklevel=3,
            )
        for index, device_state in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, index)
    saved = state.get("numpy")
    numpy = _numpy()
    if saved is not None and numpy is not None:
        keys = saved["keys"].numpy().astype("uint32")
        numpy.random.set_state((saved["kind"], keys, saved["pos"], saved["has_gauss"], saved["gauss"]))


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def weights_state(ctx: Context) -> dict[str, Any]:
    """The model (unwrapped), the optimizers and the GradScaler of ``ctx``: what
    :func:`load_weights` restores."""
    scaler = ctx.precision.scaler
    return {
        "model": _model_state(ctx.model),
        "optimizers": {name: opt.state_dict() for name, opt in ctx.optimizers.items()},
        "optimizer_types": {name: type(opt).__qualname__ for name, opt in ctx.optimizers.items()},
        "scaler": None if scaler is None else scaler.state_dict(),
    }


def capture(
    ctx: Context, *, weights: bool = True, batch_start: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The full training state of ``ctx``'s run, as tensors and plain values (what
    :func:`save` writes); without ``weights``, all but the model, optimizers and GradScaler
    (``resume_from="last"``, where they are live). Tensors are the live ones (no copies):
    write or copy the result before training goes on.

    ``batch_start`` is the :func:`rng_snapshot` taken as the current training batch began:
    the state is then that batch's start, taken inside it before its optimizer step (what
    ``CaptureAnomaly`` writes): that RNG state, and the batch counted as not done.

    Raises:
        RuntimeError: inside a batch before its ``*_batch_end`` (its step is half done),
        unless ``batch_start`` is given. At ``on_train_batch_end`` the checkpoint holds the
        batch as done; the handlers of that stage that run after the save do not run for it
        again after a resume (which is why ``AutoResume`` saves once they all ran:
        ``ctx.after_stage``).
    """
    if batch_start is None and ctx.in_batch and ctx.stage not in BATCH_ENDS:
        raise RuntimeError(
            f"a checkpoint cannot be taken inside a batch (at {str(ctx.stage)!r}): its step is "
            "half done; save at on_train_batch_end or later (AutoResume(every_n_steps=...) does)"
        )
    if ctx.kind == "fit" and ctx.accumulate_steps > 1 and ctx.gradients_pending:
        warnings.warn(
            f"a checkpoint taken inside a gradient-accumulation window (at {str(ctx.stage)!r}, epoch "
            f"{ctx.epoch}, batch {ctx.iter}) does not hold the gradients accumulated so far: a resume "
            "from it trains that window without them. Save after an optimizer step (AutoResume does)",
            RuntimeWarning,
            stacklevel=3,
        )
    stateful = _stateful(ctx.callbacks)
    return {
        "format": FORMAT,
        "version": VERSION,
        **(weights_state(ctx) if weights else {"model": None, "optimizers": None, "scaler": None}),
        "counters": {
            "epoch": ctx.epoch,
            "completed_epochs": ctx.completed_epochs,
            "step": ctx.step,
            "stop_reason": ctx.stop_reason,  # given by the time of the save (None: training goes on)
        },
        "history": ctx.history.state_dict(),
        "callbacks": {key: cb.state_dict() for key, cb in stateful.items()},
        # callbacks whose state differs between DDP ranks (the metrics' sums): saved per rank
        "per_rank": [key for key, cb in stateful.items() if getattr(cb, "per_rank_state", False)],
        "rng": rng_state(batch_start),
        "data_generators": _data_generators(ctx),
        "position": _position(ctx, current_done=batch_start is None),
    }


def _data_generators(ctx: Context) -> dict[str, list[torch.Tensor | None]]:
    """The states of the generators of the run's DataLoaders (their next epoch draws from
    them), by role."""
    return {
        role: [None if g is None else g.get_state() for g in generators_of(data)]
        for role, data in (("train", ctx.train_data), ("valid", ctx.valid_data))
        if generators_of(data)
    }


def _position(ctx: Context, current_done: bool = True) -> dict[str, Any] | None:
    """Where inside an epoch the run stands, or None between epochs (and before an epoch's
    pass over the training data began, which resumes at the epoch's start); without
    ``current_done``, the current batch counts as not done (a state of its start)."""
    if ctx.kind != "fit" or ctx.data_state is None or ctx.epoch <= ctx.completed_epochs:
        return None
    done = ctx.iter if current_done else ctx.iter - 1
    if ctx.phase == "train" and ctx.skipped and ctx.history.interrupted:
        done -= 1  # the batch Ctrl-C cut is not trained: it runs again
    return {
        "epoch": ctx.epoch,
        "phase": ctx.phase,
        "batches_done": done,
        "data_state": ctx.data_state,
        "metrics": dict(ctx.metrics),
    }


# -- restore ---------------------------------------------------------------------------------


def load_weights(ctx: Context, source: PathLike | Mapping[str, Any]) -> Mapping[str, Any]:
    """Restore the model, the optimizers and the GradScaler from a checkpoint (a path, or
    what :func:`read` returned); return the checkpoint. Everything is checked before
    anything changes: a checkpoint of another model or optimizer is refused with its first
    differences listed."""
    state = read(source) if isinstance(source, (str, os.PathLike)) else source
    where = _where(source)
    check_weights(ctx, state)
    model = unwrap(ctx.model)
    scaler = ctx.precision.scaler
    if scaler is None and state["scaler"] is not None:
        warnings.warn(
            f"{where} holds a GradScaler state (precision '16-mixed') but this trainer has no "
            "GradScaler; its loss scale is not restored",
            RuntimeWarning,
            stacklevel=3,
        )
    model.load_state_dict(state["model"])
    for name, opt in ctx.optimizers.items():
        opt.load_state_dict(state["optimizers"][name])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    return state


def check_weights(ctx: Context, state: Mapping[str, Any]) -> None:
    """Raise :class:`CheckpointError` when the checkpoint's model or optimizers are not
    ``ctx``'s (missing or unexpected keys, other shapes, other optimizers), with the first
    differences listed (``state`` as :func:`read` returned it)."""
    where = _where(state)
    _check_model(unwrap(ctx.model), state["model"], where)
    if ctx.optimizers:  # a trainer without one (for evaluate or predict) takes the model alone
        _check_optimizers(ctx.optimizers, state["optimizers"], state["optimizer_types"], where)


def _where(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return repr(str(source))
    return repr(source["source"]) if isinstance(source, Mapping) and "source" in source else "the checkpoint"


def check_callbacks(ctx: Context, state: Mapping[str, Any]) -> Mapping[str, Any]:
    """Raise :class:`CheckpointError` when the checkpoint holds the state of a callback this
    run does not have; warn about stateful callbacks it holds no state for. Returns the saved
    states by key."""
    where = _where(state)
    callbacks = _stateful(ctx.callbacks)
    saved = state["callbacks"]
    missing = [key for key in saved if key not in callbacks]
    if missing:
        raise CheckpointError(
            f"{where} holds the state of callback(s) {missing} that this run does not have; "
            f"pass them in callbacks= as when it was saved (this run's stateful callbacks: "
            f"{sorted(callbacks) or 'none'}), or give a state_key to match one that was renamed"
        )
    fresh = [key for key in callbacks if key not in saved]
    if fresh:
        warnings.warn(
            f"{where} holds no state for callback(s) {fresh}: they start fresh",
            RuntimeWarning,
            stacklevel=5,
        )
    return saved


def restore(ctx: Context, state: Mapping[str, Any]) -> ResumePoint | None:
    """Restore a checkpoint's state (what :func:`read` or :func:`capture` returned) into
    ``ctx``: the model, optimizers and GradScaler when it holds them (the in-memory state of
    ``resume_from="last"`` does not: they are live), then the counters, history, callbacks'
    states and RNG. Everything is checked before anything changes. Returns the mid-epoch
    position, None for a checkpoint taken between epochs.

    Raises:
        CheckpointError: another model or optimizers, or a callback whose state the
            checkpoint holds is not in this run.
    """
    callbacks = _stateful(ctx.callbacks)
    saved = check_callbacks(ctx, state)
    if state.get("model") is not None:
        load_weights(ctx, state)
    rank = _saved_rank(state)
    own = _rank_states(state, callbacks, rank)
    for key, cb_state in saved.items():
        callbacks[key].load_state_dict(own.get(key, cb_state))
    counters = state["counters"]
    ctx.completed_epochs = counters["completed_epochs"]
    ctx.step = counters["step"]
    history = ctx.history
    history.load_state_dict(state["history"])
    history.completed_epochs = ctx.completed_epochs
    history.interrupted, history.stop_reason = False, None  # how this run ends is its own
    for role, states in state.get("data_generators", {}).items():
        data = ctx.train_data if role == "train" else ctx.valid_data
        for generator, saved_state in zip(generators_of(data), states, strict=False):
            if generator is not None and saved_state is not None:
                generator.set_state(saved_state)
    rng = state["rng"] if rank is None else state["rng_ranks"][rank]
    set_rng_state(rng)
    point = state["position"]
    # The records kept are those of the epochs before the one the run continues: an epoch cut
    # short (Ctrl-C, a stop) between epochs runs again from its start, and its record goes.
    last = ctx.completed_epochs if point is None else point["epoch"] - 1
    history.records = [r for r in history.records if r["epoch"] <= last]
    if point is None:
        return None
    return ResumePoint(
        epoch=point["epoch"],
        phase=point["phase"],
        batches_done=point["batches_done"],
        data_state=point["data_state"],
        rng=dict(rng),
        metrics=dict(point["metrics"]),
    )


def _rank_states(state: Mapping[str, Any], callbacks: Mapping[str, Any], rank: int | None) -> dict[str, Any]:
    """The states of the callbacks kept per rank that this process takes: its own when the
    run has as many processes as the one that saved; else what each callback's
    ``reshard_state(states, rank, world)`` makes of all the saved ones (``MetricsTracker``:
    rank 0 takes the sums over the saved ranks, the others none, so the epoch's metrics stay
    exact, one process included). A callback without that hook takes rank 0's."""
    saved_ranks = state.get("callbacks_ranks")
    if saved_ranks is None:
        return {}
    if rank is not None:
        return dict(saved_ranks[rank])
    here, world = distributed.rank_and_world()
    resharded = {}
    for key in state.get("per_rank", ()):
        reshard = getattr(callbacks.get(key), "reshard_state", None)
        if callable(reshard):
            resharded[key] = reshard([states[key] for states in saved_ranks], here, world)
    return resharded


def _saved_rank(state: Mapping[str, Any]) -> int | None:
    """Which of a DDP run's per-rank entries (``"rng_ranks"``, ``"callbacks_ranks"``) are this
    process's; None when the file has none for a run of this size (every rank then takes the
    saving process's, rank 0's)."""
    ranks = state.get("rng_ranks")
    if ranks is None or not distributed.is_distributed():
        return None
    rank, world = distributed.rank_and_world()
    if len(ranks) != world:
        warnings.warn(
            f"{_where(state)} was saved by {len(ranks)} processes, this run has {world}: every rank "
            "starts from rank 0's RNG (the run is not bit-identical to one of the saved size; the "
            "epoch's metric sums are combined, so they stay exact)",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
    return rank


def resume(ctx: Context, source: PathLike | Mapping[str, Any]) -> ResumePoint | None:
    """:func:`restore` a checkpoint given as a path or as a state."""
    return restore(ctx, read(source) if isinstance(source, (str, os.PathLike)) else source)


def load(ctx: Context, path: PathLike) -> ResumePoint | None:
    """Restore everything :func:`save` wrote into ``ctx``: model, optimizers, GradScaler,
    then the training state (:func:`restore`). Returns the mid-epoch position, if any."""
    return resume(ctx, path)


def _check_model(model: torch.nn.Module, saved: Mapping[str, Any], where: str) -> None:
    own = model.state_dict()
    problems = [f"missing {k!r}" for k in own if k not in saved]
    problems += [f"unexpected {k!r}" for k in saved if k not in own]
    for key, value in own.items():
        other = saved.get(key)
        if isinstance(value, torch.Tensor) and isinstance(other, torch.Tensor) and other.shape != value.shape:
            problems.append(f"{key!r}: shape {tuple(other.shape)} in the file, {tuple(value.shape)} here")
    if problems:
        raise CheckpointError(
            f"{where} is a checkpoint of another model ({type(model).__name__} here): "
            f"{_first(problems)}; build the model as it was when the checkpoint was saved"
        )


def _check_optimizers(
    optimizers: Mapping[str, torch.optim.Optimizer],
    saved: Mapping[str, Any],
    types: Mapping[str, str],
    where: str,
) -> None:
    if set(optimizers) != set(saved):
        raise CheckpointError(
            f"{where} holds optimizer(s) {sorted(saved)}, this trainer has {sorted(optimizers)}; "
            "give the trainer the optimizers it was saved with"
        )
    problems: list[str] = []
    for name, opt in optimizers.items():
        groups = saved[name].get("param_groups", [])
        own = [len(g["params"]) for g in opt.param_groups]
        theirs = [len(g["params"]) for g in groups]
        if own != theirs:
            problems.append(f"{name!r}: parameters per group {theirs} in the file, {own} here")
        elif types.get(name, type(opt).__qualname__) != type(opt).__qualname__:
            problems.append(f"{name!r}: {types[name]} in the file, {type(opt).__qualname__} here")
    if problems:
        raise CheckpointError(f"{where} is a checkpoint of other optimizers: {_first(problems)}")


def _first(problems: list[str], shown: int = 5) -> str:
    more = len(problems) - shown
    return "; ".join(problems[:shown]) + (f"; and {more} more" if more > 0 else "")


# -- files -----------------------------------------------------------------------------------


def save(ctx: Context, path: PathLike) -> Path:
    """Write the full training state of ``ctx``'s run to ``path``, atomically (see
    :func:`write`); return the path. Call it between batches (``on_train_batch_end`` or
    later); a checkpoint taken inside an epoch resumes at the next batch. Under DDP call it
    on every rank (:func:`publish`)."""
    return publish(capture(ctx), path, main=ctx.is_main_process)


def publish(state: dict[str, Any], path: PathLike, *, main: bool = True) -> Path:
    """:func:`write` ``state`` on the main process (``main``); under DDP a collective first:
    every rank's RNG states, and the states of callbacks kept per rank, are gathered into it
    (``"rng_ranks"``, ``"callbacks_ranks"``), so that a resume gives each rank its own."""
    if distributed.is_distributed():
        state["rng_ranks"] = distributed.gather_objects(state["rng"])
        local = {key: state["callbacks"][key] for key in state.get("per_rank", ())}
        state["callbacks_ranks"] = distributed.gather_objects(local)
    return write(state, path) if main else Path(path)


def write(state: Mapping[str, Any], path: PathLike) -> Path:
    """Write ``state`` to ``path`` so that ``path`` always holds a whole checkpoint: a
    temporary file in the same folder, ``fsync``, ``os.replace``, ``fsync`` of the folder.
    A crash while writing leaves the previous file as it was.

    Raises:
        TypeError: ``state`` holds a value that ``torch.load(weights_only=True)`` would not
            read back (its place in the state is named).
    """
    target = Path(path)
    _check_plain(state, "checkpoint")
    folder = target.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write the checkpoint {str(target)!r}: no folder {str(folder)!r}")
    _remove_stale(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".{_WRITER}.tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), 0o666 & ~_umask())  # as open() would make it, not mkstemp's 0600
            torch.save(dict(state), file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)
    return target


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory descriptors (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


#: Who writes a temporary file: this machine and process (a folder may be shared by several).
_WRITER = f"{socket.gethostname().replace('.', '_')}-{os.getpid()}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_stale(target: Path) -> None:
    """Remove the temporary files that earlier writes of ``target`` on this machine left when
    their process was killed (``.<name>.<random>.<host>-<pid>.tmp``)."""
    host = _WRITER.rsplit("-", 1)[0]
    for tmp in target.parent.glob(f".{target.name}.*.tmp"):
        writer = tmp.name[len(target.name) + 2 : -len(".tmp")].partition(".")[2]
        their_host, _, pid = writer.rpartition("-")
        if their_host == host and pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                tmp.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


#: The types torch.load(weights_only=True) reads back, checked exactly: a subclass (an IntEnum, a
#: NumPy float64, a namedtuple, a defaultdict) pickles as its own class, which it refuses.
_PLAIN = frozenset({str, int, float, bool, bytes, complex, type(None), torch.dtype, torch.device, torch.Size})
_MAPPINGS = frozenset({dict, collections.OrderedDict})
_SEQUENCES = frozenset({list, tuple, set, frozenset})


def _check_plain(value: Any, where: str) -> None:
    kind = type(value)
    if kind in _PLAIN or isinstance(value, torch.Tensor):  # tensors and Parameters
        return
    if kind in _MAPPINGS:
        for key, item in value.items():
            if type(key) not in (str, int, float, bool, type(None)):
                raise TypeError(f"{where} has a key {key!r} of type {type(key).__name__}: {_hint(where)}")
            _check_plain(item, f"{where}[{key!r}]")
        return
    if kind in _SEQUENCES:
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
        return
    raise TypeError(f"{where} is a {kind.__module__}.{kind.__qualname__}: {_hint(where)}")


def _hint(where: str) -> str:
    fix = (
        "log a number, a string or a tensor with ctx.log"
        if where.startswith("checkpoint['history']")
        else "make the state_dict() that returns it convert the value (a NumPy value with .item() or "
        "torch.from_numpy, an enum with .value, an object to a dict of its fields)"
    )
    return (
        "a checkpoint holds tensors and plain Python values only (str, int, float, bool, None, "
        f"lists, tuples, dicts), so that torch.load(weights_only=True) reads it back without running "
        f"code; {fix}"
    )


def read(path: PathLike) -> dict[str, Any]:
    """Read a corolux checkpoint with ``torch.load(weights_only=True)``: nothing in the file
    runs. A missing, truncated, corrupt, foreign or code-carrying file is refused with an
    error that names the path and what is wrong."""
    name = str(path)
    if not os.path.exists(name):
        raise FileNotFoundError(f"no checkpoint at {name!r}")
    try:
        with warnings.catch_warnings():  # torch's remarks on a file it then refuses: the error says it
            warnings.simplefilter("ignore")
            state = torch.load(name, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc) or "Unsupported global" in str(exc):
            raise CheckpointError(
                f"{name!r} was refused: loading it would run code or build objects other than "
                "tensors and plain values (corolux loads with weights_only=True and never runs "
                "what a file holds); it is not a checkpoint corolux wrote"
            ) from None
        raise _corrupt(name, exc) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise _corrupt(name, exc) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        keys = sorted(map(str, state))[:5] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{name!r} is not a corolux checkpoint (it holds {keys}); a plain state dict of a "
            "model loads with model.load_state_dict(torch.load(path, weights_only=True))"
        )
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"{name!r} is a corolux checkpoint of layout version {state.get('version')!r}; this "
            f"corolux reads version {VERSION}: use the corolux that wrote it"
        )
    state["source"] = name  # named in later messages; not written back
    return state


def _corrupt(name: str, exc: BaseException) -> CheckpointError:
    size = os.path.getsize(name)
    return CheckpointError(
        f"{name!r} cannot be read: truncated or corrupt ({size} bytes; {type(exc).__name__}: "
        f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); an interrupted copy, or a "
        "file that is not a checkpoint"
    )

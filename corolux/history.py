"""History: the per-epoch metric records of a run."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

__all__ = ["History", "finish_figure", "plain_value", "pyplot"]


class History:
    """Per-epoch metrics, named ``<phase>_<metric>`` (``train_loss``, ``valid_acc``).

    ``history[name]`` is the list of that value per epoch, ``nan`` where the phase did not
    run that epoch, so every list aligns with ``history["epoch"]``.

    How the run ended (the loop sets these as the run goes):

    - ``stop_reason``: None when training ran to its end, else why it stopped:
      ``"early_stopping"``, ``"max_steps"``, ``"interrupted"`` (Ctrl-C), ``"nan"``, or the
      reason given to ``ctx.stop_training(reason)``.
    - ``completed_epochs``: the number of full epochs, as ``ctx.completed_epochs``. An epoch
      cut short by a stop still has its record, so it shows as
      ``len(history) > history.completed_epochs``.
    - ``interrupted``: True when the run was stopped by Ctrl-C.

    Example:
        >>> h = History()
        >>> h.append({"epoch": 1, "train_loss": 0.9})
        >>> h.append({"epoch": 2, "train_loss": 0.5, "valid_loss": 0.6})
        >>> h["valid_loss"]
        [nan, 0.6]
        >>> h.last("train_loss")
        0.5
        >>> h.stop_reason, h.completed_epochs = "early_stopping", 2  # as the trainer sets them
        >>> h
        History(2 epochs, stopped: early_stopping; last: train_loss=0.5, valid_loss=0.6)
    """

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        #: True when the run was stopped by Ctrl-C.
        self.interrupted: bool = False
        #: Why training stopped early; None when it ran to its end.
        self.stop_reason: str | None = None
        #: The number of full epochs (an epoch cut short by a stop is not counted).
        self.completed_epochs: int = 0

    def append(self, record: dict[str, Any]) -> None:
        """Add one epoch's record (a dict with an ``"epoch"`` key)."""
        self.records.append(record)

    @property
    def names(self) -> list[str]:
        """Every metric name recorded in any epoch, in first-seen order (without ``epoch``)."""
        seen: dict[str, None] = {}
        for record in self.records:
            seen.update(dict.fromkeys(k for k in record if k != "epoch"))
        return list(seen)

    def __getitem__(self, name: str) -> list[Any]:
        if name != "epoch" and name not in self.names:
            raise KeyError(f"no metric {name!r} in the history; recorded: {self.names or 'none yet'}")
        return [plain_value(record.get(name, math.nan)) for record in self.records]

    def __contains__(self, name: object) -> bool:
        return name == "epoch" or name in self.names

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[str]:
        return iter(["epoch", *self.names])

    def last(self, name: str, default: Any = None) -> Any:
        """The value of ``name`` in the last epoch that recorded it, else ``default``."""
        for record in reversed(self.records):
            value = plain_value(record.get(name))
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                return value
        return default

    def to_dict(self) -> dict[str, list[Any]]:
        """``{"epoch": [1, 2, ...], name: [values...]}``."""
        return {name: self[name] for name in self}

    def state_dict(self) -> dict[str, Any]:
        """The records and how the run ended, as a plain dict (for checkpoints)."""
        return {
            "records": [dict(r) for r in self.records],
            "interrupted": self.interrupted,
            "stop_reason": self.stop_reason,
            "completed_epochs": self.completed_epochs,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; keys missing from older checkpoints
        take their defaults."""
        self.records = [dict(r) for r in state["records"]]
        self.interrupted = bool(state.get("interrupted", False))
        self.stop_reason = state.get("stop_reason")
        self.completed_epochs = int(state.get("completed_epochs", 0))

    def plot(self, path: str | None = None) -> Any:
        """Plot each metric per epoch, train and valid side by side (needs matplotlib).

        Returns the matplotlib ``Figure``; saves it as a PNG when ``path`` is given.
        """
        plt = pyplot(path, "History.plot()")
        metrics: dict[str, list[str]] = {}
        for name in self.names:
            phase, _, metric = name.partition("_")
            key = metric if phase in ("train", "valid") and metric else name
            metrics.setdefault(key, []).append(name)
        if not metrics:
            raise ValueError("History.plot(): nothing recorded yet; run fit() first")
        fig, axes = plt.subplots(len(metrics), 1, figsize=(6, 2.5 * len(metrics)), squeeze=False)
        epochs = self["epoch"]
        for ax, (metric, names) in zip(axes[:, 0], metrics.items(), strict=True):
            for name in names:
                ax.plot(epochs, self[name], marker="o", label=name)
            ax.set_ylabel(metric)
            ax.legend()
        axes[-1, 0].set_xlabel("epoch")
        return finish_figure(plt, fig, path)

    def __repr__(self) -> str:
        if not self.records:
            return "History(no epochs)"
        last = {k: v for k, v in self.records[-1].items() if k != "epoch"}
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v!r}" for k, v in last.items())
        flag = ""
        if self.stop_reason is not None:
            flag = f", stopped: {self.stop_reason}"
            if self.completed_epochs < len(self.records):
                flag += f" ({self.completed_epochs} completed)"
        elif self.interrupted:
            flag = ", interrupted"
        return f"History({len(self.records)} epochs{flag}; last: {shown})"


def pyplot(path: str | None, who: str) -> Any:
    """``matplotlib.pyplot`` (the file-only Agg backend when the figure goes to ``path``), or
    an ImportError that names ``who`` and the extra to install."""
    try:
        import matplotlib

        if path is not None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(f"{who} needs matplotlib: pip install 'corolux[plot]'") from None
    return plt


def finish_figure(plt: Any, fig: Any, path: str | None) -> Any:
    """Lay ``fig`` out; save it as a PNG at ``path`` (and close it) when given; return it."""
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
        plt.close(fig)
    return fig


def plain_value(value: Any) -> Any:
    """A one-element tensor (logged with ``ctx.log``) as a Python float; anything else as it is."""
    if getattr(value, "numel", None) is not None and value.numel() == 1:
        return float(value.detach())  # sync-ok: reading the history, off the training path
    return value

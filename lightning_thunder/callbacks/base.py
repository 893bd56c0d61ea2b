"""The hook plumbing the three monitors share: one class is a Trainer ``Callback`` and a Fabric callback.

The Trainer calls the hooks positionally with itself first. Fabric calls them by name with keyword
arguments only (``fabric.call("on_train_batch_end", batch=batch)``), after ``fabric.setup(...)`` has
called ``on_after_setup(fabric=..., module=...)``, which binds the monitor to that Fabric and model.
Both routes end in the same ``_on_*`` methods, which receive a :class:`RunContext`.

Fabric hook protocol (what a Fabric training loop calls)::

    fabric = Fabric(callbacks=[ThroughputMonitor(...), MemoryMonitor(), CompileReport()], loggers=...)
    model, optimizer = fabric.setup(model, optimizer)   # calls on_after_setup(fabric, module) for you
    fabric.call("on_train_start")                        # optional: starts the clock, resets peaks
    for batch in loader:
        ...                                              # forward, fabric.backward(loss)
        optimizer.step()                                 # calls on_after_optimizer_step for you
        fabric.call("on_train_batch_end", batch=batch)   # required, every batch, on every rank (outputs=loss: the
                                                     # loss panel of throughput.png)
        # around a validation loop (its time is left out of throughput):
        # fabric.call("on_validation_start"); ...; fabric.call("on_validation_end")
    fabric.call("on_train_end")                          # required: summary, plots, loggers flushed

With ``fabric.setup_module`` instead of ``fabric.setup``, call
``fabric.call("on_after_setup", fabric=fabric, module=model)`` yourself. When the model is a
LightningModule, Fabric also calls its hooks of the same names, whose ``on_train_batch_end`` takes
``(outputs, batch, batch_idx)``: pass all three, ``fabric.call("on_train_batch_end", outputs=loss,
batch=batch, batch_idx=i)``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from lightning_thunder.callbacks.context import RunContext
from lightning_thunder.callbacks.plot import matplotlib_missing

if TYPE_CHECKING:
    from lightning.fabric import Fabric
    from lightning.pytorch import LightningModule, Trainer

__all__ = ["MonitorCallback"]


class MonitorCallback(Callback):
    """Base class of the monitors: maps Trainer and Fabric hooks onto ``_on_*`` methods taking a
    :class:`RunContext`. Subclasses override the ``_on_*`` methods they need."""

    def __init__(self) -> None:
        super().__init__()
        self._context: RunContext | None = None
        self._last_logged_step = -1
        self.plot = False
        #: Why a figure (or the plot) is missing: ``{"tokens": "pass length_fn=...", ...}``.
        self.unavailable: dict[str, str] = {}

    def _check_plot_dependency(self, filename: str) -> None:
        """At construction, with plotting on: without matplotlib, warn now (not after training) and record why
        ``filename`` will not be written in ``self.unavailable`` (the summary lists it)."""
        if not self.plot:
            return
        missing = matplotlib_missing(f"{type(self).__name__}'s {filename}")
        if missing is not None:
            self.unavailable["plot"] = f"{missing}; or pass plot=False"
            warnings.warn(f"{self.unavailable['plot']}; training runs without it", stacklevel=3)

    def _write_plot_at_end(self, log_dir: Path | None, filename: str) -> None:
        """When plotting is on (``self.plot``) and possible, write ``self.write_plot`` to ``log_dir / filename``
        and keep the path in ``self.plot_path``; without a log directory, warn that the plot was not written."""
        if not self.plot or "plot" in self.unavailable:
            return
        name = type(self).__name__
        if log_dir is None:
            warnings.warn(
                f"{name}: no log directory, so {filename} was not written; give Fabric a logger or pass "
                f"{name}(log_dir=...)",
                stacklevel=3,
            )
        else:
            self.plot_path = self.write_plot(log_dir / filename)

    def _due_for_logging(self, context: RunContext, step: int, every_n_steps: int | None) -> bool:
        """Whether ``step`` is a logging step (every ``every_n_steps``, or the loop's own interval when
        ``None``) not logged yet; if so, it counts as logged from now on."""
        every = context.log_every_n_steps(every_n_steps)
        if step > 0 and step != self._last_logged_step and step % every == 0:
            self._last_logged_step = step
            return True
        return False

    # ------------------------------------------------------------------ binding to a loop
    def on_after_setup(self, fabric: Fabric, module: nn.Module) -> None:
        """Fabric hook, called by ``fabric.setup(model, ...)``: bind to this Fabric and model."""
        self._context = RunContext.for_fabric(fabric, module)

    def _resolve(self, trainer: Trainer | None, pl_module: LightningModule | None, hook: str) -> RunContext:
        if trainer is not None:
            if self._context is None or self._context.trainer is not trainer:
                self._context = RunContext.for_trainer(trainer, pl_module)  # type: ignore[arg-type]
            return self._context
        if self._context is None:
            raise RuntimeError(
                f"{type(self).__name__}.{hook} was called without a Trainer and before Fabric's setup. Pass the "
                "monitor in `Fabric(callbacks=[...])` and call `fabric.setup(model, optimizer)` first (it calls "
                "`on_after_setup`), or call `fabric.call('on_after_setup', fabric=fabric, module=model)`."
            )
        return self._context

    # ------------------------------------------------------------------ hooks (Trainer and Fabric)
    @override
    def on_train_start(self, trainer: Trainer | None = None, pl_module: LightningModule | None = None) -> None:
        """Training starts (Trainer; optional under Fabric: ``fabric.call("on_train_start")``)."""
        self._on_train_start(self._resolve(trainer, pl_module, "on_train_start"))

    @override
    def on_train_batch_end(
        self,
        trainer: Trainer | None = None,
        pl_module: LightningModule | None = None,
        outputs: Any = None,
        batch: Any = None,
        batch_idx: int = 0,
    ) -> None:
        """A training batch ended (under Fabric: ``fabric.call("on_train_batch_end", batch=batch)``, and
        ``outputs=loss`` for the loss panel of ``throughput.png``)."""
        if trainer is None and batch is None:
            raise TypeError(
                f"{type(self).__name__}.on_train_batch_end needs the batch: call "
                "`fabric.call('on_train_batch_end', batch=batch)`"
            )
        self._on_train_batch_end(self._resolve(trainer, pl_module, "on_train_batch_end"), batch, outputs)

    @override
    def on_validation_start(self, trainer: Trainer | None = None, pl_module: LightningModule | None = None) -> None:
        """Validation starts (its time is excluded; sanity checks are ignored)."""
        if trainer is not None and trainer.sanity_checking:
            return
        self._on_validation_start(self._resolve(trainer, pl_module, "on_validation_start"))

    @override
    def on_validation_end(self, trainer: Trainer | None = None, pl_module: LightningModule | None = None) -> None:
        """Validation ended."""
        if trainer is not None and trainer.sanity_checking:
            return
        self._on_validation_end(self._resolve(trainer, pl_module, "on_validation_end"))

    @override
    def on_train_end(self, trainer: Trainer | None = None, pl_module: LightningModule | None = None) -> None:
        """Training ended: print the summary and write the plot (under Fabric: ``fabric.call("on_train_end")``)."""
        context = self._resolve(trainer, pl_module, "on_train_end")
        self._on_train_end(context)
        context.flush_loggers()

    def on_after_optimizer_step(self, strategy: Any = None, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Fabric hook, called by ``optimizer.step()`` of an optimizer set up by Fabric."""
        if self._context is not None and self._context.fabric is not None and optimizer is not None:
            self._on_after_optimizer_step(self._context, optimizer)

    # ------------------------------------------------------------------ what subclasses implement
    def _on_train_start(self, context: RunContext) -> None:
        """Training starts."""

    def _on_train_batch_end(self, context: RunContext, batch: Any, outputs: Any = None) -> None:
        """A training batch ended (every rank); ``outputs``: the step's loss or output, when the loop gives it."""

    def _on_validation_start(self, context: RunContext) -> None:
        """Validation starts."""

    def _on_validation_end(self, context: RunContext) -> None:
        """Validation ended."""

    def _on_train_end(self, context: RunContext) -> None:
        """Training ended."""

    def _on_after_optimizer_step(self, context: RunContext, optimizer: torch.optim.Optimizer) -> None:
        """An optimizer stepped (Fabric only; the Trainer's optimizers are in ``context.optimizers``)."""

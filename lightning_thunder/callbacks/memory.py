"""MemoryMonitor: peak and current device memory per rank and the max over ranks, plus, once, where the
memory goes (parameters, gradients, optimizer state, activations saved for backward).

On CUDA the figures come from the caching allocator (``torch.cuda.max_memory_allocated`` and friends;
the peak statistics are reset at every logging step, so a logged peak is the peak since the previous
log). Without CUDA those figures are reported as unavailable and the process's resident set size (RSS)
is logged instead (it is logged on CUDA runs too, for host memory).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_thunder.callbacks.base import MonitorCallback
from lightning_thunder.callbacks.context import RunContext
from lightning_thunder.callbacks.graphs import model_activation_bytes
from lightning_thunder.callbacks.plot import Panel, Series, write_plot

__all__ = ["MemoryMonitor", "MEMORY_METRICS", "BREAKDOWN_PARTS", "cpu_rss_bytes", "format_bytes", "tensor_bytes"]

_GIB = float(1 << 30)

#: Per-step figures, logged as ``memory/rank{r}/<name>`` and ``memory/max/<name>`` (max over ranks).
MEMORY_METRICS = ("peak_allocated_gib", "peak_reserved_gib", "allocated_gib", "cpu_rss_gib")
_CUDA_ONLY = ("peak_allocated_gib", "peak_reserved_gib", "allocated_gib")

#: Breakdown parts, logged once as ``memory/breakdown/rank{r}/<part>_gib`` and ``memory/breakdown/max/<part>_gib``.
BREAKDOWN_PARTS = ("parameters", "gradients", "optimizer_state", "activations_saved")


def cpu_rss_bytes() -> int | None:
    """This process's resident set size in bytes (psutil, else ``/proc/self/statm``); ``None`` if neither
    is available."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def format_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes ``t`` holds on this rank (the local shard of a DTensor)."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return int(local.numel()) * local.element_size()


def _optimizer_state_bytes(optimizers: list[torch.optim.Optimizer]) -> int:
    total, seen = 0, set()
    for optimizer in optimizers:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor) and id(value) not in seen:
                    seen.add(id(value))
                    total += tensor_bytes(value)
    return total


class MemoryMonitor(MonitorCallback):
    """Logs memory per rank and the max over ranks, for the Trainer and Fabric.

    Logged names: ``memory/rank{r}/<m>`` and ``memory/max/<m>`` for ``<m>`` in :data:`MEMORY_METRICS`
    (CUDA figures only on CUDA), and once, after the first optimizer step,
    ``memory/breakdown/rank{r}/<part>_gib`` and ``memory/breakdown/max/<part>_gib`` for ``<part>`` in
    :data:`BREAKDOWN_PARTS` (activations only when the model is compiled by lightning_thunder: they are
    read from its traces, see :func:`~lightning_thunder.callbacks.graphs.saved_activation_bytes`).
    The progress bar shows ``mem_gib`` (this rank's peak allocated on CUDA, RSS otherwise); at the end
    a summary is printed and ``memory.png`` is written to the log directory.

    Args:
        log_every_n_steps: log every this many steps; default: the Trainer's ``log_every_n_steps``
            (50 under Fabric).
        breakdown: report the breakdown after the first optimizer step.
        plot: write ``memory.png`` at the end of training (needs matplotlib, the extra ``plot``; without it: a
            warning now, and no plot).
        log_dir: where the plot goes; default: the Trainer's ``log_dir`` / the first Fabric logger's.
        progress_bar: show ``mem_gib`` in the Trainer's progress bar.
    """

    def __init__(
        self,
        *,
        log_every_n_steps: int | None = None,
        breakdown: bool = True,
        plot: bool = True,
        log_dir: str | Path | None = None,
        progress_bar: bool = True,
    ) -> None:
        super().__init__()
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps={log_every_n_steps} must be at least 1")
        self.log_every_n_steps = log_every_n_steps
        self.breakdown = breakdown
        self.plot = plot
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.progress_bar = progress_bar
        #: ``(step, metrics)`` for every logged step, in order.
        self.history: list[tuple[int, dict[str, float]]] = []
        #: The latest logged metrics.
        self.metrics: dict[str, float] = {}
        #: Breakdown per rank (bytes; ``None`` = unavailable), set once.
        self.breakdown_bytes: list[dict[str, int | None]] | None = None
        #: Why a figure is missing.
        self.unavailable: dict[str, str] = {}
        #: Where the plot was written (after training).
        self.plot_path: Path | None = None
        self._check_plot_dependency("memory.png")
        self._batches = 0
        self._optimizers: list[torch.optim.Optimizer] = []

    # ------------------------------------------------------------------------------------ hooks
    def _on_train_start(self, context: RunContext) -> None:
        if context.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(context.device)

    def _on_validation_end(self, context: RunContext) -> None:
        # Validation's peak is not a training step's.
        if context.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(context.device)

    def _on_after_optimizer_step(self, context: RunContext, optimizer: torch.optim.Optimizer) -> None:
        if optimizer not in self._optimizers:
            self._optimizers.append(optimizer)
        if self.breakdown and self.breakdown_bytes is None:
            self._take_breakdown(context, self._optimizers)  # gradients are still there now

    def _on_train_batch_end(self, context: RunContext, batch: Any, outputs: Any = None) -> None:
        self._batches += 1
        step = context.step(self._batches)
        if self.breakdown and self.breakdown_bytes is None and context.is_trainer and step >= 1:
            self._take_breakdown(context, context.optimizers)
        if self._due_for_logging(context, step, self.log_every_n_steps):
            self._log_step(context, step)
        if self.progress_bar:
            context.show_in_progress_bar(self.progress_bar_metrics)

    def _on_train_end(self, context: RunContext) -> None:
        log_dir = self.log_dir or context.log_dir()  # on every rank: the Trainer broadcasts it
        if self.breakdown and self.breakdown_bytes is None:
            self.unavailable["breakdown"] = (
                "no optimizer step was seen (under Fabric, step the optimizer that fabric.setup returned)"
            )
        if not context.is_global_zero:
            return
        context.print(self.summary())
        self._write_plot_at_end(log_dir, "memory.png")

    # ------------------------------------------------------------------------------------ pieces
    def _local(self, device: torch.device) -> list[float]:
        """This rank's figures in :data:`MEMORY_METRICS` order, in GiB (NaN = unavailable)."""
        nan = float("nan")
        rss = cpu_rss_bytes()
        rss_gib = rss / _GIB if rss is not None else nan
        if device.type != "cuda":
            self.unavailable.setdefault(
                "cuda", f"peak/current allocated and reserved are CUDA figures; this run is on {device.type}"
            )
            return [nan, nan, nan, rss_gib]
        return [
            torch.cuda.max_memory_allocated(device) / _GIB,
            torch.cuda.max_memory_reserved(device) / _GIB,
            torch.cuda.memory_allocated(device) / _GIB,
            rss_gib,
        ]

    def _log_step(self, context: RunContext, step: int) -> None:
        ranks = context.all_gather(self._local(context.device))
        if context.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(context.device)
        if all(r[3] != r[3] for r in ranks):  # NaN != NaN
            self.unavailable.setdefault("cpu_rss", "neither psutil nor /proc/self/statm is available")
        metrics: dict[str, float] = {}
        for i, name in enumerate(MEMORY_METRICS):
            values = [r[i] for r in ranks]
            if any(v != v for v in values):
                continue
            for rank, value in enumerate(values):
                metrics[f"memory/rank{rank}/{name}"] = value
            metrics[f"memory/max/{name}"] = max(values)
        self.metrics = metrics
        self.history.append((step, dict(metrics)))
        context.log_metrics(metrics, step)

    def _take_breakdown(self, context: RunContext, optimizers: list[torch.optim.Optimizer]) -> None:
        model = context.user_model
        local: dict[str, int | None] = dict.fromkeys(BREAKDOWN_PARTS)
        if isinstance(model, nn.Module):
            params = list(model.parameters())
            local["parameters"] = sum(tensor_bytes(p) for p in params)
            local["gradients"] = sum(tensor_bytes(p.grad) for p in params if p.grad is not None)
            local["activations_saved"] = model_activation_bytes(context.wrapped_model)
        local["optimizer_state"] = _optimizer_state_bytes(optimizers) if optimizers else None
        if local["activations_saved"] is None:
            self.unavailable["activations_saved"] = (
                "read from lightning_thunder's traces; the model has no module compiled by lightning_thunder"
            )
        if local["optimizer_state"] is None:
            self.unavailable["optimizer_state"] = "no optimizer seen"
        ranks = context.all_gather([float("nan") if local[p] is None else float(local[p]) for p in BREAKDOWN_PARTS])
        self.breakdown_bytes = [
            {p: (None if r[i] != r[i] else int(r[i])) for i, p in enumerate(BREAKDOWN_PARTS)} for r in ranks
        ]
        metrics: dict[str, float] = {}
        for i, part in enumerate(BREAKDOWN_PARTS):
            values = [r[i] for r in ranks]
            if any(v != v for v in values):
                continue
            for rank, value in enumerate(values):
                metrics[f"memory/breakdown/rank{rank}/{part}_gib"] = value / _GIB
            metrics[f"memory/breakdown/max/{part}_gib"] = max(values) / _GIB
        context.log_metrics(metrics, context.step(self._batches))

    # ------------------------------------------------------------------------------------ reports
    @property
    def progress_bar_metrics(self) -> dict[str, float]:
        """``{"mem_gib": ...}``: this rank's peak allocated since the last log on CUDA, else its RSS."""
        device = self._context.device if self._context is not None else torch.device("cpu")
        if device.type == "cuda":
            return {"mem_gib": round(torch.cuda.max_memory_allocated(device) / _GIB, 2)}
        rss = cpu_rss_bytes()
        return {"mem_gib": round(rss / _GIB, 2)} if rss is not None else {}

    def summary(self) -> str:
        """A compact, printable summary: the last logged figures (max over ranks) and the breakdown."""
        lines = ["MemoryMonitor:"]
        m = self.metrics
        names = {"peak_allocated_gib": "peak allocated", "peak_reserved_gib": "peak reserved",
                 "allocated_gib": "allocated", "cpu_rss_gib": "CPU RSS"}
        figures = [
            f"{label} {m[f'memory/max/{key}']:.2f} GiB"
            for key, label in names.items()
            if f"memory/max/{key}" in m
        ]
        lines.append("  last logged step, max over ranks: " + (", ".join(figures) if figures else "nothing logged yet"))
        if self.breakdown_bytes:
            for rank, parts in enumerate(self.breakdown_bytes):
                text = ", ".join(
                    f"{p.replace('_', ' ')} {format_bytes(v)}" for p, v in parts.items() if v is not None
                )
                lines.append(f"  rank {rank} after the first optimizer step: {text}")
        lines += [f"  {what} unavailable: {why}" for what, why in self.unavailable.items()]
        return "\n".join(lines)

    def write_plot(self, path: str | Path) -> Path:
        """Write the logged history (max over ranks, GiB) as a PNG."""
        series = []
        for key, label in (("peak_allocated_gib", "peak allocated"), ("peak_reserved_gib", "peak reserved"),
                           ("allocated_gib", "allocated"), ("cpu_rss_gib", "cpu rss")):
            points = [(s, m[f"memory/max/{key}"]) for s, m in self.history if f"memory/max/{key}" in m]
            if points:
                series.append(Series(label, points))
        return write_plot(path, [Panel("memory, max over ranks", series, ylabel="GiB")])

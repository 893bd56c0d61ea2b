"""CompileReport: what lightning_thunder compiled for the model being trained, and what a step runs.

Figures come from :func:`lightning_thunder.compile_stats` (compile time, graphs, graph breaks with
their reasons, recompiles with their reasons, fusion regions) and from the final traces (kernels per
training step, see :func:`~lightning_thunder.callbacks.graphs.kernel_count`). A summary is printed
after the first training step, new graph breaks and recompiles are printed when they appear, and the
figures are logged at every logging step. With ``write_traces=True`` every stage of every compiled
graph is written as Python to ``<log_dir>/compile/``, with the generated kernels' sources when
lightning_thunder provides ``kernel_sources``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning_thunder
from lightning_thunder.callbacks.base import MonitorCallback
from lightning_thunder.callbacks.context import RunContext
from lightning_thunder.callbacks.graphs import calls, compiled_parts, kernel_count, training_graphs
from lightning_thunder.capture.compiled import compile_states
from lightning_thunder.capture.state import CompileStats

__all__ = ["CompileReport", "COMPILE_METRICS"]

#: The names logged.
COMPILE_METRICS = (
    "compile/time_s",  # total compile time so far (capture, autograd, passes, codegen)
    "compile/graphs",  # graphs compiled (each graph break and recompile adds one)
    "compile/graph_breaks",
    "compile/recompiles",
    "compile/fusion_regions",  # regions run by a fused kernel in the final traces
    "compile/kernels_per_step",  # kernels the compiled forward+backward launch per training step
    "compile/eager_calls",  # calls that ran eagerly, without lightning_thunder (Dynamo's recompile limit)
)


def _file_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "unnamed"


class CompileReport(MonitorCallback):
    """Reports lightning_thunder's compilation of the trained model, for the Trainer and Fabric.

    Logged names: :data:`COMPILE_METRICS`. A model with nothing compiled by lightning_thunder gets one
    warning and no metrics.

    Args:
        write_traces: write every trace (and kernel sources, when available) to ``<log_dir>/compile/``.
        log_every_n_steps: log every this many steps; default: the Trainer's ``log_every_n_steps``
            (50 under Fabric).
        log_dir: where traces go; default: the Trainer's ``log_dir`` / the first Fabric logger's.
    """

    def __init__(
        self, *, write_traces: bool = False, log_every_n_steps: int | None = None, log_dir: str | Path | None = None
    ) -> None:
        super().__init__()
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps={log_every_n_steps} must be at least 1")
        self.write_traces = write_traces
        self.log_every_n_steps = log_every_n_steps
        self.log_dir = Path(log_dir) if log_dir is not None else None
        #: The latest statistics (``None`` until the first step, or when nothing is compiled).
        self.stats: CompileStats | None = None
        #: Kernels one training step launches from the compiled graphs (``None`` until known).
        self.kernels_per_step: int | None = None
        #: The latest metrics.
        self.metrics: dict[str, float] = {}
        #: ``(step, metrics)`` for every logged step.
        self.history: list[tuple[int, dict[str, float]]] = []
        #: Files written by ``write_traces``.
        self.written: list[Path] = []
        self._batches = 0
        self._enabled: bool | None = None
        self._calls: dict[int, int] = {}
        self._reported = (0, 0)  # graph breaks, recompiles already printed
        self._written_graphs = -1
        self._trace_dir: Path | None = None

    # ------------------------------------------------------------------------------------ hooks
    def _on_validation_end(self, context: RunContext) -> None:
        self._calls = self._call_counts(context)  # validation calls are not a training step's

    def _on_train_batch_end(self, context: RunContext, batch: Any, outputs: Any = None) -> None:
        self._batches += 1
        parts = compiled_parts(context.wrapped_model)
        if self._enabled is None:
            self._enabled = bool(parts)
            if not parts:
                warnings.warn(
                    "CompileReport: the model has no module compiled by lightning_thunder, so there is nothing to "
                    "report; compile it with `lightning_thunder.compile(model)` (or a submodule per block)",
                    stacklevel=2,
                )
        if not self._enabled:
            return
        now = self._call_counts(context)
        if self._calls:
            kernels = 0
            for part in parts:
                per_call = sum(kernel_count(g.forward) + kernel_count(g.backward) for g in training_graphs(part, parts))
                kernels += per_call * (now.get(id(part), 0) - self._calls.get(id(part), 0))
            self.kernels_per_step = kernels
        self._calls = now
        self.stats = lightning_thunder.compile_stats(context.wrapped_model)
        first = self._batches == 1
        if context.is_global_zero:
            if first:
                context.print(self.summary())
                self._reported = (len(self.stats.graph_breaks), len(self.stats.recompiles))
            else:
                self._print_news(context)
        if self.write_traces:
            if first:  # resolved once, on every rank (the Trainer broadcasts it)
                self._trace_dir = self.log_dir or context.log_dir()
            if self.stats.graphs != self._written_graphs and context.is_global_zero:
                self._write(context, self._trace_dir)
            self._written_graphs = self.stats.graphs
        self.metrics = self._metrics()
        step = context.step(self._batches)
        if self._due_for_logging(context, step, self.log_every_n_steps):
            context.log_metrics(self.metrics, step)
            self.history.append((step, dict(self.metrics)))

    def _on_train_end(self, context: RunContext) -> None:
        if self._enabled and context.is_global_zero:
            context.print(self.summary())

    # ------------------------------------------------------------------------------------ pieces
    def _call_counts(self, context: RunContext) -> dict[int, int]:
        return {id(part): calls(part) for part in compiled_parts(context.wrapped_model)}

    def _metrics(self) -> dict[str, float]:
        assert self.stats is not None
        metrics = {
            "compile/time_s": self.stats.compile_time_s,
            "compile/graphs": float(self.stats.graphs),
            "compile/graph_breaks": float(len(self.stats.graph_breaks)),
            "compile/recompiles": float(len(self.stats.recompiles)),
            "compile/fusion_regions": float(self.stats.fusion_regions),
            "compile/eager_calls": float(self.stats.eager_calls),
        }
        if self.kernels_per_step is not None:
            metrics["compile/kernels_per_step"] = float(self.kernels_per_step)
        return metrics

    def _print_news(self, context: RunContext) -> None:
        assert self.stats is not None
        breaks, recompiles = self._reported
        for reason in self.stats.graph_breaks[breaks:]:
            context.print(f"CompileReport: new graph break: {reason}")
        for reason in self.stats.recompiles[recompiles:]:
            context.print(f"CompileReport: recompiled: {reason}")
        self._reported = (len(self.stats.graph_breaks), len(self.stats.recompiles))

    def _write(self, context: RunContext, log_dir: Path | None) -> None:
        if log_dir is None:
            warnings.warn(
                "CompileReport: no log directory, so traces were not written; give Fabric a logger or pass "
                "CompileReport(log_dir=...)",
                stacklevel=2,
            )
            return
        root = log_dir / "compile"
        for k, part in enumerate(compiled_parts(context.wrapped_model)):
            for state in compile_states(part):
                for record in state.records:
                    folder = root / f"{k:02d}-{_file_name(state.label)}" / f"graph{record.index}"
                    traces = [*record.torch_traces, *record.forward_traces, *record.backward_traces]
                    for i, trace in enumerate(traces):
                        path = folder / f"{i:02d}-{_file_name(trace.name)}.py"
                        path.parent.mkdir(parents=True, exist_ok=True)
                        path.write_text(trace.python())
                        self.written.append(path)
        kernel_sources = getattr(lightning_thunder, "kernel_sources", None)
        if callable(kernel_sources):
            sources = kernel_sources(context.wrapped_model)
            items = sources.items() if isinstance(sources, Mapping) else enumerate(sources)
            for name, source in items:
                path = root / "kernels" / f"{_file_name(str(name))}.py"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(str(source))
                self.written.append(path)

    # ------------------------------------------------------------------------------------ reports
    def summary(self) -> str:
        """A compact, printable summary, with every graph break and recompile reason."""
        if self.stats is None:
            return "CompileReport: nothing compiled yet"
        s = self.stats
        kernels = (
            f"{self.kernels_per_step} kernels/step" if self.kernels_per_step is not None else "kernels/step from step 2"
        )
        lines = [
            f"CompileReport: {s.graphs} graphs, compile {s.compile_time_s:.2f} s, {len(s.graph_breaks)} graph breaks, "
            f"{len(s.recompiles)} recompiles, {s.fusion_regions} fusion regions, {kernels}, "
            f"ops per executor {s.executor_counts}"
        ]
        lines += [f"  graph break: {reason}" for reason in s.graph_breaks]
        lines += [f"  recompile: {reason}" for reason in s.recompiles]
        if s.eager_calls:
            lines.append(f"  {s.eager_calls} calls ran eagerly, without lightning_thunder and its plugins:")
            lines += [f"    {reason}" for reason in s.eager_fallbacks]
        return "\n".join(lines)

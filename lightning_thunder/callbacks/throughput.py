"""ThroughputMonitor: tokens/s, samples/s, batches/s, TFLOP/s and MFU, per device and global.

Rates are windowed averages computed by Lightning's
:class:`~lightning.fabric.utilities.throughput.Throughput` over the last ``window_size`` batches.
*Global* figures are not this device's times the world size: every batch, the per-rank counters
(batches, samples, tokens, FLOPs, elapsed time, peak) are gathered from all ranks and summed (time:
the slowest rank), and a second ``Throughput`` computes rates from those totals.

The end-of-run summary gives two rates, because a short run's wall clock is dominated by one-time costs:

- **steady state**: the median of the steps' rates, a step's work over its time (between two step ends, the
  slowest rank's; an optimizer step under the Trainer, its batches together with gradient accumulation). One-time
  costs land in a few steps and do not move the median: compilation and the first batch, the FLOP count on a meta
  copy, the memory breakdown, a recompile, a checkpoint write. This is the rate a longer run converges to.
- **wall clock**: everything done after the first batch over the time it took (validation excluded), one-time
  costs included. This is what this run achieved.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.utilities.data import extract_batch_size

from lightning_thunder.callbacks.base import MonitorCallback
from lightning_thunder.callbacks.context import RunContext
from lightning_thunder.callbacks.flops import StepFn, measure_step_flops
from lightning_thunder.callbacks.peaks import PRECISIONS, card_of, peak_flops, precision_of
from lightning_thunder.callbacks.plot import Panel, Series, write_plot

__all__ = ["ThroughputMonitor", "THROUGHPUT_METRICS"]

#: The names logged (``{scope}`` is ``device`` for this rank and ``global`` for all ranks together).
THROUGHPUT_METRICS = (
    "throughput/time",  # seconds of training so far (validation excluded; the slowest rank)
    "throughput/batches",  # batches so far, all ranks
    "throughput/samples",  # samples so far, all ranks
    "throughput/tokens",  # tokens so far, all ranks (with length_fn)
    "throughput/{scope}/batches_per_sec",
    "throughput/{scope}/samples_per_sec",
    "throughput/{scope}/tokens_per_sec",  # with length_fn
    "throughput/{scope}/tflops_per_sec",  # with FLOPs (measured or the module's flops_per_batch)
    "throughput/{scope}/mfu",  # fraction of the peak; with FLOPs and a known peak
)

# Lightning's Throughput keys -> ours (per scope).
#: Per-step deltas kept for the steady-state figures (the median over the last this many steps).
_STEPS_KEPT = 10_000

_RATES = {
    "device/batches_per_sec": "batches_per_sec",
    "device/samples_per_sec": "samples_per_sec",
    "device/items_per_sec": "tokens_per_sec",
    "device/flops_per_sec": "tflops_per_sec",
    "device/mfu": "mfu",
}


def _now() -> float:
    """The clock (a function of this module so tests can replace it)."""
    return time.perf_counter()


def _default_trainer_step(model: Any, batch: Any) -> Any:
    return model.training_step(batch, 0)


def _default_fabric_step(model: Any, batch: Any) -> Any:
    return model(batch)


class ThroughputMonitor(MonitorCallback):
    r"""Logs training throughput per device and for all devices together, for the Trainer and Fabric.

    Logged names: :data:`THROUGHPUT_METRICS`. The progress bar shows ``tok/s`` (``samples/s`` without
    ``length_fn``). At the end of training a summary gives the steady-state and the wall-clock rates (see the
    module docstring), and ``throughput.png`` is written to the log directory (needs matplotlib, the extra
    ``plot``): tokens or samples per second over steps with the steady-state rate, TFLOP/s per device, and the
    training loss when the loop passes it (Trainer: always; Fabric: ``fabric.call("on_train_batch_end",
    batch=batch, outputs=loss)``).

    FLOPs per batch: the model's ``flops_per_batch`` attribute when it has one (Lightning's convention),
    else measured once, on the first batch, with ``FlopCounterMode`` on a meta copy of the model
    running ``step_fn`` and its backward (see :mod:`lightning_thunder.callbacks.flops`). MFU divides by
    the peak of the device at the active precision (:mod:`lightning_thunder.callbacks.peaks`: FP8 when
    an FP8 precision plugin is active); anything unknown is reported as unavailable.

    Args:
        batch_size_fn: samples in a batch; default: the size of the first dimension of the first tensor
            in the batch (Lightning's ``extract_batch_size``).
        length_fn: tokens in a batch (e.g. ``lambda batch: batch[0].numel()``); without it no token rates.
        step_fn: ``step_fn(model, batch) -> loss or output`` used to measure FLOPs on the meta copy;
            default: ``model.training_step(batch, 0)`` under the Trainer, ``model(batch)`` under Fabric.
        measure_flops: ``False`` skips the measurement (FLOP rates then need ``flops_per_batch``).
        precision: force the precision used for the peak (one of ``fp32``, ``tf32``, ``bf16``, ``fp16``,
            ``fp8``), e.g. ``"fp8"`` when a compile plugin runs FP8 without a precision plugin.
        peak_flops: force the per-device peak in FLOP/s (e.g. a measured matmul rate).
        window_size: batches the rates are averaged over (at least 2; rates appear once it is full).
        log_every_n_steps: log every this many steps; default: the Trainer's ``log_every_n_steps``
            (50 under Fabric).
        plot: write ``throughput.png`` at the end of training (without matplotlib: a warning now, and no plot).
        log_dir: where the plot goes; default: the Trainer's ``log_dir`` / the first Fabric logger's.
        progress_bar: show the rate in the Trainer's progress bar.
    """

    def __init__(
        self,
        *,
        batch_size_fn: Callable[[Any], int] | None = None,
        length_fn: Callable[[Any], int] | None = None,
        step_fn: StepFn | None = None,
        measure_flops: bool = True,
        precision: str | None = None,
        peak_flops: float | None = None,
        window_size: int = 50,
        log_every_n_steps: int | None = None,
        plot: bool = True,
        log_dir: str | Path | None = None,
        progress_bar: bool = True,
    ) -> None:
        super().__init__()
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}; leave it None to read the plugin")
        if peak_flops is not None and not peak_flops > 0:
            raise ValueError(f"peak_flops={peak_flops!r} must be a positive number of FLOP/s (e.g. 989.4e12)")
        if window_size < 2:
            raise ValueError(f"window_size={window_size} must be at least 2 (rates need two points)")
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps={log_every_n_steps} must be at least 1")
        self.batch_size_fn = batch_size_fn
        self.length_fn = length_fn
        self.step_fn = step_fn
        self.measure_flops = measure_flops
        self.precision = precision
        self.peak_flops = peak_flops
        self.window_size = window_size
        self.log_every_n_steps = log_every_n_steps
        self.plot = plot
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.progress_bar = progress_bar
        #: ``(step, metrics)`` for every logged step, in order.
        self.history: list[tuple[int, dict[str, float]]] = []
        #: The latest metrics computed (also between logging steps).
        self.metrics: dict[str, float] = {}
        #: Where the plot was written (after training).
        self.plot_path: Path | None = None
        #: The training loss at logged steps, when the loop passes it (``outputs``): ``(step, loss)``, kept as
        #: detached tensors (no device sync during training) and read for the plot.
        self.losses: list[tuple[int, Any]] = []
        self._check_plot_dependency("throughput.png")
        self._reset()

    def _reset(self) -> None:
        self._t0: float | None = None
        self._paused = 0.0
        self._pause_start: float | None = None
        self._batches = 0
        self._samples = 0
        self._tokens = 0
        self._flops = 0.0
        #: FLOPs of one batch on this rank (forward + backward), once known.
        self.flops_per_batch: float | None = None
        self._flops_measured = False
        self._global_flops = 0.0
        self._all_flops = False  # every rank knows its FLOPs
        #: The per-device peak FLOP/s MFU divides by (``None``: unknown) and where it came from.
        self.device_peak_flops: float | None = None
        self.peak_source = ""
        self._device: Throughput | None = None
        self._global: Throughput | None = None
        self._world_size = 1
        self._replicas: int | None = None  # ranks per batch (tensor parallelism), read once
        self._first: list[float] | None = None  # global (time, batches, samples, tokens, flops) after batch 1
        self._last: list[float] | None = None
        #: Global deltas per step (optimizer step under the Trainer, batch under Fabric) after the first batch:
        #: (seconds, batches, samples, tokens, flops); with gradient accumulation a step sums its batches.
        self._steps: deque[tuple[float, ...]] = deque(maxlen=_STEPS_KEPT)
        self._pending: list[float] | None = None  # the deltas of the step in progress
        self._pending_step: int | None = None

    # ------------------------------------------------------------------------------------ hooks
    def _on_train_start(self, context: RunContext) -> None:
        self._reset()
        self._t0 = _now()

    def _on_validation_start(self, context: RunContext) -> None:
        self._pause_start = _now()

    def _on_validation_end(self, context: RunContext) -> None:
        if self._pause_start is not None:
            self._paused += _now() - self._pause_start
            self._pause_start = None

    def _on_train_batch_end(self, context: RunContext, batch: Any, outputs: Any = None) -> None:
        context.synchronize()  # CUDA work is asynchronous: time what has run
        now = _now()
        if self._t0 is None:  # Fabric without on_train_start: the clock starts at the first batch's end
            self._t0 = now
        if self._device is None:
            self._start(context)
        elapsed = now - self._t0 - self._paused
        samples = int(self.batch_size_fn(batch)) if self.batch_size_fn is not None else extract_batch_size(batch)
        tokens = int(self.length_fn(batch)) if self.length_fn is not None else 0
        flops = self._batch_flops(context, batch)
        self._batches += 1
        self._samples += samples
        self._tokens += tokens
        self._flops += flops or 0.0

        # One gather per batch gives every rank's counters: the sums (and the slowest rank's time)
        # are the global figures.
        peak = self.device_peak_flops if self.device_peak_flops is not None else math.nan
        ranks = context.all_gather(
            [elapsed, self._batches, self._samples, self._tokens, self._flops, float(flops is not None), peak]
        )
        self._world_size = len(ranks)
        g_time = max(r[0] for r in ranks)
        # The ranks of a tensor-parallel group process the same batch together: it counts once.
        tp = self._replicas if self._replicas is not None else context.replicas_per_batch
        self._replicas = tp
        g_batches, g_samples, g_tokens, g_flops = (sum(r[i] for r in ranks) / tp for i in range(1, 5))
        self._all_flops = all_flops = all(r[5] for r in ranks)
        peaks = [r[6] for r in ranks]
        self._global.available_flops = sum(peaks) if all(math.isfinite(p) for p in peaks) else None

        lengths = self.length_fn is not None
        self._device.update(
            time=elapsed,
            batches=self._batches,
            samples=self._samples,
            lengths=self._tokens if lengths else None,
            flops=flops,
        )
        self._global.update(
            time=g_time,
            batches=int(g_batches),
            samples=int(g_samples),
            lengths=int(g_tokens) if lengths else None,
            flops=(g_flops - self._global_flops) if all_flops else None,
        )
        self._global_flops = g_flops
        previous, self._last = self._last, [g_time, g_batches, g_samples, g_tokens, g_flops]
        if self._first is None:
            self._first = list(self._last)
        else:
            delta = [now - before for now, before in zip(self._last, previous)]
            self._pending = delta if self._pending is None else [a + b for a, b in zip(self._pending, delta)]
        self.metrics = self._compute()

        step = context.step(self._batches)
        if self._pending is not None and step != self._pending_step:  # a step ended with this batch
            self._steps.append(tuple(self._pending))
            self._pending = None
        self._pending_step = step
        if self._due_for_logging(context, step, self.log_every_n_steps):
            context.log_metrics(self.metrics, step)
            self.history.append((step, dict(self.metrics)))
            loss = _loss_of(outputs)
            if loss is not None:
                self.losses.append((step, loss))
        if self.progress_bar:
            context.show_in_progress_bar(self.progress_bar_metrics)

    def _on_train_end(self, context: RunContext) -> None:
        log_dir = self.log_dir or context.log_dir()  # on every rank: the Trainer broadcasts it
        if not context.is_global_zero or self._device is None:
            return
        context.print(self.summary())
        self._write_plot_at_end(log_dir, "throughput.png")

    # ------------------------------------------------------------------------------------ pieces
    def _start(self, context: RunContext) -> None:
        """First batch: the peak for this device and precision, and the two windows."""
        precision = self.precision or precision_of(context.precision_plugin)
        if self.peak_flops is not None:
            self.device_peak_flops, self.peak_source = float(self.peak_flops), "given peak_flops"
        else:
            self.device_peak_flops = peak_flops(context.device, precision) if precision != "fp64" else None
            if self.device_peak_flops is None:
                self.unavailable["mfu"] = f"no peak FLOP/s known for {self._describe_device(context)} at {precision}"
            else:
                self.peak_source = f"{self._describe_device(context)} {precision}"
        if self.length_fn is None:
            self.unavailable["tokens"] = "pass ThroughputMonitor(length_fn=...) to count tokens"
        self._device = Throughput(available_flops=self.device_peak_flops, world_size=1, window_size=self.window_size)
        self._global = Throughput(available_flops=None, world_size=1, window_size=self.window_size)

    @staticmethod
    def _describe_device(context: RunContext) -> str:
        device = context.device
        if device.type != "cuda":
            return device.type
        name = torch.cuda.get_device_name(device)
        card = card_of(name)
        return f"{name} ({card})" if card else name

    def _batch_flops(self, context: RunContext, batch: Any) -> float | None:
        model = context.user_model
        provided = getattr(model, "flops_per_batch", None)
        if provided is not None:
            self.flops_per_batch = float(provided)
            return self.flops_per_batch
        if not self._flops_measured:
            self._flops_measured = True
            if not self.measure_flops:
                self.unavailable["flops"] = "measure_flops=False and the model has no flops_per_batch"
            elif model is None:
                self.unavailable["flops"] = "no model to measure (Fabric: call fabric.setup(model, ...))"
            else:
                step_fn = self.step_fn or (_default_trainer_step if context.is_trainer else _default_fabric_step)
                try:
                    drop = [context.trainer, context.fabric]
                    self.flops_per_batch = float(measure_step_flops(model, batch, step_fn, drop))
                except Exception as e:  # noqa: BLE001 - any failure of user code on meta tensors
                    reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    self.unavailable["flops"] = (
                        f"measuring on a meta copy failed ({reason}); set `flops_per_batch` on the model or pass "
                        "ThroughputMonitor(step_fn=...)"
                    )
                    warnings.warn(f"ThroughputMonitor: FLOPs unavailable: {self.unavailable['flops']}", stacklevel=2)
        return self.flops_per_batch

    def _compute(self) -> dict[str, float]:
        assert self._device is not None and self._global is not None and self._last is not None
        metrics: dict[str, float] = {
            "throughput/time": self._last[0],
            "throughput/batches": self._last[1],
            "throughput/samples": self._last[2],
        }
        if self.length_fn is not None:
            metrics["throughput/tokens"] = self._last[3]
        for scope, tp in (("device", self._device), ("global", self._global)):
            for key, value in tp.compute().items():
                name = _RATES.get(key)
                if name is None:
                    continue
                metrics[f"throughput/{scope}/{name}"] = value / 1e12 if name == "tflops_per_sec" else value
        return metrics

    # ------------------------------------------------------------------------------------ reports
    @property
    def progress_bar_metrics(self) -> dict[str, float]:
        """What the progress bar shows: global ``tok/s`` (or ``samples/s``), once the window is full."""
        key, label = (
            ("throughput/global/tokens_per_sec", "tok/s")
            if self.length_fn is not None
            else ("throughput/global/samples_per_sec", "samples/s")
        )
        return {label: round(self.metrics[key], 1)} if key in self.metrics else {}

    def _rates(self, seconds: float, batches: float, samples: float, tokens: float, flops: float) -> dict[str, float]:
        out = {"batches_per_sec": batches / seconds, "samples_per_sec": samples / seconds}
        if self.length_fn is not None:
            out["tokens_per_sec"] = tokens / seconds
        if self._all_flops:
            out["tflops_per_sec"] = flops / seconds / 1e12
            if self._global is not None and self._global.available_flops:
                out["mfu"] = out["tflops_per_sec"] * 1e12 / self._global.available_flops
        return out

    def run_averages(self) -> dict[str, float]:
        """Wall-clock global rates: what was done after the first batch (which includes compilation) over the time
        it took, validation excluded and every one-time cost between batches included."""
        if self._first is None or self._last is None or self._last[0] <= self._first[0]:
            return {}
        return self._rates(*(last - first for last, first in zip(self._last, self._first)))

    def steady_state(self) -> dict[str, float]:
        """Steady-state global rates: the median over the steps after the first batch of each step's rate (its work
        over its time, the slowest rank's), so one-time costs (the first batch, FLOP counting, the memory
        breakdown, recompiles, checkpoint writes) do not count. A step is an optimizer step under the Trainer (its
        batches together, with gradient accumulation) and a batch under Fabric. Also ``step_time_s`` and ``steps``
        (how many steps the median is over). Empty before the second step."""
        steps = [step for step in self._steps if step[0] > 0]
        if not steps:
            return {}
        rates = [self._rates(*step) for step in steps]
        out = {key: statistics.median(r[key] for r in rates) for key in rates[0]}
        return {**out, "step_time_s": statistics.median(step[0] for step in steps), "steps": float(len(steps))}

    def summary(self) -> str:
        """A compact, printable summary of the run."""
        if self._last is None:
            return "ThroughputMonitor: no training batch seen"
        t, batches, samples, tokens, _ = self._last
        head = f"ThroughputMonitor: {int(batches):,} batches, {int(samples):,} samples"
        if self.length_fn is not None:
            head += f", {int(tokens):,} tokens"
        head += f" in {t:.1f} s of training (validation excluded); all ranks:"
        lines = [head]
        steady, wall = self.steady_state(), self.run_averages()
        if steady:
            lines.append(
                f"  steady state: {self._format_rates(steady)} (median step {1e3 * steady['step_time_s']:.1f} ms over "
                f"{int(steady['steps'])} steps after the first: training steps only, one-time costs left out)"
            )
        if wall:
            batches = int(self._last[1] - self._first[1])
            lines.append(
                f"  wall clock: {self._format_rates(wall)} ({batches:,} batches after the first in "
                f"{self._last[0] - self._first[0]:.1f} s, validation excluded; includes one-time costs: recompiles, "
                "FLOP counting, memory breakdown, checkpoint writes, logging)"
            )
        if self.flops_per_batch is not None:
            lines.append(f"  FLOPs per batch (this rank, forward + backward): {self.flops_per_batch:.4g}")
        lines += [f"  {what} unavailable: {why}" for what, why in self.unavailable.items()]
        return "\n".join(lines)

    def _format_rates(self, rates: dict[str, float]) -> str:
        labels = {"tokens_per_sec": "tokens/s", "samples_per_sec": "samples/s", "batches_per_sec": "batches/s"}
        parts = [f"{rates[k]:,.1f} {label}" for k, label in labels.items() if k in rates]
        if "tflops_per_sec" in rates:
            parts.append(f"{rates['tflops_per_sec']:.3g} TFLOP/s")
        if "mfu" in rates:
            parts.append(f"MFU {100 * rates['mfu']:.1f}% of {self.peak_source}")
        return ", ".join(parts)

    def _points(self, name: str) -> list[tuple[float, float]]:
        return [(step, metrics[name]) for step, metrics in self.history if name in metrics]

    def write_plot(self, path: str | Path) -> Path:
        """Write the logged history as a PNG: throughput (all ranks; this device too when there are several),
        with the steady-state rate as a reference line; TFLOP/s per device when known; the training loss when the
        loop passed it."""
        key, unit = ("tokens_per_sec", "tokens/s") if self.length_fn is not None else ("samples_per_sec", "samples/s")
        rate = [Series("all ranks" if self._world_size > 1 else unit, self._points(f"throughput/global/{key}"))]
        if self._world_size > 1:  # on one device the two lines are the same: draw one
            rate.append(Series("this device", self._points(f"throughput/device/{key}")))
        steady = self.steady_state().get(key)
        references = [(f"steady state {steady:,.0f} {unit}", steady)] if steady is not None else []
        panels = [Panel(f"throughput, windowed over {self.window_size} batches", rate, ylabel=unit,
                        references=references)]
        tflops = self._points("throughput/device/tflops_per_sec")
        if tflops:
            panels.append(Panel("TFLOP/s per device", [Series("this device", tflops)], ylabel="TFLOP/s"))
        if self.losses:
            label = "training loss" + (" (rank 0)" if self._world_size > 1 else "")
            points = [(step, float(loss)) for step, loss in self.losses]
            panels.append(Panel(label, [Series(label, points)], ylabel="loss", from_zero=False))
        return write_plot(path, panels)


def _loss_of(outputs: Any) -> Any:
    """The loss in a training step's ``outputs`` (a scalar tensor, or a mapping with ``"loss"``), detached; else
    ``None``."""
    if isinstance(outputs, Mapping):
        outputs = outputs.get("loss")
    if isinstance(outputs, torch.Tensor) and outputs.numel() == 1:
        return outputs.detach()
    if isinstance(outputs, (int, float)):
        return float(outputs)
    return None

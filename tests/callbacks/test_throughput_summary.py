"""ThroughputMonitor's two end-of-run rates: the steady state (median step) is not moved by one-time costs; the
wall clock includes them, and the summary says what each includes."""

from __future__ import annotations

import pytest
import torch
from lightning.fabric import Fabric
from torch import nn

from lightning_thunder.callbacks import ThroughputMonitor
from lightning_thunder.callbacks import throughput as throughput_module
from tests.callbacks.models import FEATURES, mlp, tokens

STEP_S, STEPS, BATCH = 0.1, 10, 4


def _run(monkeypatch, stall_at: int | None, stall_s: float = 2.0) -> ThroughputMonitor:
    """A Fabric loop whose clock advances 100 ms per step, plus ``stall_s`` once (a checkpoint write, say) after
    step ``stall_at``."""
    clock = [0.0]
    monkeypatch.setattr(throughput_module, "_now", lambda: clock[0])
    monitor = ThroughputMonitor(length_fn=tokens, measure_flops=False, plot=False, window_size=2)
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[monitor])
    net = mlp()
    model, _ = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.0))
    fabric.call("on_train_start")
    for step in range(1, STEPS + 1):
        x = torch.randn(BATCH, FEATURES)
        fabric.backward(nn.functional.mse_loss(model(x), x))
        clock[0] += STEP_S * (10 if step == 1 else 1)  # the first step compiles
        fabric.call("on_train_batch_end", batch=(x, x))
        if step == stall_at:
            clock[0] += stall_s
    return monitor


def test_a_one_time_stall_does_not_change_the_steady_state_rate(monkeypatch):
    clean, stalled = _run(monkeypatch, stall_at=None), _run(monkeypatch, stall_at=5)
    per_step = BATCH * FEATURES
    assert clean.steady_state()["tokens_per_sec"] == pytest.approx(per_step / STEP_S)
    assert stalled.steady_state() == clean.steady_state()
    assert stalled.steady_state()["step_time_s"] == pytest.approx(STEP_S) and stalled.steady_state()["steps"] == 9
    # The wall clock counts the stall: 9 steps in 0.9 s + 2 s.
    assert clean.run_averages()["tokens_per_sec"] == pytest.approx(per_step / STEP_S)
    assert stalled.run_averages()["tokens_per_sec"] == pytest.approx(9 * per_step / (9 * STEP_S + 2.0))


def test_the_summary_gives_both_rates_and_says_what_each_includes(monkeypatch):
    summary = _run(monkeypatch, stall_at=3).summary()
    lines = summary.splitlines()
    assert lines[0] == (f"ThroughputMonitor: {STEPS} batches, {STEPS * BATCH} samples, {STEPS * BATCH * FEATURES} "
                        "tokens in 3.9 s of training (validation excluded); all ranks:")
    assert lines[1].startswith(f"  steady state: {BATCH * FEATURES / STEP_S:,.1f} tokens/s, {BATCH / STEP_S:,.1f} "
                               "samples/s, 10.0 batches/s (median step 100.0 ms over 9 steps after the first: training "
                               "steps only, one-time costs left out)")
    assert lines[2].startswith("  wall clock: ") and "(9 batches after the first in 2.9 s, validation excluded; " \
                                                     "includes one-time costs: recompiles" in lines[2]


class _TrainerLike:
    """What the monitor reads of a Trainer run with gradient accumulation: ``step()`` is the optimizer step."""

    is_trainer, is_global_zero, world_size, replicas_per_batch, device, precision_plugin, user_model = True, True, 1, 1, \
        torch.device("cpu"), None, None
    trainer = fabric = None

    def __init__(self) -> None:
        self.optimizer_step = 0

    def synchronize(self) -> None: ...
    def all_gather(self, values): return [list(values)]
    def step(self, fallback: int) -> int: return self.optimizer_step
    def log_every_n_steps(self, requested): return 50
    def log_metrics(self, metrics, step) -> None: ...
    def show_in_progress_bar(self, metrics) -> None: ...


def test_with_gradient_accumulation_a_step_is_an_optimizer_step(monkeypatch):
    """Two batches per optimizer step, the second slower (it steps the optimizer): the median is over whole steps,
    not over the more numerous fast batches."""
    clock = [0.0]
    monkeypatch.setattr(throughput_module, "_now", lambda: clock[0])
    monitor = ThroughputMonitor(length_fn=tokens, measure_flops=False, plot=False, precision="fp32")
    context = _TrainerLike()
    x = torch.zeros(BATCH, FEATURES)
    for batch in range(1, 21):
        clock[0] += 0.1 if batch % 2 else 0.3  # forward/backward; + the optimizer on every second batch
        context.optimizer_step = batch // 2
        monitor._on_train_batch_end(context, (x, x))
    steady = monitor.steady_state()
    assert steady["step_time_s"] == pytest.approx(0.4) and steady["steps"] == 10  # the first covers batch 2 only
    assert steady["batches_per_sec"] == pytest.approx(2 / 0.4)


def test_tensor_parallel_ranks_count_a_batch_once(monkeypatch):
    """The two ranks of a tensor-parallel group process the same batch: the global rate is the group's, not twice
    it (the ranks' counters are summed, then divided by the ranks per batch)."""
    from lightning_thunder.callbacks.context import RunContext

    gather = RunContext.all_gather
    monkeypatch.setattr(RunContext, "all_gather", lambda self, values: gather(self, values) * 2)  # 2 ranks, one group
    monkeypatch.setattr(RunContext, "replicas_per_batch", property(lambda self: 2))
    monitor = _run(monkeypatch, stall_at=None)
    assert monitor.steady_state()["tokens_per_sec"] == pytest.approx(BATCH * FEATURES / STEP_S)
    assert monitor.metrics["throughput/global/tokens_per_sec"] == pytest.approx(monitor.metrics["throughput/device/tokens_per_sec"])

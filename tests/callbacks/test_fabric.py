"""The monitors in Fabric loops on CPU: the documented hooks, names logged, plots, and aggregation over
2 Gloo ranks (global figures are sums of what each rank did, not this rank's times the world size)."""

from __future__ import annotations

import pytest
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger

from lightning_thunder.callbacks import CompileReport, MemoryMonitor, ThroughputMonitor
from tests.callbacks.models import (
    BATCH,
    FEATURES,
    PARAM_BYTES,
    SAVED_BYTES,
    STEP_FLOPS,
    check_png,
    column,
    fabric_train,
    fabric_train_two_ranks,
    forward_on_inputs,
    read_metrics,
    tokens,
)


def test_fabric_loop_with_documented_hooks(tmp_path, capsys):
    monitors = [
        ThroughputMonitor(length_fn=tokens, step_fn=forward_on_inputs, window_size=2, log_every_n_steps=2),
        MemoryMonitor(log_every_n_steps=2),
        CompileReport(log_every_n_steps=2, write_traces=True),
    ]
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=monitors, loggers=CSVLogger(tmp_path))
    out = fabric_train(fabric, steps=6, batch_size=BATCH, compiled=True)

    rows = read_metrics(tmp_path / "lightning_logs" / "version_0" / "metrics.csv")
    assert column(rows, "throughput/batches") == [2, 4, 6]
    assert column(rows, "throughput/tokens") == [2 * BATCH * FEATURES, 4 * BATCH * FEATURES, 6 * BATCH * FEATURES]
    for name in ("throughput/global/tokens_per_sec", "throughput/device/tflops_per_sec", "memory/max/cpu_rss_gib",
                 "memory/breakdown/max/activations_saved_gib", "compile/kernels_per_step"):
        assert column(rows, name), name
    assert out["flops_per_batch"] == STEP_FLOPS
    assert out["breakdown"] == [
        {
            "parameters": PARAM_BYTES,
            "gradients": PARAM_BYTES,  # taken in on_after_optimizer_step, before zero_grad
            "optimizer_state": 2 * PARAM_BYTES + 4 * 4,
            "activations_saved": SAVED_BYTES,
        }
    ]
    log_dir = tmp_path / "lightning_logs" / "version_0"
    check_png(log_dir / "throughput.png")
    check_png(log_dir / "memory.png")
    finals = sorted(log_dir.glob("compile/*/graph*/*forward-final.py"))
    assert finals and "def forward(" in finals[0].read_text()
    printed = capsys.readouterr().out
    assert "ThroughputMonitor: 6 batches, 24 samples, 192 tokens" in printed
    assert "CompileReport: 1 graphs" in printed


def test_fabric_hooks_before_setup_say_what_to_call():
    monitor = ThroughputMonitor()
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[monitor])
    with pytest.raises(RuntimeError, match=r"before Fabric's setup.*fabric\.setup\(model, optimizer\)"):
        fabric.call("on_train_batch_end", batch=1)
    with pytest.raises(TypeError, match=r"needs the batch: call `fabric.call\('on_train_batch_end', batch=batch\)`"):
        fabric.call("on_train_batch_end")


@pytest.mark.slow
def test_two_gloo_ranks_aggregate_real_counters(tmp_path):
    steps = 4
    monitors = [
        ThroughputMonitor(step_fn=forward_on_inputs, window_size=2, log_every_n_steps=1),
        MemoryMonitor(log_every_n_steps=1),
    ]
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn", callbacks=monitors, loggers=CSVLogger(tmp_path))
    out = fabric.launch(fabric_train_two_ranks, steps)
    assert out["rank"] == 0

    rows = read_metrics(tmp_path / "lightning_logs" / "version_0" / "metrics.csv")
    # Rank 0 ran batches of 2 samples, rank 1 of 3: the global count is the sum (5 per step), which
    # neither rank's count times the world size (4 or 6) is.
    assert column(rows, "throughput/samples") == [5 * k for k in range(1, steps + 1)]
    assert column(rows, "throughput/batches") == [2 * k for k in range(1, steps + 1)]
    assert out["throughput"]["throughput/samples"] == 5 * steps
    assert column(rows, "throughput/global/samples_per_sec") and column(rows, "throughput/device/samples_per_sec")

    memory = out["memory"]
    assert len(column(rows, "memory/rank1/cpu_rss_gib")) == steps
    per_rank = [memory["memory/rank0/cpu_rss_gib"], memory["memory/rank1/cpu_rss_gib"]]
    assert memory["memory/max/cpu_rss_gib"] == max(per_rank)
    assert len(out["breakdown"]) == 2 and all(b["parameters"] == PARAM_BYTES for b in out["breakdown"])

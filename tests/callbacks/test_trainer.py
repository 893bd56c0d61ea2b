"""The three monitors in a Lightning Trainer run on CPU: names logged, counters, rates, breakdown, plots."""

from __future__ import annotations

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger

import lightning_thunder
from lightning_thunder.callbacks import (
    BREAKDOWN_PARTS,
    COMPILE_METRICS,
    CompileReport,
    MemoryMonitor,
    ThroughputMonitor,
)
from lightning_thunder.callbacks import throughput as throughput_module
from tests.callbacks.models import (
    BATCH,
    FEATURES,
    PARAM_BYTES,
    SAVED_BYTES,
    STEP_FLOPS,
    FakeClock,
    Regressor,
    check_png,
    column,
    loader,
    read_metrics,
    tokens,
)

RATES = ("batches_per_sec", "samples_per_sec", "tokens_per_sec", "tflops_per_sec")


def _fit(tmp_path, model, callbacks, **kwargs):
    options = dict(
        accelerator="cpu",
        devices=1,
        max_steps=10,
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer = L.Trainer(**{**options, **kwargs})
    trainer.fit(model, loader(), loader())
    return trainer


def test_trainer_run_logs_every_metric_with_monotonic_counters_and_writes_plots(tmp_path, monkeypatch, capsys):
    clock = FakeClock()
    monkeypatch.setattr(throughput_module, "_now", clock)
    throughput = ThroughputMonitor(length_fn=tokens, window_size=3)
    memory, report = MemoryMonitor(), CompileReport()
    model = Regressor(clock=clock)
    trainer = _fit(tmp_path, model, [throughput, memory, report], val_check_interval=5, limit_val_batches=2)

    rows = read_metrics(tmp_path / "lightning_logs" / "version_0" / "metrics.csv")
    names = set().union(*rows)
    expected = {"throughput/time", "throughput/batches", "throughput/samples", "throughput/tokens"}
    expected |= {f"throughput/{scope}/{rate}" for scope in ("device", "global") for rate in RATES}
    expected |= {"memory/rank0/cpu_rss_gib", "memory/max/cpu_rss_gib"}
    expected |= {f"memory/breakdown/{who}/{part}_gib" for who in ("rank0", "max") for part in BREAKDOWN_PARTS}
    expected |= set(COMPILE_METRICS)
    assert expected <= names, expected - names
    assert not any("allocated" in n or "reserved" in n or "mfu" in n for n in names)  # CUDA / peak figures on CPU

    # Counters: one row per step, strictly increasing.
    assert column(rows, "throughput/batches") == list(range(1, 11))
    assert column(rows, "throughput/samples") == [BATCH * k for k in range(1, 11)]
    assert column(rows, "throughput/tokens") == [BATCH * FEATURES * k for k in range(1, 11)]
    times = column(rows, "throughput/time")
    assert all(a < b for a, b in zip(times, times[1:]))
    assert times[-1] < 100  # the 2000 s the validation batches took are not training time
    for name in ("compile/time_s", "compile/graphs", "memory/rank0/cpu_rss_gib"):
        assert len(column(rows, name)) == 10, name
    assert all(a <= b for a, b in zip(column(rows, "compile/graphs"), column(rows, "compile/graphs")[1:]))

    # The fake clock ticks one second per batch: the windowed rates are exact.
    last = throughput.metrics
    assert throughput.flops_per_batch == STEP_FLOPS  # measured on a meta copy
    for scope in ("device", "global"):
        assert last[f"throughput/{scope}/batches_per_sec"] == pytest.approx(1.0)
        assert last[f"throughput/{scope}/samples_per_sec"] == pytest.approx(BATCH)
        assert last[f"throughput/{scope}/tokens_per_sec"] == pytest.approx(BATCH * FEATURES)
        assert last[f"throughput/{scope}/tflops_per_sec"] == pytest.approx(STEP_FLOPS / 1e12)
    # Measuring FLOPs compiled nothing: one graph for the sanity-check validation, one for training.
    assert lightning_thunder.compile_stats(model.net).graphs == 2

    # Breakdown, from the live tensors and the compiled model's traces.
    (breakdown,) = memory.breakdown_bytes
    assert breakdown == {
        "parameters": PARAM_BYTES,
        "gradients": PARAM_BYTES,
        "optimizer_state": 2 * PARAM_BYTES + 4 * 4,  # AdamW: exp_avg, exp_avg_sq, one fp32 `step` per tensor
        "activations_saved": SAVED_BYTES,
    }
    assert report.kernels_per_step == 3 + 6  # forward: addmm, gelu, addmm; backward: 3 mm, 2 sum, gelu_backward
    assert column(rows, "compile/kernels_per_step")[-1] == 9

    log_dir = tmp_path / "lightning_logs" / "version_0"
    assert check_png(log_dir / "throughput.png")[0] > 100
    assert check_png(log_dir / "memory.png")[0] > 100
    assert {"tok/s", "mem_gib"} <= set(trainer.progress_bar_metrics)
    out = capsys.readouterr().out
    assert "ThroughputMonitor: 10 batches, 40 samples, 320 tokens" in out
    assert "mfu unavailable: no peak FLOP/s known for cpu" in out
    assert "MemoryMonitor:" in out and "cuda unavailable" in out
    assert "CompileReport: 2 graphs" in out


def test_flops_per_batch_from_the_module_and_a_given_peak_give_mfu(tmp_path, monkeypatch):
    monkeypatch.setattr(throughput_module, "_now", FakeClock())
    model = Regressor(compiled=False)
    model.flops_per_batch = 2e12
    throughput = ThroughputMonitor(peak_flops=4e12, window_size=2, plot=False)
    _fit(tmp_path, model, [throughput], max_steps=3, limit_val_batches=0)
    for scope in ("device", "global"):
        assert throughput.metrics[f"throughput/{scope}/tflops_per_sec"] == pytest.approx(2.0)
        assert throughput.metrics[f"throughput/{scope}/mfu"] == pytest.approx(0.5)
    assert "throughput/tokens" not in throughput.metrics and "tokens" in throughput.unavailable
    assert not (tmp_path / "lightning_logs" / "version_0" / "throughput.png").exists()


@pytest.mark.slow
def test_trainer_two_gloo_ranks(tmp_path):
    """The Trainer side of the collectives (gather per batch, log_dir broadcast at the end) on 2 ranks."""
    monitors = [ThroughputMonitor(length_fn=tokens, window_size=2), MemoryMonitor(), CompileReport()]
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=4, logger=CSVLogger(tmp_path),
        log_every_n_steps=1, callbacks=monitors, enable_checkpointing=False, enable_model_summary=False,
        limit_val_batches=0, enable_progress_bar=False,
    )
    trainer.fit(Regressor(), loader())
    log_dir = tmp_path / "lightning_logs" / "version_0"
    rows = read_metrics(log_dir / "metrics.csv")
    # Each rank runs batches of BATCH samples (the sampler splits the data): totals are over both ranks.
    assert column(rows, "throughput/samples") == [2 * BATCH * k for k in range(1, 5)]
    assert column(rows, "throughput/batches") == [2 * k for k in range(1, 5)]
    assert len(column(rows, "memory/rank1/cpu_rss_gib")) == 4
    assert column(rows, "memory/breakdown/rank1/activations_saved_gib") == [pytest.approx(SAVED_BYTES / 2**30)]
    assert column(rows, "compile/kernels_per_step")[-1] == 9
    check_png(log_dir / "throughput.png")
    check_png(log_dir / "memory.png")

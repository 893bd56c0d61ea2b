"""The monitors on a CUDA GPU: CUDA memory figures, the card's peak and MFU (bf16-mixed).

Runs on the H100 machines: ``pytest tests/gpu``. Skipped without CUDA.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_thunder.callbacks import MemoryMonitor, ThroughputMonitor, card_of
from tests.callbacks.models import Regressor, column, loader, read_metrics, tokens

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run tests/gpu on an H100)")


def test_cuda_memory_figures_and_mfu(tmp_path):
    throughput, memory = ThroughputMonitor(length_fn=tokens, window_size=2), MemoryMonitor()
    trainer = L.Trainer(
        accelerator="cuda", devices=1, precision="bf16-mixed", max_steps=6, logger=CSVLogger(tmp_path),
        log_every_n_steps=1, callbacks=[throughput, memory], enable_checkpointing=False, limit_val_batches=0,
    )
    trainer.fit(Regressor(), loader())
    rows = read_metrics(tmp_path / "lightning_logs" / "version_0" / "metrics.csv")
    peaks = column(rows, "memory/max/peak_allocated_gib")
    assert len(peaks) == 6 and all(p > 0 for p in peaks)
    assert all(r >= a for r, a in zip(column(rows, "memory/max/peak_reserved_gib"), peaks))
    assert "cuda" not in memory.unavailable
    if card_of(torch.cuda.get_device_name()) is not None:
        assert throughput.device_peak_flops and "bf16" in throughput.peak_source
        assert 0 < throughput.metrics["throughput/device/mfu"] < 1

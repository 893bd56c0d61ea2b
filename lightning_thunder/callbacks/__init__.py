"""Callbacks reporting throughput, memory and compilation, for the Lightning Trainer and Fabric.

Trainer::

    trainer = Trainer(callbacks=[ThroughputMonitor(length_fn=lambda b: b[0].numel()), MemoryMonitor(), CompileReport()])

Fabric (see :mod:`lightning_thunder.callbacks.base` for the hooks a loop calls)::

    fabric = Fabric(callbacks=[ThroughputMonitor(...), MemoryMonitor(), CompileReport()], loggers=CSVLogger("logs"))
    model, optimizer = fabric.setup(model, optimizer)
    for batch in loader:
        ...
        fabric.call("on_train_batch_end", batch=batch)
    fabric.call("on_train_end")
"""

from lightning_thunder.callbacks.compile_report import COMPILE_METRICS, CompileReport
from lightning_thunder.callbacks.memory import BREAKDOWN_PARTS, MEMORY_METRICS, MemoryMonitor
from lightning_thunder.callbacks.peaks import PEAK_TFLOPS, card_of, fp8_active, peak_flops, precision_of
from lightning_thunder.callbacks.throughput import THROUGHPUT_METRICS, ThroughputMonitor

__all__ = [
    "BREAKDOWN_PARTS",
    "COMPILE_METRICS",
    "MEMORY_METRICS",
    "PEAK_TFLOPS",
    "THROUGHPUT_METRICS",
    "CompileReport",
    "MemoryMonitor",
    "ThroughputMonitor",
    "card_of",
    "fp8_active",
    "peak_flops",
    "precision_of",
]

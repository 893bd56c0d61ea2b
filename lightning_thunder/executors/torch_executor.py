"""The torch executor: runs any op with PyTorch itself. Always last, it claims whatever is left."""

from __future__ import annotations

from lightning_thunder.executors.base import Executor
from lightning_thunder.trace.trace import DELETE, Trace, timed_pass

__all__ = ["TorchExecutor"]


class TorchExecutor(Executor):
    """Runs every op it is given eagerly through PyTorch (ATen overloads, Python arithmetic on sizes)."""

    def __init__(self) -> None:
        super().__init__("torch")

    def claim(self, trace: Trace) -> Trace:
        """Mark every op no earlier executor claimed as run by ``torch``."""
        with timed_pass() as timer:
            ops = [op if op.executor or op.target is DELETE else op.replace(executor=self.name) for op in trace.ops]
        return trace.derive("executor torch (runs every unclaimed op eagerly)", ops=ops, elapsed_ms=timer.ms)

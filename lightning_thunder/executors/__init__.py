"""Executors: the torch executor (always, last) and the base classes for others."""

from lightning_thunder.executors.base import ClaimContext, Executor, OpExecutor
from lightning_thunder.executors.torch_executor import TorchExecutor

__all__ = ["ClaimContext", "Executor", "OpExecutor", "TorchExecutor"]

"""lightning_thunder: a trace compiler for PyTorch training, shipped as a Lightning extension.

Public API::

    cm = lightning_thunder.compile(model, plugins=[...])
    lightning_thunder.last_traces(cm)            # forward traces, stage by stage
    lightning_thunder.last_backward_traces(cm)   # backward traces
    lightning_thunder.compile_stats(cm)          # compile time, graphs, graph breaks, ...
    lightning_thunder.kernel_sources(cm)         # generated Triton kernels of the fused regions
    lightning_thunder.explain(cm)                # what was fused, and why each other op was not

Write a plugin by subclassing :class:`Plugin`. FP8 training: the compiler plugin
``lightning_thunder.plugins.FP8``, or the Lightning precision plugin :class:`ThunderFP8`
(``Fabric(plugins=[ThunderFP8()])``, ``Trainer(plugins=[ThunderFP8()])``).

Importing this package registers the Lightning strategies ``thunder``, ``thunder_ddp`` and ``thunder_fsdp``
(see :mod:`lightning_thunder.strategies`).
"""

from lightning_thunder.api import (
    compile,
    compile_stats,
    default_plugins,
    kernel_sources,
    last_backward_traces,
    last_traces,
)
from lightning_thunder.capture import CaptureError, CompileOptions, CompileStats, ThunderModule
from lightning_thunder.executors import Executor, OpExecutor
from lightning_thunder.explain import explain
from lightning_thunder.plugins import Plugin
from lightning_thunder.precision import ThunderFP8
from lightning_thunder.strategies import register_strategies
from lightning_thunder.trace import Trace

register_strategies()  # Fabric(strategy="thunder_fsdp") / Trainer(strategy="thunder_fsdp")

__version__ = "0.1.0"

__all__ = [
    "CaptureError",
    "CompileOptions",
    "CompileStats",
    "Executor",
    "OpExecutor",
    "Plugin",
    "ThunderFP8",
    "ThunderModule",
    "Trace",
    "compile",
    "compile_stats",
    "default_plugins",
    "explain",
    "kernel_sources",
    "last_backward_traces",
    "last_traces",
    "register_strategies",
]

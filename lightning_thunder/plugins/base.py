"""The plugin API: the composable unit users see.

A plugin may change the module once at compile time, rewrite the torch-level trace before
autograd, rewrite the forward and backward traces after autograd, bring executors, and rewrite the
executable program of each graph (``transform_final``: what ``CUDAGraphs`` uses). Every hook
is a no-op by default, so a plugin overrides only what it needs. Plugins compose in list order and
each one's effect shows up as its own named trace in :func:`lightning_thunder.last_traces`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lightning_thunder.executors.base import Executor
from lightning_thunder.trace.trace import Trace

__all__ = ["FinalContext", "Plugin"]


@dataclass(frozen=True)
class FinalContext:
    """What the compiler tells :meth:`Plugin.transform_final` about the executable program it hands over.

    Attributes:
        stage: ``"forward"`` or ``"backward"``.
        inference: the forward was compiled without autograd (no backward will read its outputs).
        user_outputs: how many leading outputs of the program go back to the caller; the others are values the
            forward saves for the backward (a training forward), or nothing (the backward and inference
            programs return only the caller's values).
        graph_index: the index of the compiled graph (:class:`~lightning_thunder.capture.GraphRecord`), for messages.
    """

    stage: str
    inference: bool
    user_outputs: int
    graph_index: int


class Plugin:
    """Base class of compiler plugins; override the hooks you need.

    Example (a plugin that counts the ops of each torch-level trace)::

        class CountOps(Plugin):
            def transform_torch_trace(self, trace):
                print(len(trace.ops), "ops")
                return trace
    """

    @property
    def name(self) -> str:
        """The plugin's name as shown in trace names (the class name by default)."""
        return type(self).__name__

    def transform_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """Change the module once, at compile time (sharding, dtype, layer swaps). Returns the module to compile."""
        return module

    def transform_torch_trace(self, trace: Trace) -> Trace:
        """Rewrite the torch-level trace before autograd (e.g. swap ``linear`` for an FP8 linear)."""
        return trace

    def transform_forward_backward(self, forward: Trace, backward: Trace | None) -> tuple[Trace, Trace | None]:
        """Rewrite the ATen-level forward and backward traces after autograd.

        ``backward`` is ``None`` for inference graphs (no input requires grad, or ``torch.no_grad()``).
        Changing which values the forward saves for the backward is allowed; the two must agree.
        """
        return forward, backward

    def transform_final(self, trace: Trace, context: FinalContext) -> Trace:
        """Rewrite the executable program of one graph (after executors claimed its ops and ``del`` statements were
        inserted): what runs is the last trace this hook returns (``CUDAGraphs`` wraps runs of ops into captured CUDA
        graphs here). A changed trace is recorded as the stage ``"<stage>/<plugin name>"`` after ``"<stage>/final"``;
        it must compute the same outputs from the same inputs."""
        return trace

    def executors(self) -> list[Executor]:
        """Executors this plugin brings; they run before the torch executor, in plugin order."""
        return []

    def fusion_epilogues(self) -> list[Any]:
        """Reductions of this plugin's ops that a fusion region may fold into its kernel
        (:class:`lightning_thunder.executors.triton.Epilogue`; FP8's partial maxima). Where no fusion executor
        runs, they are not used."""
        return []

    def __repr__(self) -> str:
        return f"{self.name}()"

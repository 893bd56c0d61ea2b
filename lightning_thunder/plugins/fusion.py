"""The Fusion plugin: generated Triton kernels for pointwise and reduction regions."""

from __future__ import annotations

import math

import torch

from lightning_thunder.executors.base import Executor, OpExecutor
from lightning_thunder.plugins.base import Plugin
from lightning_thunder.trace.proxy import Proxy

__all__ = ["Fusion", "EMBEDDING_MAX_TOKENS"]

#: the embedding-gradient kernel scans the token indices once per distinct index (quadratic in the
#: tokens, from L2): up to this many tokens it beats PyTorch's sort (H200: 8192 tokens 0.33 vs 0.50 ms)
EMBEDDING_MAX_TOKENS = 16384


def _embedding_claimable(op) -> bool:
    from lightning_thunder.executors.kernels.embedding_backward import supported

    values = [a.val if isinstance(a, Proxy) else a for a in op.args]
    if len(values) != 5 or op.kwargs or not isinstance(values[1], torch.Tensor):
        return False
    tokens = math.prod(values[1].shape)
    return type(tokens) is int and tokens <= EMBEDDING_MAX_TOKENS and supported(*values)


class Fusion(Plugin):
    """Fuse pointwise ops and last-dimension reductions of the forward and backward into Triton kernels.

    Also brings a deterministic two-launch Triton kernel for the embedding gradient
    (``aten.embedding_dense_backward``, PyTorch's sort-based version launches about 29 kernels) for up
    to :data:`EMBEDDING_MAX_TOKENS` tokens per step; beyond that PyTorch's scales better.

    On by default when CUDA is available (see :func:`lightning_thunder.default_plugins`). On CPU,
    regions are fused only under ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests).

    Args:
        fuel: fuse at most this many regions (over all graphs this plugin compiles), to bisect a
            numerics problem to one region: if ``fuel=k`` is right and ``fuel=k+1`` wrong, region k is.
        autotune: time a few block sizes per kernel on first use and keep the fastest (CUDA only).

    Example::

        cm = lightning_thunder.compile(model, plugins=[Fusion()])
        print(lightning_thunder.kernel_sources(cm))
    """

    def __init__(self, fuel: int | None = None, *, autotune: bool = True) -> None:
        from lightning_thunder.executors.triton import FusionExecutor

        self.executor = FusionExecutor(fuel, autotune=autotune)
        from lightning_thunder.executors.kernels.embedding_backward import embedding_dense_backward

        op = torch.ops.aten.embedding_dense_backward.default
        self.embedding = OpExecutor("embedding", {op: embedding_dense_backward}, {op: _embedding_claimable})

    @property
    def fuel(self) -> int | None:
        """The fuel limit (``None``: unlimited)."""
        return self.executor.fuel

    def executors(self) -> list[Executor]:
        """The Triton fusion executor and the embedding-gradient kernel."""
        return [self.executor, self.embedding]

    def __repr__(self) -> str:
        return f"Fusion(fuel={self.fuel!r})"

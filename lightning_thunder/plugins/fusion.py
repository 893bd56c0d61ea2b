"""The Fusion plugin: generated Triton kernels for pointwise and reduction regions."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch

from lightning_thunder.executors.base import Executor, OpExecutor
from lightning_thunder.plugins.base import Plugin
from lightning_thunder.trace.proxy import Proxy
from lightning_thunder.trace.trace import Trace

__all__ = ["Fusion", "EMBEDDING_MAX_TOKENS"]

#: the embedding-gradient kernel scans the token indices once per distinct index (quadratic in the
#: tokens, from L2): up to this many tokens it beats PyTorch's sort (H200: 8192 tokens 0.33 vs 0.50 ms)
EMBEDDING_MAX_TOKENS = 16384


_precompiler: ThreadPoolExecutor | None = None


def _example_args(op) -> list:
    """``op``'s positional arguments with each proxy replaced by its example value."""
    return [a.val if isinstance(a, Proxy) else a for a in op.args]


class _EmbeddingExecutor(OpExecutor):
    """Claims ``embedding_dense_backward`` and starts compiling its Triton kernel in the background right
    away (while the rest of the graph compiles and the first forward runs), not at the first backward."""

    def claim(self, trace: Trace) -> Trace:
        global _precompiler
        claimed = super().claim(trace)
        for op in claimed.ops:
            if op.executor != self.name:
                continue
            values = _example_args(op)
            if getattr(values[0], "device", torch.device("cpu")).type != "cuda":
                continue
            from lightning_thunder.executors.kernels.embedding_backward import precompile

            try:
                compile_kernel = precompile(values[0], values[1], values[2], values[3])
            except Exception:  # noqa: BLE001 - only a head start is lost: the kernel compiles at first launch
                compile_kernel = None
            if compile_kernel is not None:
                _precompiler = _precompiler or ThreadPoolExecutor(max_workers=1, thread_name_prefix="lt-precompile")
                _precompiler.submit(_quietly, compile_kernel)
        return claimed


def _quietly(fn) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - only a head start is lost: the kernel compiles at its first launch
        pass


def _embedding_claimable(op) -> bool:
    from lightning_thunder.executors.kernels.embedding_backward import supported

    values = _example_args(op)
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
        try:
            import triton  # noqa: F401
        except ImportError as e:
            raise ImportError(
                "lightning_thunder.plugins.Fusion generates Triton kernels and needs Triton: pip install triton "
                "(it comes with PyTorch's CUDA builds); without it, compile with plugins=[] (every op runs on PyTorch)"
            ) from e
        from lightning_thunder.executors.triton import FusionExecutor

        self.executor = FusionExecutor(fuel, autotune=autotune)
        from lightning_thunder.executors.kernels.embedding_backward import embedding_dense_backward

        op = torch.ops.aten.embedding_dense_backward.default
        self.embedding = _EmbeddingExecutor("embedding", {op: embedding_dense_backward}, {op: _embedding_claimable})

    @property
    def fuel(self) -> int | None:
        """The fuel limit (``None``: unlimited)."""
        return self.executor.fuel

    def executors(self) -> list[Executor]:
        """The Triton fusion executor and the embedding-gradient kernel."""
        return [self.executor, self.embedding]

    def __repr__(self) -> str:
        return f"Fusion(fuel={self.fuel!r})"

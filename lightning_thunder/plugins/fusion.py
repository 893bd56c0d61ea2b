"""The Fusion plugin: generated Triton kernels for pointwise and reduction regions."""

from __future__ import annotations

from lightning_thunder.executors.base import Executor
from lightning_thunder.plugins.base import Plugin

__all__ = ["Fusion"]


class Fusion(Plugin):
    """Fuse pointwise ops and last-dimension reductions of the forward and backward into Triton kernels.

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

    @property
    def fuel(self) -> int | None:
        """The fuel limit (``None``: unlimited)."""
        return self.executor.fuel

    def executors(self) -> list[Executor]:
        """The Triton fusion executor."""
        return [self.executor]

    def __repr__(self) -> str:
        return f"Fusion(fuel={self.fuel!r})"

"""Epilogues: reductions over a whole value that a fusion region folds into its kernel.

A plugin whose ops reduce a value to a few partial results (FP8's ``fp8_amax``: partial maxima of ``|x|``)
can let the region that computes the value do it: each program folds what it stores into the partial
results, and the separate pass over the value disappears. The plugin declares this through
:meth:`lightning_thunder.Plugin.fusion_epilogues`; the fusion executor knows nothing of the op itself.

An epilogue's op takes the value as its first argument and returns a small float32 tensor that starts at
zero (``zeroed``) and is complete only once the kernel has run: nothing in the region may read it, and the
region may not grow wider than the value afterwards. The op is folded whichever executor claimed it (plugin
order does not matter); where no region computes the value, the op runs as it would have.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_thunder.trace.trace import BoundOp

if TYPE_CHECKING:
    from lightning_thunder.executors.triton.writer import KernelWriter

__all__ = ["Epilogue"]


class Epilogue:
    """Base class of epilogues; see the module docstring.

    Subclasses set :attr:`name` and implement :meth:`matches`, :meth:`accepts` and :meth:`emit`.
    """

    #: shown in traces and in ``explain`` ("fp8_amax folded into fusion2")
    name: str = "epilogue"
    #: the output must start at zero (the kernel folds into it with atomics)
    zeroed: bool = True

    def matches(self, op: BoundOp) -> bool:
        """Whether ``op`` is this epilogue's op."""
        raise NotImplementedError

    def accepts(self, op: BoundOp) -> bool:
        """Whether this use of the op can be folded (dtypes, shapes); called only where :meth:`matches` holds."""
        raise NotImplementedError

    def emit(self, kernel: KernelWriter, op: BoundOp, out: str) -> None:
        """Write the Triton lines that fold this program's tile of ``op.args[0]`` into output argument ``out``.

        ``kernel`` is the code generator (see :class:`~lightning_thunder.executors.triton.writer.KernelWriter`):
        ``kernel.value(p)`` is the variable holding value ``p`` over the tile, ``kernel.valid(p)`` the mask of
        the tile's elements that ``p`` has, ``kernel.tile_reduce(expr, fn)`` reduces a tile to one value,
        ``kernel.emit(line)`` writes a line, and ``pid`` is the program id.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

"""FP8's fusion epilogue: a region that computes ``x`` folds ``fp8_amax(x)`` (partial maxima of ``|x|``, the first
pass of tensorwise quantization) into its kernel, so no separate pass reads ``x`` (see quantize.py).

Each program folds the maximum of ``|x|`` over its tile (``x`` as stored: rounded to its dtype) into slot
``pid % P`` of the zeroed ``[P]`` output with an atomic max; ``max`` of the slots is ``max |x|``, the same value the
separate pass computes, so scales and FP8 values are bit-identical.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lightning_thunder.executors.triton.epilogues import Epilogue
from lightning_thunder.trace.proxy import Proxy
from lightning_thunder.trace.trace import BoundOp

if TYPE_CHECKING:
    from lightning_thunder.executors.triton.writer import KernelWriter

__all__ = ["AbsmaxEpilogue"]


class AbsmaxEpilogue(Epilogue):
    """Folds ``lightning_thunder::fp8_amax`` into the region that computes its input (see the module docstring)."""

    name = "fp8_amax"
    zeroed = True

    def matches(self, op: BoundOp) -> bool:
        """Whether ``op`` is ``torch.ops.lightning_thunder.fp8_amax``, or that op as the FP8 executor claimed it."""
        from lightning_thunder.fp8.quantize import fp8_amax_kernel

        return op.target is torch.ops.lightning_thunder.fp8_amax.default or op.target is fp8_amax_kernel

    def accepts(self, op: BoundOp) -> bool:
        """A float input with a static shape on the output's device; a 1-D fp32 output."""
        x = op.args[0] if op.args else None
        out = op.outputs[0].val
        return (
            isinstance(x, Proxy) and x.is_tensor and x.val.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and out.dtype == torch.float32 and out.dim() == 1 and all(type(d) is int for d in x.shape)
            and x.val.device == out.device and not op.kwargs
        )

    def emit(self, kernel: KernelWriter, op: BoundOp, out: str) -> None:
        """``tl.atomic_max(out + pid % P, max |x| over the tile)``."""
        x = op.args[0]
        slots = int(op.outputs[0].val.shape[0])
        masked = f"tl.where({kernel.valid(x)}, tl.abs({kernel.value(x)}), 0.0)"
        tile_max = kernel.tile_reduce(masked, "max")
        kernel.emit(f"tl.atomic_max({out} + pid % {slots}, {tile_max}, sem='relaxed')  # {op.name}: |{x.name}|")

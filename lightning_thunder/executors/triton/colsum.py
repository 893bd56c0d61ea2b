"""Sums over all rows (a norm weight's or a bias's gradient) inside a fusion region.

``sum(x, dims=[0, .., n-2])`` of a value ``x`` the region computes would otherwise make the region
write all of ``x`` in fp32 (64 MiB for 8192 x 2048) for PyTorch's reduction kernel to read back, and
then need a cast kernel for the weight's dtype. Instead the region's kernel runs a fixed number ``G``
of programs, each walking its share of the rows (a grid-stride loop) and adding them into a per-column
accumulator in registers; it writes one row of ``G x N`` partial sums per program. A second small
kernel (:class:`ColumnSum`) adds the ``G`` partials of each column in a fixed order and casts to the
result's dtype (folding the ``view`` and cast that follow the sum in the trace). The order of every
addition is fixed by ``G`` and the block size, so results are the same from run to run.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from lightning_thunder.executors.launch import Launcher

__all__ = ["ColumnSum", "programs_for"]

# Each program finishes BLOCK_N columns, reading the G partial rows BLOCK_G at a time: N / 32 programs
# (64 for N = 2048) keep the GPU busy where one program per 1024 columns (2 programs) took 54 us on an
# H200 for 264 x 2048 partials.
_BLOCK_N, _BLOCK_G = 32, 64


def programs_for(device: torch.device, rows: int) -> int:
    """The grid size ``G`` of a region with column sums: two programs per multiprocessor (at most one
    per row); a handful under the CPU interpreter."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(rows, 2 * sms))
    return max(1, min(rows, 4))


@triton.jit
def _rtne_bf16(x):
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _column_sum_kernel(part, out, G, N, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, RTNE_BF16: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    cmask = cols < N
    acc = tl.zeros([BLOCK_G, BLOCK_N], tl.float32)
    for g0 in range(0, G, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)[:, None]
        acc += tl.load(part + g * N + cols, mask=(g < G) & cmask, other=0.0)
    total = tl.sum(acc, axis=0)[None, :]
    if RTNE_BF16:  # the interpreter truncates fp32 -> bf16; round to nearest even as the GPU does
        total = _rtne_bf16(total)
    tl.store(out + cols, total.to(out.dtype.element_ty), mask=cmask)


_COLUMN_SUM = Launcher(_column_sum_kernel)


class ColumnSum:
    """Finish a column sum: ``out = partials.sum(0)`` cast to ``dtype`` and shaped ``shape``.

    Args:
        name: the op's name in traces (``colsum0``).
        shape: the result's shape (``N`` elements: the sum's output, or a view of it).
        dtype: the result's dtype (the sum's, or that of the cast that followed it).
    """

    def __init__(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.__name__ = self.__qualname__ = name
        self.shape = tuple(shape)
        self.dtype = dtype

    def __call__(self, partials: torch.Tensor) -> torch.Tensor:
        G, N = partials.shape
        out = torch.empty(self.shape, dtype=self.dtype, device=partials.device)
        if math.prod(self.shape) != N:
            raise AssertionError(f"{self.__name__}: {N} column sums for an output of shape {self.shape}")
        rtne = self.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"
        grid = (triton.cdiv(N, _BLOCK_N),)
        _COLUMN_SUM(grid, partials, out, G, N, BLOCK_G=_BLOCK_G, BLOCK_N=_BLOCK_N, RTNE_BF16=rtne, num_warps=4)
        return out

    def __repr__(self) -> str:
        return f"ColumnSum({self.__name__}, {self.shape}, {self.dtype})"
